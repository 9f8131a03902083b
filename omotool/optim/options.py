"""The online-merging options, each declared once: ``MergeFields`` (no torch).

Each field is one option, declared with a ``MergeOption``: its default, help text, the values
it takes (``choices``, ``bounds``), the methods that read it (``merges``) and what it does
(``does``). Everything else is derived from it: ``functional.MergeOptions`` (these fields, with
``validate``), the keyword arguments of ``OnlineMergingAdamW`` and ``OnlineMerging``
(``references.takes_merge_options``), and the merge options of ``omotool train``
(``omotool.train.options``: flags, recipe keys, range checks, refusals). Adding a merge option
is adding a field here (and reading it where a rule or backend needs it).

The equations the options enter are in ``omotool.optim.functional``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omotool.config import Option, above, at_least, declare, within

MERGES = ("none", "dare", "ties")
"""The online merge rules' names (``functional.MERGE_RULES``, which needs torch; a test keeps
the two equal)."""
MERGING = ("dare", "ties")  # those that merge (read a task vector)
MISSING_POLICIES = ("error", "adamw")


@dataclass(frozen=True)
class MergeOption(Option):
    """An option that only some merge methods may read (see ``omotool.config.Option`` for the
    common part): ``merges``, the methods that read it (empty: every one); ``does``, what it
    does (the refusal of an option set for a method that does not read it says so)."""

    merges: tuple[str, ...] = ()
    does: str = ""


def _merge(default: Any, help: str, **details: Any) -> Any:
    return declare(default, MergeOption(help, **details))


@dataclass(frozen=True)
class MergeFields:
    """Every online-merging option (``functional.MergeOptions`` adds their checks)."""

    method: str = _merge(
        "dare", "Online merging: none (AdamW), dare (OnDARE) or ties (OnTIES).", choices=MERGES
    )
    # F keeps the fraction p of Δθ's entries, and of τ's (T = F(τ_r)).
    reserve_p: float = _merge(
        0.01, "Fraction p of the update (and of tau) kept.", merges=MERGING,
        bounds=within("(0, 1]", "the fraction kept"),
        does="sets the fraction of each update and of τ a merge keeps",
    )  # fmt: skip
    # α weighs T; 1 − α weighs F(Δθ).
    alpha: float = _merge(
        1e-7, "Weight of the SFT task vector in each merge.", merges=MERGING,
        bounds=within("[0, 1]"), does="weighs the task vector in each merge",
    )  # fmt: skip
    # K of step-K (Alg. 2): K − 1 plain Adam steps cached, then one merge of their sum.
    online_step: int = _merge(
        1, "Merge every K steps (step-K); 1 = every step.", merges=MERGING, bounds=at_least(1),
        does="sets how many steps pass between merges",
    )  # fmt: skip
    # Survivors of F scaled by 1/p (inverse: the released code's dropout), left as they are
    # (none: the paper's text) or scaled to the dense L1 norm (l1); Δθ and τ_r alike. None:
    # the rule's default (MergeRule.default_rescale).
    rescale: str | None = _merge(
        None, "none, inverse (1/p) or l1. [default: inverse for dare, none for ties]",
        merges=MERGING, choices="omotool.merging:RESCALES",
        does="sets how the entries a merge keeps are scaled",
    )  # fmt: skip
    # OnTIES elects signs on T + F(Δθ) (unweighted: the released code) or on
    # α·T + (1 − α)·F(Δθ) (weighted: the paper's Eq. 7).
    election: str = _merge(
        "unweighted", "OnTIES sign election: unweighted, weighted.", merges=("ties",),
        choices="omotool.merging.consensus:ELECTIONS",
        does="chooses the sign election, which only OnTIES holds",
    )  # fmt: skip
    # OnDARE clamps T to [−c, c] after rescaling (the released code: 1); OnTIES never clips.
    tau_clip: float | None = _merge(
        1.0, "OnDARE clamps the kept tau to [-C, C] after rescaling;", merges=("dare",),
        bounds=above(0), none="no clamp",
        does="clamps the kept task vector, which only OnDARE does",
    )  # fmt: skip
    # A parameter the task vector has no entry for: refused (error) or trained with plain
    # AdamW (adamw). A shape mismatch is always an error.
    missing: str = _merge(
        "error", "A parameter the task vector lacks: error, or adamw (trained unmerged).",
        merges=MERGING, choices=MISSING_POLICIES,
        does="decides how parameters the task vector lacks train",
    )  # fmt: skip
    # Keys every random mask, with the step and the parameter's name.
    seed: int = _merge(0, "Seed of the merge masks (with the step and the parameter name).")
