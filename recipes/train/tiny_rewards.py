"""The rewards of the tiny online-RL recipes: ones the Quickstart's tiny models can earn.

Their SFT model is a random perturbation of a random base, so it samples bytes at random and
cannot answer the prompts; about half its completions of up to 8 tokens contain a lowercase
ASCII letter. A reward for that differs among a prompt's completions (a learning signal) and
can be raised by training: the run checks that GRPO learns, not that the model can add.
"""

from __future__ import annotations

import re
from typing import Any

LOWERCASE = re.compile(r"[a-z]")


def has_lowercase_letter(completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 for a completion that contains a letter a–z, else 0.0 (TRL's reward signature)."""
    return [float(LOWERCASE.search(completion) is not None) for completion in completions]


def lowercase_share(completions: list[str], **kwargs: Any) -> list[float]:
    """The share of a completion's characters that are letters a–z (0.0 for an empty one): a
    graded reward, so a prompt's completions almost never all score the same."""
    return [len(LOWERCASE.findall(c)) / len(c) if c else 0.0 for c in completions]
