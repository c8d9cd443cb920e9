"""docs/api.md's Python blocks run as written, in order, in one namespace: on a tiny random model exported as a
run exports its student (fast), and the pipeline block on the reduced toy world (slow). Every public
function or class the blocks import or call has a docstring."""
import ast
import importlib
import inspect
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
API = REPO / "docs" / "api.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API.read_text(), flags=re.S)


def is_pipeline(block: str) -> bool:
    return "run_pipeline" in block


@pytest.fixture
def exported_run(tmp_path, monkeypatch, seed):
    """A tiny random Qwen2 with the Qwen2.5 tokenizer, exported to runs/tiny/export/merged (the cwd is tmp_path)."""
    from ssb_jax import init_model
    from ssb_jax.distill.synthetic import tiny_model_config
    from ssb_jax.export import ExportInfo, export_merged_model
    from ssb_jax.model.tokenizer import load_tokenizer
    from ssb_jax.paths import shared_data_path
    from ssb_jax.prompts import DEFAULT_PROMPTS
    tokenizer = load_tokenizer(shared_data_path("qwen2.5_tokenizer"))
    config = tiny_model_config(vocab_size=len(tokenizer))
    monkeypatch.chdir(tmp_path)
    export_merged_model(init_model(config, seed), None, None, config, "runs/tiny/export/merged", tokenizer=tokenizer,
                        info=ExportInfo(prompts=DEFAULT_PROMPTS))
    return tmp_path


def test_api_snippets_run(exported_run):
    fast = [b for b in blocks() if not is_pipeline(b)]
    assert len(fast) >= 4
    namespace = {}
    for block in fast:
        exec(compile(block, str(API), "exec"), namespace)
    from ssb_jax.prompts import DEFAULT_PROMPTS
    assert namespace["prompts"] == DEFAULT_PROMPTS
    assert namespace["answer"].finish_reason in ("stop", "length") and namespace["answer"].token_ids
    assert namespace["graded"].correct
    assert all(np.isfinite(float(namespace["metrics"][k])) for k in ("loss", "kl", "grad_norm"))
    assert int(namespace["state"]["step"]) == 1


@pytest.mark.slow  # the whole pipeline on the reduced toy world
@pytest.mark.e2e
def test_api_pipeline_snippet_runs(toy_world, tmp_path, monkeypatch):
    from ssb_jax import config as config_lib
    from tests.pipeline_runs import IN_PROCESS_MESH, REDUCED
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    shutil.copytree(toy_world, tmp_path / "runs" / "tiny" / "world")  # the same world config: not rebuilt
    parse = config_lib.parse_config_args
    monkeypatch.setattr(config_lib, "parse_config_args", lambda argv, **kw: parse([*argv, *REDUCED, *IN_PROCESS_MESH], **kw))
    (block,) = [b for b in blocks() if is_pipeline(b)]
    namespace = {}
    exec(compile(block, str(API), "exec"), namespace)
    assert "student" in namespace["ctx"].candidates and (tmp_path / "runs/tiny/report.md").exists()


def used_objects() -> dict[str, object]:
    """{dotted name: object} for what the blocks import (from M import n; import M; M.attr) and the methods
    they call on an imported class's instances (sampler.generate -> Sampler.generate)."""
    found, classes = {}, []
    trees = [ast.parse(block) for block in blocks()]
    modules = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    obj = getattr(module, alias.name)
                    found[f"{node.module}.{alias.name}"] = obj
                    if inspect.isclass(obj):
                        classes.append(obj)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    modules[alias.asname or alias.name] = importlib.import_module(alias.name)
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                obj = getattr(modules[node.value.id], node.attr, None)
                if callable(obj) and getattr(obj, "__module__", "").startswith("ssb_jax"):
                    found[f"{node.value.id}.{node.attr}"] = obj
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                for cls in classes:
                    method = getattr(cls, node.attr, None)
                    if inspect.isfunction(method) and not node.attr.startswith("_"):
                        found[f"{cls.__name__}.{node.attr}"] = method
    return found


def test_every_public_function_in_the_api_docs_has_a_docstring():
    objects = used_objects()
    assert {"ssb_jax.load_model", "ssb_jax.export.load_prompts", "Sampler.generate",
            "ssb_jax.evaluation.grading.grade_response", "ssb_jax.pipeline.run_pipeline"} <= set(objects)
    missing = sorted(name for name, obj in objects.items()
                     if obj.__module__.startswith("ssb_jax") and not (inspect.getdoc(obj) or "").strip()
                     or (inspect.isclass(obj) and inspect.getdoc(obj) == inspect.getdoc(object)))
    assert not missing, f"public names in docs/api.md without a docstring: {missing}"
