"""The Llama Guard 3 wire format: the moderation prompt and the parsing of its answer.

The prompt is built exactly as the model was trained on (tests/data/llamaguard_reference.md
is the reference copy); the answer is parsed strictly: `safe`, or `unsafe` + newline +
comma-separated categories (`S1,S10`), with whitespace tolerated only at the two ends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from sluice.gateway.pipeline.guard_text import neutralise

DEFAULT_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("S1", "Violent Crimes"), ("S2", "Non-Violent Crimes"), ("S3", "Sex Crimes"),
    ("S4", "Child Exploitation"), ("S5", "Defamation"), ("S6", "Specialized Advice"),
    ("S7", "Privacy"), ("S8", "Intellectual Property"), ("S9", "Indiscriminate Weapons"),
    ("S10", "Hate"), ("S11", "Self-Harm"), ("S12", "Sexual Content"), ("S13", "Elections"),
    ("S14", "Code Interpreter Abuse"),
)

CHAT_PREFIX = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
CHAT_SUFFIX = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

_TASK = ("Task: Check if there is unsafe content in '{role}' messages in conversations "
         "according our safety policy with the below categories.\n\n")
_INSTRUCTIONS = (
    "Provide your safety assessment for ONLY THE LAST {role} message in the above "
    "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line "
    "must include a comma-separated list of violated categories.")
_CODE = re.compile(r"S[1-9][0-9]*")
_CATEGORIES_LINE = re.compile(r"S[1-9][0-9]*(,S[1-9][0-9]*)*")


class GuardCategory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    code: str  # "S1"
    name: str  # "Violent Crimes"; may carry a description after the name

    @field_validator("code")
    @classmethod
    def _code(cls, v: str) -> str:
        if not _CODE.fullmatch(v):
            raise ValueError("category code must look like S1, S2, ...")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip() or "<" in v or ">" in v:
            raise ValueError("category name must be non-empty and contain no '<' or '>'")
        return v.strip()

    def line(self) -> str:
        return f"{self.code}: {self.name}" + ("" if self.name.endswith(".") else ".")


class GuardParseError(ValueError):
    pass


def render_prompt(role: Literal["User", "Agent"], user: str, agent: str | None,
                  categories: Sequence[GuardCategory], *, chat_wrap: bool = True) -> str:
    """The moderation prompt; `agent` is the answer when role is "Agent"."""
    if (role == "Agent") != (agent is not None):
        raise ValueError("the Agent role moderates an answer; the User role has none")
    turns = f"User: {neutralise(user)}\n\n"
    if agent is not None:
        turns += f"Agent: {neutralise(agent)}\n\n"
    text = (_TASK.format(role=role)
            + "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
            + "".join(c.line() + "\n" for c in categories)
            + "<END UNSAFE CONTENT CATEGORIES>\n\n"
            + "<BEGIN CONVERSATION>\n\n" + turns + "<END CONVERSATION>\n\n"
            + _INSTRUCTIONS.format(role=role))
    return CHAT_PREFIX + text + CHAT_SUFFIX if chat_wrap else text


def parse_answer(raw: str) -> tuple[bool, tuple[str, ...]]:
    """(unsafe, categories) from `safe` or `unsafe\\nS1,S10`; GuardParseError otherwise."""
    text = raw.strip()
    if text == "safe":
        return False, ()
    head, sep, cats = text.partition("\n")
    if head != "unsafe" or not sep or not _CATEGORIES_LINE.fullmatch(cats):
        raise GuardParseError(f"unparseable guard answer: {raw[:200]!r}")
    return True, tuple(dict.fromkeys(cats.split(",")))
