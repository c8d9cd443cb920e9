"""The Colab notebook's first hour (notebooks/ssb_colab.ipynb with notebooks/colab_setup.py): the clone cell,
the install decision, accelerator detection, the run's sizing and Drive. The notebook running top to bottom
on the tiny world is tests/pipeline/test_main.py::test_notebook_runs_top_to_bottom (slow)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "notebooks"))
import colab_setup  # noqa: E402


def _cells():
    import nbformat
    return nbformat.read(REPO / "notebooks" / "ssb_colab.ipynb", as_version=4).cells


def _parameters(cells):
    return next(c for c in cells if "parameters" in c.metadata.get("tags", []))


def test_notebook_has_badge_settings_and_no_source_folder_shortcut():
    cells = _cells()
    assert "colab.research.google.com/assets/colab-badge.svg" in cells[0].source
    names = {t.id for t in ast.walk(ast.parse(_parameters(cells).source)) if isinstance(t, ast.Name)}
    assert {"REPO_URL", "BRANCH", "CONFIG", "WORKDIR", "OVERRIDES", "SAVE_TO_DRIVE", "DRIVE_DIR"} <= names
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert 'find_spec("ssb_jax")' not in code and "find_spec('ssb_jax')" not in code
    assert "colab_setup.install(" in code and "jax.devices()" in code and "save_to_drive" in code


def test_required_modules_cover_setup_py():
    """Every install requirement is checked by its import name, so an install is not skipped while one is absent."""
    setup = (REPO / "setup.py").read_text()
    block = setup[setup.index("install_requires=["):setup.index("],", setup.index("install_requires=["))]
    requirements = [re.split(r"[<>=\[ ]", r)[0] for r in re.findall(r'"([^"]+)"', block)]
    checked = {m.replace(".", "-").lower().replace("_", "-") for m in colab_setup.REQUIRED_MODULES}
    assert requirements and {r.lower().replace("_", "-") for r in requirements} <= checked


def test_install_command_when_a_dependency_is_missing(monkeypatch, tmp_path):
    assert colab_setup.install_command(REPO, "cpu") is None  # this venv has everything
    assert colab_setup.missing_modules(("json", "no_such_module_xyz", "no_such_pkg_xyz.sub")) == \
        ["no_such_module_xyz", "no_such_pkg_xyz.sub"]
    # the repository root on the path makes ssb_jax importable while flax is absent: still an install
    monkeypatch.setattr(colab_setup, "missing_modules", lambda modules=None: ["flax"])
    command = colab_setup.install_command(tmp_path, "cpu")
    assert command[-4:] == ["install", "-q", "-e", str(tmp_path.resolve())]
    assert colab_setup.install_command(tmp_path, "gpu")[-1] == f"{tmp_path.resolve()}[cuda12]"
    assert colab_setup.install_command(tmp_path, "tpu")[-1] == f"{tmp_path.resolve()}[tpu]"
    # everything there but the accelerator's jax plugin
    monkeypatch.setattr(colab_setup, "missing_modules", lambda modules=colab_setup.REQUIRED_MODULES:
                        [m for m in modules if m == "jax_cuda12_plugin"])
    assert colab_setup.install_command(tmp_path, "cpu") is None
    assert colab_setup.install_command(tmp_path, "gpu")[-1].endswith("[cuda12]")
    extras = (REPO / "setup.py").read_text()
    assert all(f'"{e}":' in extras for e in colab_setup.JAX_EXTRA.values() if e)


def test_accelerator_from_the_environment(monkeypatch):
    monkeypatch.delenv("COLAB_GPU", raising=False)
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    assert colab_setup.accelerator() == "tpu"
    monkeypatch.delenv("COLAB_TPU_ADDR")
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    if colab_setup.accelerator() == "cpu":  # a machine without accelerator devices
        monkeypatch.setenv("COLAB_GPU", "1")
        assert colab_setup.accelerator() == "gpu"


def test_run_settings_size_qwen05b_for_a_free_runtime():
    from ssb_jax import config as config_lib
    assert colab_setup.run_settings("auto", None, "cpu") == ("configs/tiny.py", {})
    path, overrides = colab_setup.run_settings("auto", None, "gpu")
    assert path == "configs/qwen05b.py" and overrides == colab_setup.FREE_RUNTIME_OVERRIDES
    assert colab_setup.run_settings("auto", {"train.epochs": 1}, "tpu")[1] == {"train.epochs": 1}
    config = config_lib.load_config_file(str(REPO / path))
    config_lib.apply_overrides(config, overrides)
    config_lib.check_values(config)
    for section, classes in config_lib.SECTIONS.items():  # every section still builds (values in range)
        if section and section != "world":
            config_lib.section_to(classes[0], config[section], section)
    assert config.eval.max_problems <= 64 and config.eval.n_samples == 0 and config.eval.protocols == "math_verify"


def test_drive_round_trip(tmp_path):
    run, drive = tmp_path / "run", tmp_path / "drive" / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text("{}")
    assert colab_setup.save_to_drive(run, drive) == drive
    assert not colab_setup.restore_from_drive(run, drive)  # a local run is never overwritten
    restored = tmp_path / "fresh"
    assert colab_setup.restore_from_drive(restored, drive)
    assert (restored / "eval" / "results.json").read_text() == "{}"


def test_clone_cell_on_a_fresh_runtime(tmp_path, monkeypatch):
    """From a directory that is no checkout, the repository cell clones REPO_URL and imports colab_setup from it."""
    origin = tmp_path / "origin"
    (origin / "ssb_jax").mkdir(parents=True)
    (origin / "notebooks").mkdir()
    (origin / "setup.py").write_text("")
    (origin / "ssb_jax" / "__init__.py").write_text("")
    (origin / "notebooks" / "colab_setup.py").write_text("MARK = 'cloned'\n")
    git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    fresh = tmp_path / "content"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "colab_setup")
    cells = _cells()
    namespace = {}
    exec(_parameters(cells).source, namespace)
    namespace.update(REPO_URL=origin.as_uri(), CLONE_DIR=str(fresh / "ssb_jax"))
    repo_cell = next(c for c in cells if "def is_checkout" in c.source)
    exec(repo_cell.source, namespace)
    assert namespace["colab_setup"].MARK == "cloned" and Path.cwd() == fresh / "ssb_jax"
    # a placeholder URL is refused with one line
    monkeypatch.chdir(tmp_path)
    namespace.update(REPO_URL="https://github.com/YOUR_ACCOUNT/ssb_jax", CLONE_DIR=str(tmp_path / "none"))
    with pytest.raises(SystemExit, match="REPO_URL"):
        exec(repo_cell.source, namespace)
