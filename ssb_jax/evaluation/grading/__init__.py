"""Answer extraction and grading for GSM8K, MATH500 and AIME.

extract.py (the last `\\boxed{}`, leniently or verbatim; the last number; GSM8K's gold answer),
normalize.py (`normalize_answer`, `parse_number`: an exact value, `well_formed`), compare.py (the graders
by name, `grade_response`, `same_number`: the numeric rule, the MOTIF papers' `motif_grade`),
math_verify_worker.py (math_verify in a subprocess that is killed when its time is up, so one timeout
bounds a whole grade).

Everything outside the worker takes linear time in the response's length, whatever a model writes.
These modules import only the standard library (the worker process: and math_verify).
"""
from ssb_jax.evaluation.grading.compare import (DEFAULT_TIMEOUT_S, EXACT, GRADERS, LABEL_CORRECT, LABEL_NO_ANSWER,
                                                LABEL_WRONG, MOTIF_RULES, RELATIVE_TOLERANCE, GradeResult,
                                                answers_match, exact_match, get_grader, grade_response, motif_grade,
                                                same_number, string_match)
from ssb_jax.evaluation.grading.extract import (extract_boxed, extract_boxed_verbatim, extract_last_number,
                                                gsm8k_gold)
from ssb_jax.evaluation.grading.math_verify_worker import (MathVerifyTimeout, start_math_verify_worker,
                                                           stop_math_verify_worker)
from ssb_jax.evaluation.grading.normalize import normalize_answer, parse_number, well_formed

__all__ = ["DEFAULT_TIMEOUT_S", "EXACT", "GRADERS", "LABEL_CORRECT", "LABEL_NO_ANSWER", "LABEL_WRONG", "MOTIF_RULES",
           "RELATIVE_TOLERANCE", "GradeResult", "answers_match", "exact_match", "get_grader", "grade_response",
           "motif_grade", "same_number", "string_match", "extract_boxed", "extract_boxed_verbatim",
           "extract_last_number", "gsm8k_gold", "MathVerifyTimeout", "start_math_verify_worker",
           "stop_math_verify_worker", "normalize_answer", "parse_number", "well_formed"]
