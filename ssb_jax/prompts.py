"""All prompt text in one place.

The same model plays two roles in Semantic Soft Bootstrapping: as a *teacher* it sees
the problem plus one correct and one incorrect earlier attempt (the hinted prompt);
as a *student* it sees the bare problem. Both share the math-tutor system prompt.
Templates use `str.format` fields; user-provided text is substituted as values, so
braces inside questions or traces (LaTeX) survive untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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


# Evaluation-only system prompts (EvalConfig.system_prompt): how other papers' rows were generated.
# MOTIF (Mitra & Ulukus 2025, arXiv 2507.02851), whose base and GRPO rows the SSB paper reports: the strings
# below are the ones its repository's evaluation uses (github.com/purbeshmitra/MOTIF, vanilla_grpo.py:
# SYSTEM_PROMPT_base for the base on MATH500 and AIME24; SYSTEM_PROMPT, the GRPO training prompt, for the GRPO
# model on MATH500; no system message for the GRPO model on AIME24), with the question alone as the user
# message. Reproduced verbatim because an evaluation "as MOTIF did" needs the same tokens.
MOTIF_BASE_SYSTEM_PROMPT = ("You are a helpful assistant. In your response, you enclose your final answer in the "
                            "box: \\boxed{}.")
MOTIF_XML_SYSTEM_PROMPT = """\
You are a helpful assistant.
When the user asks a question, you first think about the reasoning process in mind and then provide the user \
with an answer.
The reasoning process and the answer are enclosed within <reasoning> </reasoning> and <answer> </answer> tags, \
respectively.
In your answer, you also enclose your final answer in the box: \\boxed{}.
Therefore, you respond in the following strict format:
<reasoning>
reasoning process here
</reasoning>
<answer>
answer here
</answer>
"""
NO_SYSTEM_MESSAGE = ""   # a PromptSet with this system prompt sends no system message (the chat template's own)
# name -> system prompt; a preset also sets the user message to the bare question
EVAL_SYSTEM_PROMPTS: dict[str, str] = {
    "motif_base": MOTIF_BASE_SYSTEM_PROMPT,     # MOTIF's base rows (MATH500 and AIME24)
    "motif_xml": MOTIF_XML_SYSTEM_PROMPT,       # MOTIF's GRPO row on MATH500 (its training prompt)
    "chat_default": NO_SYSTEM_MESSAGE,          # MOTIF's GRPO row on AIME24: no system message
}


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
    """The messages; an empty system prompt (NO_SYSTEM_MESSAGE) sends none, so the chat template's
    default applies (Qwen2.5's "You are Qwen, created by Alibaba Cloud. ...")."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt != NO_SYSTEM_MESSAGE else []
    return [*system, {"role": "user", "content": user_content}]


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


def eval_prompt_set(prompts: PromptSet, system_prompt: str) -> PromptSet:
    """The prompts an evaluation uses: `prompts` (the run's) when system_prompt is empty; a preset of
    EVAL_SYSTEM_PROMPTS with the bare question as the user message; else that text as the system message."""
    if not system_prompt:
        return prompts
    if system_prompt in EVAL_SYSTEM_PROMPTS:
        return replace(prompts, system_prompt=EVAL_SYSTEM_PROMPTS[system_prompt],
                       student_template=STUDENT_USER_TEMPLATE)
    return replace(prompts, system_prompt=system_prompt)
