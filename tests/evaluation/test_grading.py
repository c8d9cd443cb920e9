import contextlib
import json
import random
import re
import signal
import sys
import threading
import time

import pytest

from ssb_jax.evaluation import grading
from ssb_jax.evaluation.grading import compare, math_verify_worker, normalize
from ssb_jax.evaluation.grading import (
    GradeResult, answers_match, extract_boxed, get_grader, grade_response, gsm8k_gold,
    exact_match, extract_boxed_verbatim, motif_grade, normalize_answer, parse_number, same_number, string_match,
    well_formed)
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
    (r"\boxed{1000000.5}", "1000000", False),  # exact values compare exactly, however large
    (r"\boxed{191999900}", "192000000", False),
    (r"\boxed{192,000,000}", "192000000", True),
    (r"\boxed{1.00001}", "1", False),
    (r"\boxed{0.333333}", r"\frac{1}{3}", True),  # a decimal against 1/3 is a rounding: relative 1e-6
    (r"\boxed{0.33}", r"\frac{1}{3}", False),
    (r"\boxed{2/6}", r"\frac{1}{3}", True),
    (r"\boxed{\frac{333333}{1000001}}", r"\frac{1}{3}", False),  # two fractions: exact
    # malformed answers are wrong, however leniently math_verify would read them
    (r"\boxed{5^^}", "5", False),
    (r"\boxed{5^{}}", "5", False),
    (r"\boxed{5))}", "5", False),
    (r"\boxed{5+}", "5", False),
    (r"\boxed{\sqrt{25}}", "5", True),
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


# (response, gold, MOTIF rule, motif label, string_match label, math_verify label): cases where the MOTIF
# papers' substring rule and the answer graders disagree, with every verdict written out.
MOTIF_CASES = [
    # a correct box anywhere counts for MOTIF; the answer graders read the last box only
    (r"First \boxed{12}, but on reflection \boxed{13}.", "12", "boxed", "correct", "wrong", "wrong"),
    (r"So \boxed{13}, no: \boxed{12}", "12", "boxed", "correct", "correct", "correct"),
    # MOTIF matches the text as written: no spaces stripped, no LaTeX variants, no numeric reading
    (r"\boxed{ 12 }", "12", "boxed", "wrong", "correct", "correct"),
    (r"\boxed{12.0}", "12", "boxed", "wrong", "correct", "correct"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", "boxed", "wrong", "correct", "correct"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", "boxed", "correct", "correct", "correct"),
    (r"\boxed{0.5}", r"\frac{1}{2}", "boxed", "wrong", "wrong", "correct"),
    # AIME: the gold string anywhere, even inside another number or with no box at all
    ("The total is 233.", "33", "contains", "correct", "no_answer", "no_answer"),
    (r"Hence \boxed{233}.", "33", "contains", "correct", "wrong", "wrong"),
    (r"We get 33 first, then \boxed{34}.", "33", "contains", "correct", "wrong", "wrong"),
    (r"\boxed{033}", "33", "boxed", "wrong", "correct", "correct"),
    # no box: the boxed rule cannot match, and the response has no answer
    ("It is 12.", "12", "boxed", "no_answer", "no_answer", "no_answer"),
    ("It is 12.", "13", "contains", "no_answer", "no_answer", "no_answer"),
    (r"Unfinished \boxed{12", "12", "boxed", "no_answer", "no_answer", "no_answer"),
    # an empty gold answer is never found, though the empty string is inside every text
    (r"\boxed{}", "", "boxed", "no_answer", "no_answer", "no_answer"),
    ("anything", "", "contains", "no_answer", "no_answer", "no_answer"),
]


@pytest.mark.parametrize("response, gold, rule, motif_label, string_label, verify_label", MOTIF_CASES)
def test_motif_rule_against_the_answer_graders(response, gold, rule, motif_label, string_label, verify_label):
    graded = motif_grade(response, gold, rule)
    assert (graded.label, graded.correct) == (motif_label, motif_label == "correct")
    assert graded.answer == (extract_boxed(response) or None)  # the last box, for the record only
    assert grade_response(response, gold, grader="string_match").label == string_label
    assert grade_response(response, gold, grader="math_verify").label == verify_label


