"""Dolly's prompt format, shared by training (minidolly/data.py) and generation.

The strings are Databricks' own (databrickslabs/dolly, training/consts.py), so a model we
train answers prompts the released dolly-v2 models were trained on, and vice versa.
"""

from __future__ import annotations

from .tokenizer import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY

INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_prompt(instruction: str, context: str | None = None) -> str:
    """The text the model sees before it answers: intro, instruction, optional input, and
    the `### Response:` key followed by a newline (the model's answer starts after it)."""
    if context:
        return f"{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\nInput:\n{context}\n\n{RESPONSE_KEY}\n"
    return f"{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{RESPONSE_KEY}\n"


def format_training_example(instruction: str, response: str, context: str | None = None) -> str:
    """A whole training text: the prompt, the response, and `### End` (Dolly appends no EOS)."""
    return f"{format_prompt(instruction, context)}{response}\n\n{END_KEY}"
