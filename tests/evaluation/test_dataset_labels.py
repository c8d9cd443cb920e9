"""Dataset labels name the evaluation's outputs folders (evaluation/datasets.py): one path component, never
dots only or hidden, and unique as folder names on every file system."""
import pytest

from ssb_jax.evaluation import EvalConfig, parse_datasets, run
from ssb_jax.evaluation.datasets import SAFE_NAME, folder_key


@pytest.mark.parametrize("spec", ["..=/x/a.jsonl", ".=/x/a.jsonl", "...=/x/a.jsonl", ".hidden=/x/a.jsonl",
                                  "a/b=/x/a.jsonl", "/x/..jsonl", "/x/.hidden.jsonl"])
def test_a_label_that_is_not_one_visible_folder_name_is_refused(spec):
    with pytest.raises(ValueError, match=r"must be letters, digits, '.', '_' or '-', not starting with '.' "
                                         r"\(it names the outputs folder\)"):
        parse_datasets(spec)
    with pytest.raises(ValueError, match="not starting with '.'"):
        EvalConfig(datasets=spec)


@pytest.mark.parametrize("specs, names", [
    ("GSM=/x/a.jsonl,gsm=/y/b.jsonl", "labelled 'GSM' and 'gsm', one folder on case-insensitive file systems"),
    ("a.=/x/a.jsonl,a=/y/b.jsonl", "labelled 'a.' and 'a'"),
    ("/x/Test.jsonl,/y/test.jsonl", "labelled 'Test' and 'test'"),
])
def test_labels_that_one_file_system_takes_for_one_folder_are_refused(specs, names):
    with pytest.raises(ValueError, match=names):
        parse_datasets(specs)


def test_ordinary_labels_pass():
    specs = parse_datasets("math500,my-set.v2=/z/x.parquet,_a=/y/a.jsonl,a.b=/y/b.jsonl")
    assert [s.label for s in specs] == ["math500", "my-set.v2", "_a", "a.b"]
    assert all(SAFE_NAME.fullmatch(s.label) for s in specs)
    assert folder_key("AIME.") == folder_key("aime")


def test_a_model_name_of_dots_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"model name '\.\.' must be letters"):
        run({"..": object()}, None, EvalConfig(datasets="math500"), tmp_path)
    assert not any(tmp_path.iterdir())