def test_motif_rule_is_the_authors_substring_check(seed):
    """An independent restatement of the authors' checks (MATH500: f'\\boxed{{{y}}}' in x; AIME: y in x) on
    seeded random strings over a small alphabet, so that near misses are common."""
    rng = random.Random(seed)
    alphabet = ["1", "2", "3", " ", "{", "}", "\\boxed{", "\\boxed{1", "}."]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        gold = "".join(rng.choice("123") for _ in range(rng.randrange(1, 3)))
        assert motif_grade(text, gold, "boxed").correct == ("\\boxed{" + gold + "}" in text), (seed, text, gold)
        assert motif_grade(text, gold, "contains").correct == (gold in text), (seed, text, gold)
    with pytest.raises(ValueError, match="unknown MOTIF rule"):
        motif_grade("x", "1", "last_box")


# (response, gold, exact label, verbatim answer, string_match label): the reference code's reading (the last
# closed `\\boxed{` as written, every brace counted) and its equality, against the normalized grader.
EXACT_CASES = [
    (r"\boxed{12}", "12", "correct", "12", "correct"),
    (r"\boxed{ 12 }", "12", "wrong", " 12 ", "correct"),
    (r"\boxed{12.0}", "12", "wrong", "12.0", "correct"),
    (r"\boxed{1,000}", "1000", "wrong", "1,000", "correct"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", "wrong", r"\dfrac{1}{2}", "correct"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", "correct", r"\frac{1}{2}", "correct"),
    # only the last box counts, as for the other graders
    (r"First \boxed{12}, then \boxed{13}.", "12", "wrong", "13", "wrong"),
    # forms the reference does not read: \fbox, a space before the brace, \boxed 5
    (r"\fbox{12}", "12", "no_answer", None, "correct"),
    (r"\boxed {12}", "12", "no_answer", None, "correct"),
    (r"\boxed 12", "12", "no_answer", None, "correct"),
    # an empty box is an answer, and a wrong one
    (r"\boxed{}", "12", "wrong", "", "no_answer"),
    # an escaped brace still counts as a brace: this box never closes for the reference
    (r"\boxed{\{1}", r"\{1", "no_answer", None, "correct"),
    # an unclosed last box: the previous closed one
    (r"\boxed{7} and \boxed{12", "12", "wrong", "7", "wrong"),
]


@pytest.mark.parametrize("response, gold, exact_label, verbatim, string_label", EXACT_CASES)
def test_exact_grader_reads_boxes_as_the_reference_code(response, gold, exact_label, verbatim, string_label):
    assert extract_boxed_verbatim(response) == verbatim
    graded = grade_response(response, gold, grader="exact")
    assert (graded.answer, graded.label) == (verbatim, exact_label)
    assert grade_response(response, gold, grader="string_match").label == string_label


def test_verbatim_extraction_is_the_reference_scan(seed):
    """An independent restatement of the reference's brace-depth scan (every `\\boxed{`, depth counted
    char by char, the last closed one wins) on seeded random strings of box parts."""
    def reference_scan(text):
        last = None
        for match in re.finditer(r"\\boxed\{", text):
            i = start = match.end()
            depth = 1
            while i < len(text) and depth > 0:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if depth == 0:
                last = text[start:i - 1]
        return last

    rng = random.Random(seed)
    parts = ["\\boxed{", "\\boxed {", "{", "}", "\\", "1", " ", "\\{", "x"]
    for _ in range(3000):
        text = "".join(rng.choice(parts) for _ in range(rng.randrange(14)))
        assert extract_boxed_verbatim(text) == reference_scan(text), (seed, text)
    assert exact_match("12", "12") and not exact_match(" 12", "12") and not exact_match(None, "12")
    assert get_grader("exact") is exact_match


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
        get_grader("verbatim")


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
    monkeypatch.setattr(compare, "_math_verify_equal", explode)
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
    monkeypatch.setattr(math_verify_worker, "_worker_command", lambda: [sys.executable, "-c", hanging_worker])
    grading.start_math_verify_worker()
    process = math_verify_worker._WORKER._process
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


def test_large_integer_golds_are_graded_and_voted_exactly():
    """Every GSM8K gold at or above 10^6 (the shared data has 18): the gold matches itself written with
    commas, and an integer 100 away is wrong, under the math_verify grader and in majority voting."""
    from ssb_jax.evaluation.records import majority_vote
    rows = _read_jsonl("gsm8k", "train.jsonl") + _read_jsonl("gsm8k", "test.jsonl")
    large = [int(gold) for gold in (gsm8k_gold(row["answer"]) for row in rows) if abs(parse_number(gold)) >= 10**6]
    assert len(large) >= 10
    for gold in large:
        assert grade_response(rf"\boxed{{{gold:,}}}", str(gold)).correct
        for near in (gold - 100, gold + 1):
            assert not grade_response(rf"\boxed{{{near}}}", str(gold)).correct, (near, gold)
            assert not answers_match(str(near), str(gold))
        assert majority_vote([str(gold - 100), str(gold), str(gold)]) == (1, 2)  # no group of three


