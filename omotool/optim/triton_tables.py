"""The column layout of the tables the ``triton`` backend's launches read, shared by the host
(``backends.triton`` builds the rows) and the kernels (``triton_kernels`` reads them at
offsets derived from these lists): no column number is written twice.

A launch over many tensors reads each tensor's addresses and sizes from a table of int64 rows,
one per tensor, with the fields below in order (0 where a row has no value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ADAM_FIELDS = ("theta", "low", "grad", "exp_avg", "exp_avg_sq", "step", "dense_tau", "n")
"""The leading fields of the OnDARE and OnTIES tables (the kernels' shared Adam pass reads
them alike): θ, the bf16/fp16 θ written along (or θ), g, m, v, the device step, a dense T (or
θ), the entries."""

DARE_FIELDS = (*ADAM_FIELDS, "offset", "key", "first")
"""OnDARE (``dare_adamw_many_kernel``): then the global flat offset of this shard, the mask's
Philox key, and the row's first program."""

DARE_TAU_FIELDS = ("theta", "low", "tau_indices", "tau_values", "tau_count", "tau_first")
"""OnDARE's sparse ``T`` (``dare_tau_many_kernel``): θ, low θ, T's indices, values and count,
the row's first program."""

TIES_FIELDS = (
    *ADAM_FIELDS, "at", "first", "tau_indices", "tau_values", "tau_count", "tau_first", "k",
    "tau_form",
)  # fmt: skip
"""OnTIES (``ties_*_many_kernel``): then the offset in the update scratch, the row's first
program, T's indices, values, count and first program (sparse ``T``), ``k`` (the entries kept:
over the whole tensor if sharded), T's form (``TAU_DENSE`` / ``TAU_SPARSE`` bits; a shard's
``T`` may be dense on one rank and sparse on another, so it is read per row and not compiled
in)."""

PARTIAL_FIELDS = ("kept", "kept_sq", "overlap", "conflicts", "dropped_sq", "tau_sq")
"""A program's row of a step's statistics (``StepPartials``)."""

TAU_DENSE, TAU_SPARSE = 1, 2


def table_row(fields: Sequence[str], values: Mapping[str, int]) -> list[int]:
    """One row of a table of ``fields`` (0 where ``values`` has none); an unknown field name
    is an error, not a silently dropped value."""
    unknown = set(values) - set(fields)
    if unknown:
        raise KeyError(f"no such column: {', '.join(sorted(unknown))}")
    return [values.get(name, 0) for name in fields]
