"""The reward of ``tiny-grpo-onties.yaml``: one the Quickstart's tiny models can earn.

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