@pytest.mark.parametrize("a, b, same", [
    ("191999900", "192000000", False), ("12.5", "12.50", True), ("0.1", "1/10", True), ("0.5", r"\frac{1}{2}", True),
    ("3.14159", r"\frac{22}{7}", False), ("0.285714", r"\frac{2}{7}", True), ("0.2857", r"\frac{2}{7}", False),
    ("-0.333333", r"-\frac{1}{3}", True), ("0.333333", r"-\frac{1}{3}", False),
])
def test_same_number_is_exact_unless_a_decimal_stands_for_a_value_no_decimal_equals(a, b, same):
    assert same_number(parse_number(a), parse_number(b)) is same
    assert same_number(parse_number(b), parse_number(a)) is same


@pytest.mark.parametrize("answer, ok", [
    ("5", True), ("x^2", True), ("10^\\circ", True), ("[1, 2)", True), (r"(-\infty, 3]", True), (r"\{1,2\}", True),
    (r"\frac{1}{2}", True), ("5!", True), ("a_n", True), (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
    ("5^^", False), ("5^", False), ("5^{}", False), ("5))", False), ("5+", False), ("5__", False),
    (r"\frac{}{}5", False), ("{5", False), ("5}", False), ("3\\", False), ("1,2,", False), (")5(", False),
])
def test_well_formed(answer, ok):
    assert well_formed(answer) is ok


def test_a_very_long_numeral_is_no_number():
    assert parse_number("1" * 5000) is None  # int() refuses numerals over 4300 digits
    assert not answers_match("1" * 5000, "1" * 4999 + "2", timeout_s=2.0)


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


# --- Linear time on adversarial responses (issue 13) -------------------------------

# (raw answer, expected normal form), written out by hand from the documented rules.
NORMALIZATION_TABLE = [
    ("12 apples", "12"), ("12 apples.", "12"), ("7 Apples .", "7"), ("18 dollars", "18"),
    ("5 cm^2", "5"), ("5cm", "5"), ("5 cm^{3}.", "5"), ("10 km ^ { 2 }", "10"),
    ("5 cm^4", "5cm^4"), ("3 sq. ft", "3"), ("864 square inches", "864"), ("5 m", "5"),
    ("5m", "5m"), ("2 x", "2x"), ("2x", "2x"), ("6+9i", "6+9i"), ("3 a.m.", "3"),
    ("1,000 dollars", "1000"), (r"\frac{1}{2} cup", r"\frac{1}{2}"), ("x = 4 meters", "4"),
    ("2\nm", "2"), ("a\n2 apples", "a2apples"), ("5 .", "5"),
    ("12 apples in the basket of Tom and Mary, total", "12applesinthebasketofTomandMary,total"),
    ("2 + 3 apples", "2+3apples"), (r"100 \text{ square units}", "100"),
    (r"18 \text{dollars}.", "18"), (r"4 \text{ cm}^{2}", "4"), (r"\text{\textbf{east}}", "east"),
    (r"\mathrm{(B)}", "B"), (r"\text{a}+\text{b}", "a+b"), (r"\text{a{b}}", r"\text{a{b}}"),
    ("007", "7"), ("-007", "-7"), ("000", "0"), ("0.50", "0.50"), ("5.000", "5"), ("+5", "5"),
    ("(C)", "C"), (r"10\%", "10"), (r"90^\circ", "90"), (r"\$1,080", "1080"),
    (r"\dfrac{3}{4}", r"\frac{3}{4}"), (r"\frac12", r"\frac{1}{2}"), (r"\sqrt2", r"\sqrt{2}"),
]


@pytest.mark.parametrize("raw, normalized", NORMALIZATION_TABLE)
def test_normalization_of_ordinary_answers_is_unchanged(raw, normalized):
    assert normalize_answer(raw) == normalized


class _HardTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so the graders' `except Exception` passes it on."""


@contextlib.contextmanager
def _hard_time_limit(seconds: float, what: str):
    """Fail (not hang) when `what` runs past `seconds`: the regex engine and Python loops
    both check for signals, so the alarm interrupts even catastrophic backtracking."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGALRM needs the main thread")

    def expire(signum, frame):
        raise _HardTimeout(f"{what} still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _HardTimeout as error:
        grading.stop_math_verify_worker()  # a request may be left unanswered on its pipe
        pytest.fail(str(error))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _adversarial_answers(seed):
    rng = random.Random(seed)
    mixed = "".join(rng.choice("0123456789abcxyz\\${} ^.,") for _ in range(100_000))
    return {
        "letters_32": "1" + "a" * 32 + "!",
        "letters_5000": "1" + "a" * 5000 + "!",
        "letter_words_5000": "1 " + "a " * 5000 + "!",
        "words_punctuation": "12 apples in the basket of Tom and Mary, total. " * 1000,
        "dotted_words": "1" + " a." * 30_000 + " 1",
        "double_dots": "1 a" + "." * 100_000,
        "spaces_before_end": "1\\text{a}" + " " * 100_000 + "x",
        "spaced_unit_power": "1 cm" + " " * 30_000 + "^" + " " * 30_000 + "2" + " " * 30_000 + "x",
        "variable_then_spaces": "x =" + " " * 100_000,
        "frac_then_spaces": "\\frac" + " " * 100_000 + "x",
        "leading_zeros": "0" * 100_000 + "x",
        "nested_boxes_open": "\\boxed{" * 5000,
        "nested_boxes_closed": "\\boxed{" * 5000 + "1" + "}" * 5000,
        "open_braces": "{" * 100_000,
        "close_braces": "}" * 100_000,
        "alternating_braces": "}{" * 50_000,
        "nested_text": "\\text{" * 10_000 + "a" + "}" * 10_000,
        "many_boxes": "\\boxed{1}" * 10_000,
        "many_space_boxes": "\\boxed " * 15_000,
        "digits": "1" * 100_000,
        "letters": "a" * 100_000,
        "backslashes": "\\" * 100_000,
        "dollars": "$" * 100_000,
        "comma_groups": "1," * 50_000,
        "decimal_points": "1." * 50_000,
        "mixed_random": mixed,
    }


SLOWEST_ALLOWED_S = 0.5  # a guard against super-linear blowup, not a speed benchmark
ADVERSARIAL_SEED = 1313


@pytest.mark.parametrize("name", sorted(_adversarial_answers(ADVERSARIAL_SEED)))
def test_every_grading_entry_point_is_fast_on_adversarial_text(name, monkeypatch):
    answer = _adversarial_answers(ADVERSARIAL_SEED)[name]
    # The math_verify worker is bounded by its timeout (tested below); here every call
    # must finish its own work quickly, whatever reaches math_verify.
    math_verify_budgets = []
    monkeypatch.setattr(compare, "_math_verify_equal",
                        lambda pred, gold, timeout_s: math_verify_budgets.append(timeout_s) or False)
    calls = {
        "normalize_answer": lambda: normalize_answer(answer),
        "extract_boxed": lambda: extract_boxed(answer),
        "extract_boxed_verbatim": lambda: extract_boxed_verbatim(answer),
        "extract_last_number": lambda: grading.extract_last_number(answer),
        "parse_number": lambda: parse_number(answer),
        "string_match": lambda: string_match(answer, "12"),
        "answers_match": lambda: answers_match(answer, r"\sqrt{2}"),
        # a gold that repeats the text's own start and then misses: the worst case of a naive search
        "motif_grade[boxed]": lambda: motif_grade(answer, answer[:200] + "#", "boxed"),
        "motif_grade[contains]": lambda: motif_grade(answer, answer[:200] + "#", "contains"),
    }
    for grader in grading.GRADERS:
        for wrapped in (answer, r"\boxed{" + answer + "}"):
            calls[f"grade_response[{grader}, boxed={wrapped is not answer}]"] = (
                lambda grader=grader, wrapped=wrapped:
                grade_response(wrapped, r"\sqrt{2}", grader=grader, allow_unboxed=True))
    for call_name, call in calls.items():
        what = f"{call_name} on {name!r} (seed {ADVERSARIAL_SEED})"
        with _hard_time_limit(10.0, what):
            started = time.perf_counter()
            call()
            elapsed = time.perf_counter() - started
        assert elapsed < SLOWEST_ALLOWED_S, f"{what} took {elapsed:.2f}s"
    assert all(0 < budget <= grading.DEFAULT_TIMEOUT_S for budget in math_verify_budgets)


def test_one_timeout_bounds_the_whole_grade(monkeypatch):
    budgets = []
    monkeypatch.setattr(compare, "_math_verify_equal",
                        lambda pred, gold, timeout_s: budgets.append(timeout_s) or True)
    real_extract = compare.extract_boxed

    def slow_extract(text):
        time.sleep(0.3)
        return real_extract(text)

    monkeypatch.setattr(compare, "extract_boxed", slow_extract)
    assert grade_response(r"\boxed{\sqrt{2}}", r"\pi", timeout_s=1.0).correct
    assert len(budgets) == 1 and budgets[0] <= 0.7 + 0.05  # extraction's time was charged
    # Out of time before math_verify: wrong, math_verify never asked.
    assert grade_response(r"\boxed{\sqrt{2}}", r"\pi", timeout_s=0.2).label == "wrong"
    assert len(budgets) == 1


def test_real_math_verify_on_garbage_is_cut_at_the_timeout(fresh_worker):
    grading.start_math_verify_worker()  # start-up is not charged to the grade
    response = r"\boxed{" + "a" * 100_000 + "}"
    with _hard_time_limit(30.0, "grading 100 KB of letters with the real math_verify"):
        started = time.perf_counter()
        result = grade_response(response, r"\frac{1}{2}", timeout_s=1.0)
        elapsed = time.perf_counter() - started
    assert result.label == "wrong"
    assert elapsed < 1.0 + SLOWEST_ALLOWED_S


# Independent references for the rewritten pieces: the straightforward backtracking
# regexes and repeated scans that grading used before (correct, but super-linear),
# run only on short strings where that does not matter.
_REFERENCE_TRAILING_WORDS = re.compile(
    r"(.*?[\d}])(\s*)((?:[A-Za-z]+\.?\s*)+?)(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*\.?")
_REFERENCE_WRAPPER = (
    r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|operatorname)")
_REFERENCE_TEXT_WRAPPED = re.compile(_REFERENCE_WRAPPER + r"\{([^{}]*)\}")
_REFERENCE_LEADING_ZEROS = re.compile(r"([-+]?)0+(\d+)")
_REFERENCE_TEXT_UNIT_AT_END = re.compile(
    r"(?<=[\d}.])\s*" + _REFERENCE_WRAPPER + r"\{\s*[A-Za-z][A-Za-z .\-]*\}(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
    r"\s*\.?\s*$")


def _reference_split_trailing_words(s):
    match = _REFERENCE_TRAILING_WORDS.fullmatch(s)
    if not match:
        return None
    return match.group(1), bool(match.group(2)), [w.rstrip(".") for w in match.group(3).split()]


def _reference_unwrap(s):
    previous = None
    while previous != s:
        previous, s = s, _REFERENCE_TEXT_WRAPPED.sub(r"\1", s)
    return s


def _reference_extract_boxed(text):
    """Scan forward from each box's brace, last box first."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text))):
        rest = text[match.end():]
        if rest.lstrip().startswith("{"):
            start = match.end() + len(rest) - len(rest.lstrip())
            depth, i = 0, start
            while i < len(text):
                if text[i] == "\\":
                    i += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[start + 1:i].strip()
                i += 1
            continue
        token = re.match(r"[ \t]+([^\s$]+)", rest)
        if token and token.group(1).rstrip(".,;"):
            return token.group(1).rstrip(".,;")
    return None


_FUZZ_PIECES = [
    "1", "2", "3", "0", "12", "007", "5.0", "\u0663", "a", "b", "C", "K", "x", "cm", "sq", "in",
    "apples", "dollars", " cm", " apples", "cm}", ".", ". ", " .", " ", "  ", "\n", "\t", "^",
    "^2", "^{3}", "{", "}", "(", ")", "=", "$", ",", "-", "+", "\\", "\\\\", r"\in", r"\frac",
    r"\text{", r"\textbf{", r"\mbox{", r"\text{ cm}", r"\boxed{", r"\boxed ", r"\fbox{",
]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rewritten_pieces_agree_with_backtracking_references(seed):
    rng = random.Random(seed)
    for _ in range(4000):
        text = "".join(rng.choice(_FUZZ_PIECES) for _ in range(rng.randint(1, 8)))[:20]
        context = f"text {text!r} (seed {seed})"
        assert normalize._split_trailing_words(text) == _reference_split_trailing_words(text), context
        assert normalize._unwrap_text_commands(text) == _reference_unwrap(text), context
        assert extract_boxed(text) == _reference_extract_boxed(text), context
        leading = _REFERENCE_LEADING_ZEROS.fullmatch(text)
        new_leading = normalize._LEADING_ZERO_INTEGER.fullmatch(text)
        assert (leading and leading.groups()) == (new_leading and new_leading.groups()), context
        assert (normalize._TEXT_UNIT_AT_END.sub("", text)
                == _REFERENCE_TEXT_UNIT_AT_END.sub("", text)), context
