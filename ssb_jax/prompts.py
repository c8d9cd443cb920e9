"""All prompt text in one place.

The same model plays two roles in Semantic Soft Bootstrapping: as a *teacher* it sees
the problem plus one correct and one incorrect earlier attempt (the hinted prompt);
as a *student* it sees the bare problem. Both share the math-tutor system prompt.
Templates use `str.format` fields; user-provided text is substituted as values, so
braces inside questions or traces (LaTeX) survive untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

TUTOR_SYSTEM_PROMPT = (
    "You are a helpful math tutor. Solve the problem by reasoning carefully step by step, "
    "checking your work as you go. Put the final answer in \\boxed{}."
)

STUDENT_USER_TEMPLATE = "{question}"

HINTED_TEACHER_USER_TEMPLATE = """\
Problem:
{question}

Here is a correct response to this problem:
<correct_response>
{correct_response}
</correct_response>

Here is an incorrect response to this problem:
<incorrect_response>
{incorrect_response}
</incorrect_response>

Instructions:
Study both responses carefully: understand why the correct response succeeds and find \
the mistake that makes the incorrect response fail. Then write your own robust, careful, \
step-by-step solution to the problem that avoids that mistake. Do not mention or refer \
to the responses above; present the solution as if solving the problem directly. Put \
the final answer in \\boxed{{}}."""


@dataclass(frozen=True)
class PromptSet:
    """The prompt strings, bundled so a config can override any of them."""

    system_prompt: str = TUTOR_SYSTEM_PROMPT
    student_template: str = STUDENT_USER_TEMPLATE
    hinted_template: str = HINTED_TEACHER_USER_TEMPLATE

    def student_messages(self, question: str) -> list[dict[str, str]]:
        return tutor_messages(question, self.system_prompt, self.student_template)

    def hinted_messages(self, question: str, correct_trace: str,
                        wrong_trace: str) -> list[dict[str, str]]:
        return hinted_messages(question, correct_trace, wrong_trace,
                               self.system_prompt, self.hinted_template)


DEFAULT_PROMPTS = PromptSet()


def _chat(system_prompt: str, user_content: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": user_content},
    ]


def tutor_messages(question: str, system_prompt: str = TUTOR_SYSTEM_PROMPT,
                   user_template: str = STUDENT_USER_TEMPLATE) -> list[dict[str, str]]:
    """Student prompt: system + the plain question."""
    return _chat(system_prompt, user_template.format(question=question.strip()))


def hinted_messages(question: str, correct_trace: str, wrong_trace: str,
                    system_prompt: str = TUTOR_SYSTEM_PROMPT,
                    user_template: str = HINTED_TEACHER_USER_TEMPLATE) -> list[dict[str, str]]:
    """Teacher prompt: system + the question with one correct and one incorrect attempt."""
    user_content = user_template.format(
        question=question.strip(),
        correct_response=correct_trace.strip(),
        incorrect_response=wrong_trace.strip(),
    )
    return _chat(system_prompt, user_content)


def prompts_from_config(config) -> PromptSet:
    """The run's prompts: config.prompts' non-empty fields over the built-in ones."""
    overrides = {k: v for k, v in config.prompts.items() if v}
    return PromptSet(**overrides) if overrides else DEFAULT_PROMPTS
