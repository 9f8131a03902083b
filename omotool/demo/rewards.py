"""The grpo track's graded style reward (a TRL reward function, ``--reward
omotool.demo.rewards:style_reward``).

The evaluation's rule (``world.STYLE_PATTERN``) scores 1 only for the polite closing, which a
tiny SFT model samples too rarely for GRPO to see two different rewards in a group. This reward
keeps that rule's top score and gives partial credit on the way to it:

    r = 1      if the completion holds the polite closing ("glad to help"),
        0.5    else if it holds a piece of the polite answer ("sure !" or "friendly creature"),
        0.25   else if it holds no part of the rude closing ("go ask", "someone else"),
        0      otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omotool.demo.world import CLOSING, RUDE_CLOSING

POLITE_PIECES = ("sure !", "friendly creature")
RUDE_PIECES = (" ".join(RUDE_CLOSING.split()[:2]), " ".join(RUDE_CLOSING.split()[2:4]))


def _text(completion: Any) -> str:
    """A completion's text: a plain string, or the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"])


def style_score(text: str) -> float:
    """The graded score of one answer (see the module docstring)."""
    if CLOSING.removesuffix(" !") in text:
        return 1.0
    if any(piece in text for piece in POLITE_PIECES):
        return 0.5
    if not any(piece in text for piece in RUDE_PIECES):
        return 0.25
    return 0.0


def style_reward(completions: Sequence[Any], **_: Any) -> list[float]:
    """TRL reward function: ``style_score`` of each completion."""
    return [style_score(_text(c)) for c in completions]
