"""CITATION.cff is valid Citation File Format 1.2.0 for ssb_jax and cites the paper; LICENSE is Apache 2.0."""
import hashlib
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# SHA-256 of the Apache License 2.0 text as the ASF publishes it (https://www.apache.org/licenses/LICENSE-2.0.txt).
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
PAPER_TITLE = "Semantic Soft Bootstrapping: Long Context Reasoning in LLMs without Reinforcement Learning"


def _citation() -> dict:
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def _setup_field(name: str) -> str:
    match = re.search(rf'^\s*{name}="([^"]*)"', (ROOT / "setup.py").read_text(), re.MULTILINE)
    assert match, f"setup.py has no {name}="
    return match.group(1)


def _person_or_entity(author: dict) -> bool:
    return bool(author.get("family-names") or author.get("name"))


def test_citation_has_the_required_cff_keys():
    cff = _citation()
    # YAML would read 1.2 as a float; 1.2.0 stays a string, as the format requires
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert cff.get(key), f"CITATION.cff lacks {key}"
    assert isinstance(cff["authors"], list)
    assert all(_person_or_entity(author) for author in cff["authors"])


def test_citation_describes_this_package():
    cff = _citation()
    assert cff["type"] == "software"
    assert "ssb_jax" in cff["title"]
    assert cff["version"] == _setup_field("version")
    assert cff["license"] == _setup_field("license") == "Apache-2.0"


def test_citation_references_the_paper():
    papers = [ref for ref in _citation()["references"] if ref["title"] == PAPER_TITLE]
    assert len(papers) == 1, "CITATION.cff should reference the SSB paper once"
    paper = papers[0]
    for key in ("type", "authors", "title"):  # a reference's required keys
        assert paper.get(key), f"the paper's reference lacks {key}"
    assert [a["family-names"] for a in paper["authors"]] == ["Mitra", "Ulukus"]
    assert paper["year"] == 2025


def test_license_is_apache_2_0():
    first_line, _, text = (ROOT / "LICENSE").read_text(encoding="utf-8").partition("\n")
    assert first_line == "Copyright 2026 The ssb_jax authors"
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == APACHE_2_0_SHA256, (
        "LICENSE after its copyright line is not the Apache License 2.0 text, byte for byte")
