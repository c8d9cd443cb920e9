import json
import sys
import threading
import time

import pytest

from ssb_jax import grading
from ssb_jax.grading import (
    GradeResult, answers_match, extract_boxed, get_grader, grade_response, gsm8k_gold,
    normalize_answer, parse_number, string_match)
from ssb_jax.paths import shared_data_dir

# (response text, gold answer, expected correct) under the default math_verify grader.
GRADING_CASES = [
    # GSM8K shapes: plain integers, money, commas, units, decimals.
    (r"She makes 9 * 2 = 18 dollars. \boxed{18}", "18", True),
    (r"\boxed{18.00}", "18", True),
    (r"\boxed{\$18}", "18", True),
    (r"\boxed{18 \text{ dollars}}", "18", True),
    (r"\boxed{18 dollars}", "18", True),
    (r"\boxed{\text{18 eggs}}", "18", True),
    (r"\boxed{1,080}", gsm8k_gold("so 1080 total\n#### 1,080"), True),
    (r"\boxed{1080}", gsm8k_gold("#### 1,080"), True),
    (r"\boxed{850,000}", "850000", True),
    (r"\boxed{109,200,000}", "109200000", True),
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{3}", "-3", False),
    (r"\boxed{-3}", "3", False),
    (r"\boxed{17}", "18", False),
    (r"\boxed{10}", "100", False),
    (r"\boxed{12.50}", "12.5", True),
    (r"\boxed{12.5}", "12", False),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{5 \text{ cm}^2}", "5", True),
    (r"\boxed{5cm}", "5", True),
    (r"\boxed{1000000.5}", "1000000", True),  # within relative 1e-6
    (r"\boxed{1.00001}", "1", False),  # outside relative 1e-6
    (r"\boxed{18} wait, I made an error, it is \boxed{20}", "20", True),
    (r"\boxed{18} wait, I made an error, it is \boxed{20}", "18", False),
    (r"The answer is 18.", "18", False),  # no box -> no_answer by default
    # AIME shapes: integer strings with leading zeros.
    (r"\boxed{25}", "025", True),
    (r"\boxed{025}", "025", True),
    (r"\boxed{73}", "073", True),
    (r"\boxed{52}", "025", False),
    (r"\boxed{250}", "025", False),
    (r"\boxed{ 204 }", "204", True),
    (r"\fbox{204}", "204", True),
    (r"so the answer is $\boxed 204$.", "204", True),
    (r"\boxed{205}", "204", False),
    # MATH500 shapes: LaTeX fractions, radicals, intervals, tuples, text, degrees.
    (r"\boxed{\frac{11}{2}}", r"\frac{11}{2}", True),
    (r"\boxed{5.5}", r"\frac{11}{2}", True),
    (r"\boxed{11/2}", r"\frac{11}{2}", True),
    (r"\boxed{\frac{11}{3}}", r"\frac{11}{2}", False),
    (r"\boxed{\dfrac{33}{100}}", r"\dfrac{33}{100}", True),
    (r"\boxed{\frac{33}{100}}", r"\dfrac{33}{100}", True),
    (r"\boxed{0.33}", r"\dfrac{33}{100}", True),
    (r"\boxed{\frac{1}{3}}", r"\dfrac{33}{100}", False),
    (r"\boxed{\frac12}", r"\frac{1}{2}", True),
    (r"\boxed{-\frac{1}{2}}", r"\frac{1}{2}", False),
    (r"\boxed{2\sqrt{5}}", r"2 \sqrt{5}", True),
    (r"\boxed{\sqrt{20}}", r"2 \sqrt{5}", True),
    (r"\boxed{2\sqrt{3}}", r"2 \sqrt{5}", False),
    (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{\sqrt{3}}{3}", True),
    (r"\boxed{\frac{1}{\sqrt{3}}}", r"\frac{\sqrt{3}}{3}", True),
    (r"\boxed{\frac{\sqrt{2}}{3}}", r"\frac{\sqrt{3}}{3}", False),
    (r"\boxed{(3,4]}", "(3,4]", True),
    (r"\boxed{[3,4]}", "(3,4]", False),
    (r"\boxed{(-\infty,2)\cup(3,\infty)}", r"(-\infty, 2) \cup (3, \infty)", True),
    (r"\boxed{(-\infty,2)\cup(4,\infty)}", r"(-\infty, 2) \cup (3, \infty)", False),
    (r"\boxed{[-2,7]}", r"x \in [-2,7]", True),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)", False),
    (r"\boxed{(6,31,-1)}", "(6,31,-1)", True),
    (r"\boxed{(6,31,1)}", "(6,31,-1)", False),
    (r"\boxed{-2, 1}", "1,-2", True),
    (r"\boxed{-2, 3}", "1,-2", False),
    (r"\boxed{-2, 1+\sqrt{5}, 1-\sqrt{5}}", r"\{1\pm\sqrt{5},-2\}", True),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
    (r"\boxed{Evelyn}", r"\text{Evelyn}", True),
    (r"\boxed{\text{Navin}}", r"\text{Evelyn}", False),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", True),
    (r"\boxed{C}", r"\text{(C)}", True),
    (r"\boxed{(B)}", r"\text{(C)}", False),
    (r"\boxed{76^\circ}", r"76^\circ", True),
    (r"\boxed{76}", r"76^\circ", True),
    (r"\boxed{86^{\circ}}", r"76^\circ", False),
    (r"\boxed{10080}", r"10,\!080", True),
    (r"\boxed{11111111100}", r"11,\! 111,\! 111,\! 100", True),
    (r"\boxed{\$32,348}", r"\$32,\!348", True),
    (r"\boxed{5.4}", r"5.4 \text{ cents}", True),
    (r"\boxed{15}", r"15\mbox{ cm}^2", True),
    (r"\boxed{864 \text{ square inches}}", r"864 \mbox{ inches}^2", True),
    (r"\boxed{\frac{270}{7}}", r"\frac{270}7\text{ degrees}", True),
    (r"\boxed{x=5}", "x=5", True),
    (r"\boxed{5}", "x=5", True),
    (r"\boxed{6}", "x=5", False),
    (r"\boxed{y=2x+3}", "y = 2x + 3", True),
    (r"\boxed{y=3x+2}", "y = 2x + 3", False),
    (r"\boxed{6+9i}", "6+9i", True),
    (r"\boxed{6-9i}", "6+9i", False),
    (r"\boxed{\begin{pmatrix} -\frac13 \\ \frac23 \\ \frac53 \end{pmatrix}}",
     r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", True),
    (r"\boxed{\begin{pmatrix} 1/3 \\ 2/3 \\ 5/3 \end{pmatrix}}",
     r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", False),
    (r"\boxed{2516_8}", "2516_8", True),
    (r"\boxed{\frac{\sqrt{2}}{2} \cdot \frac{1}{\sqrt{2}}}", r"\frac{1}{2}", True),  # nested braces
    (r"the answer is \boxed{\frac{1}{2}", r"\frac{1}{2}", False),  # truncated box
    (r"The final answer is \frac{11}{2}.", r"\frac{11}{2}", False),  # no box
]


@pytest.mark.parametrize("response, gold, expected", GRADING_CASES)
def test_grade_response_table(response, gold, expected):
    result = grade_response(response, gold)
    assert result.correct is expected, (response, gold, result)
    if expected:
        assert result.label == "correct"


def test_table_is_large_and_mixed():
    assert len(GRADING_CASES) >= 60
    assert sum(1 for *_, expected in GRADING_CASES if not expected) >= 20


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{42}", "42"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{a}{\sqrt{b}}}", r"\frac{a}{\sqrt{b}}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
    (r"\fbox{7}", "7"),
    (r"\boxed 5$.", "5"),
    (r"\boxed{3} and then \boxed{4", "3"),  # unclosed last box skipped
    ("no box here 12", None),
    (r"\boxedtext{4}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_labels_and_unboxed_fallback():
    assert grade_response(r"\boxed{7}", "7") == GradeResult("7", True, "correct")
    assert grade_response(r"\boxed{8}", "7") == GradeResult("8", False, "wrong")
    assert grade_response("It is 7.", "7") == GradeResult(None, False, "no_answer")
    assert grade_response(r"\boxed{}", "7").label == "no_answer"
    unboxed = grade_response("So she earns $1,080 per week.", "1080", allow_unboxed=True)
    assert unboxed == GradeResult("1,080", True, "correct")
    assert grade_response("Loss is -12 then.", "-12", allow_unboxed=True).correct
    assert grade_response("no number", "3", allow_unboxed=True).label == "no_answer"
    # A box still takes precedence over later numbers.
    assert grade_response(r"\boxed{5} (checked 3 times)", "5", allow_unboxed=True).answer == "5"


def test_string_match_is_strict_and_separate():
    assert string_match("025", "25")
    assert string_match(r"\dfrac{1}{2}", r"\frac{1}{2}")
    assert string_match(r"\$1,080", "1080")
    assert not string_match(r"\sqrt{20}", r"2\sqrt{5}")
    assert not string_match("0.5", r"\frac{1}{2}")
    assert not string_match(None, "1")
    assert grade_response(r"\boxed{\sqrt{20}}", r"2\sqrt{5}", grader="string_match").label == "wrong"
    assert grade_response(r"\boxed{\sqrt{20}}", r"2\sqrt{5}", grader="math_verify").correct
    assert get_grader("string_match") is string_match
    assert get_grader("math_verify") is answers_match
    with pytest.raises(ValueError, match="unknown grader"):
        get_grader("exact")


@pytest.mark.parametrize("text, value", [
    ("025", 25.0), ("-7", -7.0), ("3.25", 3.25), (".5", 0.5), (r"\$1,080", 1080.0),
    (r"\frac{3}{4}", 0.75), (r"-\frac{3}{4}", -0.75), (r"\dfrac{1}{8}", 0.125), ("3/4", 0.75),
    ("90^\\circ", 90.0), ("x = 4", 4.0), ("1/0", None), (r"\sqrt{2}", None), ("(1,2)", None),
    ("abc", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("raw, normalized", [
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{pmatrix}-1&0\\0&-1\end{pmatrix}"),
    ("2m", "2m"), ("6+9i", "6+9i"), ("(100,200)", "(100,200)"), ("1,-2", "1,-2"),
    (r"\tfrac{1}{2}", r"\frac{1}{2}"), (r"\text{\textbf{east}}", "east"), ("\u22125", "-5"),
])
def test_normalize_answer_keeps_structure(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_gsm8k_gold():
    assert gsm8k_gold("He pays 2,000 + 50\n#### 2,050") == "2050"
    assert gsm8k_gold("#### -4") == "-4"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")


def test_any_exception_is_false(monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(grading, "_math_verify_equal", explode)
    assert answers_match(r"\sqrt{2}", r"\sqrt{3}") is False
    assert answers_match(object(), r"\sqrt{3}") is False


def test_math_verify_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(answers_match(r"\sqrt{20}", r"2\sqrt{5}")))
    thread.start()
    thread.join(60)
    assert results == [True]


@pytest.fixture
def fresh_worker():
    grading.stop_math_verify_worker()
    yield
    grading.stop_math_verify_worker()


def test_timeout_bounds_a_hanging_math_verify(monkeypatch, fresh_worker):
    hanging_worker = ("import sys, time; print('ready', flush=True); "
                      "sys.stdin.readline(); time.sleep(120)")
    monkeypatch.setattr(grading, "_worker_command", lambda: [sys.executable, "-c", hanging_worker])
    grading.start_math_verify_worker()
    process = grading._WORKER._process
    started = time.monotonic()
    assert answers_match(r"\sqrt{2}", r"\pi", timeout_s=1.0) is False
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 5.0
    assert process.poll() is not None  # the hung worker was killed
    # The next call starts a fresh (real) worker and grades normally.
    monkeypatch.undo()
    assert answers_match(r"\sqrt{20}", r"2\sqrt{5}") is True


# --- Real gold answers from the shared data ---------------------------------------

def _read_jsonl(*parts):
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data file {path} not available")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_real_gsm8k_golds_are_numbers():
    rows = _read_jsonl("gsm8k", "train.jsonl") + _read_jsonl("gsm8k", "test.jsonl")
    golds = [gsm8k_gold(row["answer"]) for row in rows]
    assert all(parse_number(gold) is not None for gold in golds)
    assert any(gold.startswith("-") for gold in golds)
    assert not any("," in gold for gold in golds)
    comma_row = next(row for row in rows if "," in row["answer"].rsplit("####", 1)[1])
    gold = gsm8k_gold(comma_row["answer"])
    assert grade_response(rf"\boxed{{{comma_row['answer'].rsplit('####', 1)[1].strip()}}}",
                          gold).correct


def test_real_aime_golds_with_leading_zeros():
    rows = _read_jsonl("aime24", "test.jsonl")
    assert any(row["answer"].startswith("0") for row in rows)
    for row in rows:
        assert grade_response(rf"\boxed{{{int(row['answer'])}}}", row["answer"]).correct
        assert not grade_response(rf"\boxed{{{int(row['answer']) + 1}}}", row["answer"]).correct


def test_real_math500_golds_match_themselves_and_their_solutions():
    rows = _read_jsonl("math500", "test.jsonl")
    for row in rows:
        assert grade_response(rf"\boxed{{{row['answer']}}}", row["answer"]).correct, row["answer"]
    # The reference solutions' own boxes agree with the gold answer.
    graded = [grade_response(row["solution"], row["answer"]) for row in rows[:60]]
    assert sum(result.correct for result in graded) >= 57
