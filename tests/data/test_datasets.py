import json
import logging

import pytest

from ssb_jax.data.datasets import (
    DataError, Problem, load_aime24, load_gsm8k, load_math500, load_problems)
from ssb_jax.paths import shared_data_dir

needs_shared_data = pytest.mark.skipif(
    not (shared_data_dir() / "gsm8k" / "train.jsonl").exists(),
    reason=f"shared data not found under {shared_data_dir()} (set SSB_DATA_DIR)")


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@needs_shared_data
@pytest.mark.parametrize("loader, count, source", [
    (lambda: load_gsm8k("train"), 7473, "gsm8k_train"),
    (lambda: load_gsm8k("test"), 1319, "gsm8k_test"),
    (load_math500, 500, "math500"),
    (load_aime24, 30, "aime24"),
])
def test_shared_files_load_with_expected_counts(loader, count, source):
    problems = loader()
    assert len(problems) == count
    assert problems.skipped == 0
    assert len({problem.id for problem in problems}) == count
    assert all(problem.question and problem.answer for problem in problems)
    assert all(problem.source == source for problem in problems)


@needs_shared_data
def test_shared_names_and_record_shapes():
    gsm8k = load_problems("gsm8k_test")
    assert gsm8k[0].id == "gsm8k_test-0"
    assert gsm8k[0].answer == "18"  # Janet's ducks
    assert "####" in gsm8k[0].extra["solution"]
    assert not any("," in problem.answer for problem in gsm8k)
    assert any(problem.answer.startswith("-") for problem in load_gsm8k("train"))
    math500 = load_problems("math500")
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].extra["subject"] == "Precalculus" and "solution" in math500[0].extra
    aime = load_problems("aime24")
    assert {problem.id for problem in aime} == {str(i) for i in range(60, 90)}
    assert "025" in {problem.answer for problem in aime}  # kept as written


def test_gsm8k_gold_commas_stripped_from_local_file(tmp_path):
    path = _write_jsonl(tmp_path / "gsm.jsonl", [
        json.dumps({"question": "How much?", "answer": "It costs 1,000 + 80.\n#### 1,080"}),
        json.dumps({"question": "Loss?", "answer": "Down 4.\n#### -4"}),
    ])
    problems = load_gsm8k("train", path=path)
    assert [p.answer for p in problems] == ["1080", "-4"]
    assert [p.id for p in problems] == ["gsm8k_train-0", "gsm8k_train-1"]
    assert problems[0].extra["solution"].endswith("#### 1,080")


def test_field_discovery_ids_and_named_fields(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        json.dumps({"Problem": "P1", "Answer": 25, "id": 7}),
        json.dumps({"problem": "P2", "answer": "\\frac{1}{2}", "unique_id": "u/2"}),
        json.dumps({"question": "P3", "answer": "3"}),
    ])
    problems = load_problems(str(path))
    assert problems == [
        Problem("7", "P1", "25", "mixed", {}),
        Problem("u/2", "P2", "\\frac{1}{2}", "mixed", {}),
        Problem("mixed-2", "P3", "3", "mixed", {}),
    ]
    named = _write_jsonl(tmp_path / "named.jsonl", [json.dumps({"q": "Q", "gold": "5", "other": 1})])
    (problem,) = load_problems(named, question_field="q", answer_field="gold")
    assert (problem.question, problem.answer, problem.extra) == ("Q", "5", {"other": 1})


def test_malformed_line_error_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        json.dumps({"question": "a", "answer": "1"}),
        '{"question": "b", "answer": ',
        json.dumps({"question": "c", "answer": "3"}),
    ])
    with pytest.raises(DataError) as error:
        load_problems(path)
    assert f"{path}:2" in str(error.value)
    assert "malformed JSON" in str(error.value)


def test_missing_field_error_names_field_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "missing.jsonl", [
        json.dumps({"question": "a", "answer": "1"}),
        json.dumps({"question": "b", "answer": "2"}),
        json.dumps({"question": "c"}),
    ])
    with pytest.raises(DataError) as error:
        load_problems(path)
    message = str(error.value)
    assert f"{path}:3" in message and "'answer'" in message
    with pytest.raises(DataError, match="'prompt'"):
        load_problems(path, question_field="prompt")


@pytest.mark.parametrize("field, value, kind", [
    ("answer", {"v": 4}, "a JSON object"), ("answer", [4], "a JSON array"), ("answer", True, "a boolean"),
    ("question", {"text": "1+1"}, "a JSON object"), ("id", ["a"], "a JSON array"),
])
def test_a_field_that_is_not_text_or_a_number_is_an_error_naming_file_line_and_field(tmp_path, field, value, kind):
    record = {"id": "x", "question": "1+1", "answer": "2", field: value}
    path = tmp_path / "structured.jsonl"
    path.write_text(json.dumps({"question": "2+2", "answer": 4}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"structured.jsonl:2: field '{field}' \({field}\) is {kind}, expected text"):
        load_problems(path)
    skipped = load_problems(path, on_bad_line="skip")
    assert [(p.question, p.answer) for p in skipped] == [("2+2", "4")] and skipped.skipped == 1


def test_a_non_finite_answer_is_an_error(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"question": "0/0", "answer": NaN}\n')
    with pytest.raises(DataError, match=r"nan.jsonl:1: field 'answer' \(answer\) is nan"):
        load_problems(path)


def test_duplicate_ids_are_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "dup.jsonl", [
        json.dumps({"id": 1, "question": "a", "answer": "1"}),
        json.dumps({"id": 1, "question": "b", "answer": "2"}),
    ])
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate id '1'.*dup.jsonl:1"):
        load_problems(path)


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "skip.jsonl", [
        json.dumps({"question": "a", "answer": "1"}),
        "not json",
        json.dumps({"question": "c"}),
        "",
        json.dumps({"question": "e", "answer": "5"}),
        "[1, 2]",
    ])
    with caplog.at_level(logging.WARNING):
        problems = load_problems(path, on_bad_line="skip")
    assert [p.question for p in problems] == ["a", "e"]
    # Ids come from the record position, so skipping does not shift later ids.
    assert [p.id for p in problems] == ["skip-0", "skip-3"]
    assert problems.skipped == 3
    assert f"{path}:2" in problems.skipped_lines[0]
    assert "skipped 3 bad record(s)" in caplog.text
    with pytest.raises(ValueError, match="on_bad_line"):
        load_problems(path, on_bad_line="ignore")


