"""Privileged contexts: what the teacher sees besides the question, and the types that keep it from the student.

The student's input is a `StudentInput`: a question's id and its text, nothing else. It is rendered by the
student template alone (`student_prompt_ids`), which accepts no other type, so no context (and no answer a
context carries) can reach the student's sequence: there is no field to put it in.

The teacher's input is a `TeacherInput`: a StudentInput and a `PrivilegedContext`, rendered as one chat
(`teacher_prompt_ids`). Three builders make contexts:

- `ssb_context(record)`: SSB's hint from a curation record (one correct and the most common wrong answer of
  the model's own rollouts, chosen by curate.select_traces), in the hinted prompt of curation itself.
- `reference_context(problem)`: the dataset's worked solution (Problem.extra["solution"]; GSM8K's answer
  field before "####", the toy world's solution), as OPSD's teacher sees it.
- `peer_context(question, texts, correct, i)`: a successful other sample of the same group (SDPO), or None
  when no other sample of the group succeeded (that sample then has no teacher and trains on nothing).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from ssb_jax.data.datasets import Problem
from ssb_jax.model.tokenizer import encode_chat
from ssb_jax.prompts import PromptSet

KINDS = ("ssb", "reference", "peer")

REFERENCE_TEACHER_USER_TEMPLATE = """\
Problem:
{question}

Here is a reference solution to this problem:
<reference_solution>
{context}
</reference_solution>

Instructions:
Study the reference solution until you understand every step. Then write your own careful, step-by-step \
solution to the problem. Do not mention or refer to the reference solution; present the solution as if \
solving the problem directly. Put the final answer in \\boxed{{}}."""

PEER_TEACHER_USER_TEMPLATE = """\
Problem:
{question}

Here is a successful earlier attempt at this problem:
<successful_attempt>
{context}
</successful_attempt>

Instructions:
Understand why the attempt succeeds. Then write your own careful, step-by-step solution to the problem. \
Do not mention or refer to the attempt; present the solution as if solving the problem directly. Put the \
final answer in \\boxed{{}}."""

_TEMPLATES = {"reference": REFERENCE_TEACHER_USER_TEMPLATE, "peer": PEER_TEACHER_USER_TEMPLATE}


@dataclasses.dataclass(frozen=True, slots=True)
class StudentInput:
    """What the student sees: a question, by id and text. No other field exists, so a privileged context
    cannot be part of the student's input."""
    problem_id: str
    question: str

    def __post_init__(self):
        for name in ("problem_id", "question"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"StudentInput.{name} must be a str, got {type(getattr(self, name)).__name__}")

    @classmethod
    def of(cls, problem: Problem) -> StudentInput:
        return cls(problem_id=str(problem.id), question=problem.question)


@dataclasses.dataclass(frozen=True, slots=True)
class PrivilegedContext:
    """A context of one kind (KINDS): SSB's correct and wrong traces, or one text (a reference solution,
    a peer's sample)."""
    kind: str
    text: str = ""
    correct_trace: str = ""
    wrong_trace: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"context kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class TeacherInput:
    """What the teacher sees: the student's question and a privileged context."""
    student: StudentInput
    context: PrivilegedContext


def student_messages(student: StudentInput, prompts: PromptSet) -> list[dict[str, str]]:
    """The student's chat: the tutor system prompt and the plain question (a StudentInput only)."""
    if type(student) is not StudentInput:
        raise TypeError(f"the student's prompt is made from a StudentInput only, got {type(student).__name__}")
    return prompts.student_messages(student.question)


def teacher_messages(teacher: TeacherInput, prompts: PromptSet) -> list[dict[str, str]]:
    """The teacher's chat: the question with its privileged context."""
    if type(teacher) is not TeacherInput:
        raise TypeError(f"the teacher's prompt is made from a TeacherInput, got {type(teacher).__name__}")
    question, context = teacher.student.question, teacher.context
    if context.kind == "ssb":
        return prompts.hinted_messages(question, context.correct_trace, context.wrong_trace)
    user = _TEMPLATES[context.kind].format(question=question.strip(), context=context.text.strip())
    return [{"role": "system", "content": prompts.system_prompt}, {"role": "user", "content": user}]


def student_prompt_ids(student: StudentInput, tokenizer, prompts: PromptSet) -> list[int]:
    return encode_chat(tokenizer, student_messages(student, prompts))


def teacher_prompt_ids(teacher: TeacherInput, tokenizer, prompts: PromptSet) -> list[int]:
    return encode_chat(tokenizer, teacher_messages(teacher, prompts))


# ----------------------------------------------------------------------------- the three builders

def ssb_context(record: Mapping) -> PrivilegedContext:
    """SSB's hint from a curation record that has one (a mixed group: curate.select_traces chose the traces)."""
    missing = [key for key in ("correct_trace", "wrong_trace") if not record.get(key)]
    if missing:
        raise ValueError(f"curation record {record.get('id')!r} has no {' or '.join(missing)} (not a mixed group)")
    return PrivilegedContext(kind="ssb", correct_trace=record["correct_trace"], wrong_trace=record["wrong_trace"])


def reference_context(problem: Problem) -> PrivilegedContext:
    """The dataset's worked solution of `problem` (its "solution" field)."""
    solution = problem.extra.get("solution") if problem.extra else None
    if not isinstance(solution, str) or not solution.strip():
        raise ValueError(f"problem {problem.id!r} ({problem.source}) has no reference solution: the context "
                         "'reference' reads a 'solution' field (GSM8K's worked answer, the toy world's solution)")
    return PrivilegedContext(kind="reference", text=solution)


def peer_context(texts: Sequence[str], correct: Sequence[bool], i: int) -> PrivilegedContext | None:
    """For sample i of a group, the first other sample that is correct, or None when there is none."""
    for j, (text, ok) in enumerate(zip(texts, correct)):
        if j != i and ok:
            return PrivilegedContext(kind="peer", text=text)
    return None


def has_ssb_context(record: Mapping) -> bool:
    return bool(record.get("correct_trace")) and bool(record.get("wrong_trace"))
