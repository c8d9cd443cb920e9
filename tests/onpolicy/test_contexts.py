"""Privileged contexts: each builder, and that no context can reach the student's input (the student's type has
no place for one, the renderers refuse the other type, and the batches the trainer builds hold the context in
the teacher's prompt only)."""
import dataclasses

import numpy as np
import pytest

from ssb_jax.data.datasets import Problem
from ssb_jax.onpolicy.config import OnPolicyConfig
from ssb_jax.onpolicy.contexts import (StudentInput, TeacherInput, peer_context, reference_context, ssb_context,
                                       student_messages, teacher_messages)
from ssb_jax.prompts import DEFAULT_PROMPTS
from ssb_jax.sampling.driver import Completion

GOLD = "4242"
QUESTION = "Ana has 7 apples and buys 6 bags of 7. How many apples now?"
RECORD = {"id": "q0", "question": QUESTION, "gold": GOLD, "verdict": "kept",
          "correct_trace": f"7 + 6 * 7 = 49. Hmm, recount: \\boxed{{{GOLD}}}", "wrong_trace": "7 + 6 + 7 = \\boxed{20}"}
PROBLEM = Problem(id="q0", question=QUESTION, answer=GOLD, source="test",
                  extra={"solution": f"Each bag holds 7, so ... the answer is \\boxed{{{GOLD}}}"})


class CharTokenizer:
    """One token per character (code point + 2), so decoding is exact; the chat template joins role and
    content."""
    eos_token_id = 1

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids)

    def get_vocab(self):
        return {}


def test_the_student_input_has_no_place_for_a_context():
    assert [f.name for f in dataclasses.fields(StudentInput)] == ["problem_id", "question"]
    context = reference_context(PROBLEM)
    with pytest.raises(TypeError):
        StudentInput(problem_id="q0", question=QUESTION, context=context)  # no such field
    with pytest.raises(TypeError, match="question must be a str"):
        StudentInput(problem_id="q0", question=context)
    student = StudentInput.of(PROBLEM)
    with pytest.raises((AttributeError, TypeError)):
        student.context = context  # frozen, and slots: no attribute can be added
    teacher = TeacherInput(student, context)
    with pytest.raises(TypeError, match="from a StudentInput only"):
        student_messages(teacher, DEFAULT_PROMPTS)
    with pytest.raises(TypeError, match="from a TeacherInput"):
        teacher_messages(student, DEFAULT_PROMPTS)
    assert student_messages(student, DEFAULT_PROMPTS) == DEFAULT_PROMPTS.student_messages(QUESTION)


def test_ssb_context_is_curations_hinted_prompt():
    context = ssb_context(RECORD)
    messages = teacher_messages(TeacherInput(StudentInput.of(PROBLEM), context), DEFAULT_PROMPTS)
    assert messages == DEFAULT_PROMPTS.hinted_messages(QUESTION, RECORD["correct_trace"], RECORD["wrong_trace"])
    with pytest.raises(ValueError, match="'q1' has no wrong_trace"):
        ssb_context({"id": "q1", "correct_trace": "x"})


def test_reference_context_is_the_datasets_solution():
    context = reference_context(PROBLEM)
    user = teacher_messages(TeacherInput(StudentInput.of(PROBLEM), context), DEFAULT_PROMPTS)[1]["content"]
    assert PROBLEM.extra["solution"] in user and QUESTION in user
    with pytest.raises(ValueError, match="problem 'q9' .* has no reference solution"):
        reference_context(Problem(id="q9", question="?", answer="1", source="test"))


def test_peer_context_is_another_successful_sample_of_the_group():
    texts = ["wrong a", "right b", "right c"]
    assert peer_context(texts, [False, True, True], 0).text == "right b"
    assert peer_context(texts, [False, True, True], 1).text == "right c"  # never the sample itself
    assert peer_context(texts, [False, True, False], 1) is None            # no other success: no teacher
    assert peer_context(texts, [False, False, False], 0) is None


class GroupSampler:
    """Two samples per question: a right one and a wrong one (real token ids of the char tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def set_adapters(self, lora):
        pass

    def generate_ids(self, prompts, sampling, *, n, seed, ids):
        texts = [f"so \\boxed{{{GOLD}}}", "so \\boxed{3}"][:n]
        return [[Completion(token_ids=self.tokenizer.encode(t) + [1], finish_reason="stop", text=t) for t in texts]
                for _ in ids]


@pytest.mark.parametrize("kind", ["ssb", "reference", "peer"])
def test_the_trainers_batches_hold_the_context_in_the_teachers_prompt_only(kind):
    """The batch source's aligned batch: each row's student prompt is the rendered plain question, with no trace
    of the context (whose text holds the gold answer), while the teacher's prompt holds the context."""
    from ssb_jax.onpolicy.run import SampleSource, dataset_questions, ssb_questions
    from ssb_jax.sampling.sampler import SamplingParams
    tokenizer = CharTokenizer()
    oc = OnPolicyConfig(context=kind, prompts_per_step=1, samples_per_prompt=2, grader="string_match")
    questions = ssb_questions([RECORD]) if kind == "ssb" else dataset_questions([PROBLEM], kind)
    source = SampleSource(GroupSampler(tokenizer), questions, tokenizer, DEFAULT_PROMPTS,
                          SamplingParams(max_new_tokens=32), oc, rows=2)
    it = source.next_batch({"lora": {}})
    batch = it.batch["onpolicy"]
    assert it.correct == [True, False]
    rows = np.flatnonzero(batch.row_valid)
    assert len(rows) == (1 if kind == "peer" else 2)  # peer: only the wrong sample has a successful other
    expected_student = tokenizer.apply_chat_template(DEFAULT_PROMPTS.student_messages(QUESTION))
    context_text = {"ssb": RECORD["wrong_trace"], "reference": PROBLEM.extra["solution"],
                    "peer": f"so \\boxed{{{GOLD}}}"}[kind]
    for row in rows:
        student_prompt = tokenizer.decode(batch.student_tokens[row, :batch.student_index[row, 0] + 1])
        teacher_prompt = tokenizer.decode(batch.teacher_tokens[row, :batch.teacher_index[row, 0] + 1])
        assert student_prompt == expected_student
        assert GOLD not in student_prompt and context_text not in student_prompt
        assert context_text in teacher_prompt and QUESTION in teacher_prompt
        # both sides are then the same sampled completion, at aligned positions
        n = batch.answer_mask[row].sum()
        np.testing.assert_array_equal(batch.student_tokens[row, batch.student_index[row, :n] + 1],
                                      batch.teacher_tokens[row, batch.teacher_index[row, :n] + 1])