def test_parquet_file_loads(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed in this venv")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow.parquet not available")
    path = tmp_path / "aime_like.parquet"
    table = pa.table({"id": [60, 61], "problem": ["Find x.", "Find y."],
                      "answer": ["025", "113"], "url": ["u0", "u1"]})
    pq.write_table(table, path)
    problems = load_problems(str(path))
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("60", "Find x.", "025"), ("61", "Find y.", "113")]
    assert problems[0].extra == {"url": "u0"}
    missing = tmp_path / "no_answer.parquet"
    pq.write_table(pa.table({"problem": ["a"]}), missing)
    with pytest.raises(DataError, match=r"no_answer.parquet: row 0: missing field 'answer'"):
        load_problems(missing)


def test_unknown_spec_and_file_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="gsm8k_train"):
        load_problems("gsm8k_validation")
    with pytest.raises(ValueError, match="GSM8K split"):
        load_gsm8k("validation")
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_problems(csv)


def test_missing_shared_file_falls_back_to_hub(tmp_path, monkeypatch):
    import sys
    import types
    calls = []

    def fake_load_dataset(name, *args, split):
        calls.append((name, args, split))
        return [{"question": "Q", "answer": "work\n#### 2,000"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    monkeypatch.setenv("SSB_DATA_DIR", str(tmp_path))  # an empty shared folder
    problems = load_gsm8k("test")
    assert calls == [("openai/gsm8k", ("main",), "test")]
    assert [(p.id, p.answer) for p in problems] == [("gsm8k_test-0", "2000")]
    load_aime24()
    assert calls[-1] == ("HuggingFaceH4/aime_2024", (), "train")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_utf8_byte_named_by_file_line_and_offset(tmp_path, caplog, seed):
    import random
    rng = random.Random(seed)
    print(f"seed {seed}")
    rows = [json.dumps({"question": "".join(rng.choice("abc xyz+=?") for _ in range(rng.randint(1, 30))),
                        "answer": str(i)}) for i in range(rng.randint(2, 8))]
    encoded = [r.encode() + b"\n" for r in rows]
    bad_line = rng.randrange(len(rows))
    # a byte that can never start a UTF-8 character, inside the question's text (all ASCII, so the
    # decoder stops exactly there)
    text_start = encoded[bad_line].index(b'"question": "') + len(b'"question": "')
    text_end = encoded[bad_line].index(b'", "answer"')
    at = rng.randint(text_start, text_end)
    bad_byte = rng.choice([0x80, 0xBF, 0xC0, 0xF8, 0xFF])
    encoded[bad_line] = encoded[bad_line][:at] + bytes([bad_byte]) + encoded[bad_line][at:]
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"".join(encoded))
    offset = sum(len(e) for e in encoded[:bad_line]) + at
    expected = f"{path}:{bad_line + 1}: not UTF-8: byte 0x{bad_byte:02x} at byte offset {offset} of the file"

    with pytest.raises(DataError) as error:
        load_problems(path)
    assert str(error.value) == expected
    with caplog.at_level(logging.WARNING):
        problems = load_problems(path, on_bad_line="skip")
    assert [p.answer for p in problems] == [str(i) for i in range(len(rows)) if i != bad_line]
    assert problems.skipped_lines == [expected]
    assert expected in caplog.text


def test_byte_order_mark_is_not_a_bad_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "Q\u00e9", "answer": "1"}).encode() + b"\n")
    assert [(p.question, p.answer) for p in load_problems(path)] == [("Q\u00e9", "1")]


def test_file_without_problems_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = _write_jsonl(tmp_path / "blank.jsonl", ["", "   "])
    for path in (empty, blank):
        for mode in ("error", "skip"):
            with pytest.raises(DataError, match=rf"^{path}: no problems \(it holds no records\)$"):
                load_problems(path, on_bad_line=mode)
    all_bad = _write_jsonl(tmp_path / "all_bad.jsonl", ["nope", json.dumps({"question": "no answer"})])
    with pytest.raises(DataError) as error:
        load_problems(all_bad, on_bad_line="skip")
    message = str(error.value)
    assert message.startswith(f"{all_bad}: no problems (all 2 record(s) skipped as bad; first: {all_bad}:1: ")
    assert "\n" not in message


def test_parquet_bad_bytes_corrupt_and_empty_files(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed in this venv")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow.parquet not available")
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"problem": pa.array([b"fine", b"bad \xff here"], pa.binary()),
                             "answer": ["1", "2"]}), binary)
    with pytest.raises(DataError, match=r"^.*binary.parquet: row 1: field 'problem' is not UTF-8: byte 0xff at "
                                        r"byte offset 4 of the value$"):
        load_problems(binary)
    assert [p.question for p in load_problems(binary, on_bad_line="skip")] == ["fine"]

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError) as error:
        load_problems(corrupt)
    assert str(error.value).startswith(f"{corrupt}: cannot be read as Parquet (") and "\n" not in str(error.value)

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match=rf"^{empty}: no problems"):
        load_problems(empty)
