"""CI (.ci/run) runs the README's test command, so the two stay in step."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith("python -m pytest")]
    assert len(ci) == 1, ci
    assert ci[0] + "  " in (ROOT / "README.md").read_text() or ci[0] + "\n" in (ROOT / "README.md").read_text()
