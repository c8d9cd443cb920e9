"""Names a package re-exports, imported on first use (PEP 562), so importing the package imports no jax."""
import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """A module `__getattr__` for `package`: each name of `exports` (name -> defining module) is imported
    from its module when first asked for, then kept in `namespace` (the package's globals)."""
    def __getattr__(name):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
