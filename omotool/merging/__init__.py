"""Merging rules shared by ``delta``, ``merge-offline`` and the online-merging optimizer.

``sparsify`` decides which entries of a delta survive (DARE, magnitude top-k) and how the
survivors are rescaled; ``consensus`` combines several deltas (TIES sign election, disjoint mean).
"""

from omotool.merging.consensus import agreement_mask, disjoint_merge, elect_sign
from omotool.merging.sparsify import (
    RESCALES,
    SPARSIFIERS,
    Sparsifier,
    bernoulli_indices,
    dare,
    kept_count,
    key_seed,
    keyed_generator,
    kth_largest,
    magnitude,
    magnitude_mask,
    magnitude_topk_indices,
    rescale,
)

__all__ = [
    "RESCALES",
    "SPARSIFIERS",
    "Sparsifier",
    "agreement_mask",
    "bernoulli_indices",
    "dare",
    "disjoint_merge",
    "elect_sign",
    "key_seed",
    "keyed_generator",
    "kept_count",
    "kth_largest",
    "magnitude",
    "magnitude_mask",
    "magnitude_topk_indices",
    "rescale",
]
