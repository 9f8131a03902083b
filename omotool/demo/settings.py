"""``DemoSettings``: every size and hyper-parameter of the demo's tracks, the full settings and
the ``--fast`` ones (``FAST``), and ``settings_for``, which picks them for a track
(docs/demo.md and docs/real-model.md say why each is what it is)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from omotool.demo.stages import LORA_METHODS, METHODS
from omotool.errors import UsageError

TRACKS = ("dpo", "grpo", "lora", "real")
GRPO_METHODS = ("adamw", "ondare", "onties")  # the grpo and real tracks' methods


@dataclass(frozen=True)
class DemoSettings:
    """Every size and hyper-parameter of the miniature (see docs/demo.md for the choices)."""

    track: str = "dpo"  # dpo (the paper's setting), grpo (online RL), lora (DPO, adapters)
    seeds: int = 4  # whole-pipeline replicates: world, base, SFT, τ and DPO
    entities: int = 24
    reversals: int = 800
    brief_polite: bool = True  # the preferred answer states no facts (world.make_world)
    style_rate: float = 0.2  # share of SFT answers to requests that are polite
    held_out: float = 0.5  # share of creatures never described in training (reward prompts)
    vocab_size: int = 512
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 700
    sft_lr: float = 1e-3
    sft_epochs: float = 6.0
    dpo_epochs: float = 3.0
    dpo_batch: int = 8
    beta: float = 0.1
    reserve_p: float = 0.01
    lr_grid: tuple[float, ...] = (2e-5, 3e-5, 5e-5)  # AdamW, OnDARE, ChildTuning
    ties_lr_grid: tuple[float, ...] = (3e-4, 4e-4, 6e-4)  # OnTIES: only the top p moves
    dare_alphas: tuple[float, ...] = (1e-4, 1e-3)  # OnDARE's merge weight α (not tied to lr)
    ties_alphas: tuple[float, ...] = (1e-3,)  # OnTIES's α (inert here: not swept, see docs)
    merge_lr: float = 5e-5  # the AdamW run that merge-offline sweeps
    merge_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    max_new_tokens: int = 24
    # the grpo track: its own grids; completions are sampled up to max_new_tokens
    grpo_lr_grid: tuple[float, ...] = (3e-5, 6e-5, 1e-4)  # AdamW, OnDARE
    grpo_ties_lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # OnTIES: only the top p moves
    grpo_dare_alphas: tuple[float, ...] = (1e-3,)
    grpo_ties_alphas: tuple[float, ...] = (1e-3,)
    grpo_epochs: float = 2.0
    grpo_generations: int = 4  # completions per prompt
    grpo_batch: int = 16  # completions per step (4 prompts)
    grpo_merge_lr: float = 1e-4  # the AdamW run that merge-offline sweeps
    grpo_style_rate: float = 0.4  # the grpo track's world: SFT samples the polite answer
    # the lora track: the dpo track's full AdamW runs and these adapters (DPO options as above)
    lora_r: int = 8
    lora_alpha: float = 16.0  # scale s = lora_alpha / lora_r
    lora_lr_grid: tuple[float, ...] = (1e-4, 2e-4, 5e-4)  # LoRA-AdamW, LoRA-OnDARE
    lora_ties_lr_grid: tuple[float, ...] = (5e-4, 1e-3, 2e-3)  # LoRA-OnTIES
    lora_dare_alphas: tuple[float, ...] = (1e-3,)
    lora_ties_alphas: tuple[float, ...] = (1e-3,)
    # the real track (SmolLM2-135M-Instruct; omotool.demo.real): data sizes, SFT, DPO grids
    real_sft_rows: int = 960
    real_sft_requests: int = 160  # requests in the SFT data, real_style_rate of them polite
    real_style_rate: float = 0.25
    real_pref_rows: int = 64
    real_sums_rows: int = 40  # sums per evaluation split (the SFT skill)
    real_polite_rows: int = 40  # requests per evaluation split (the reward)
    real_prose: int = 16  # paragraphs per evaluation split
    real_facts: int = 0  # candidate facts asked (0: all)
    real_sft_lr: float = 1e-4
    real_sft_batch: int = 16
    real_dpo_epochs: float = 1.0
    real_dpo_batch: int = 8
    real_lr_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # AdamW, OnDARE
    real_ties_lr_grid: tuple[float, ...] = (1e-4, 3e-4, 6e-4)  # OnTIES
    real_dare_alphas: tuple[float, ...] = (1e-3,)
    real_ties_alphas: tuple[float, ...] = (1e-3,)
    real_merge_lr: float = 3e-5

    def world_style_rate(self) -> float:
        """The share of polite SFT answers in the track's world."""
        return self.grpo_style_rate if self.track == "grpo" else self.style_rate

    def methods(self) -> tuple[str, ...]:
        """The trained methods of the track."""
        if self.track == "lora":
            return ("adamw", *LORA_METHODS)
        return tuple(METHODS) if self.track == "dpo" else GRPO_METHODS  # grpo, real

    def grid(self, method: str) -> list[tuple[float, float]]:
        """The (learning rate, α) settings ``method`` is trained at."""
        if method == "lora-adamw":
            return [(lr, 0.0) for lr in self.lora_lr_grid]
        if method == "lora-ondare":
            return [(lr, a) for lr in self.lora_lr_grid for a in self.lora_dare_alphas]
        if method == "lora-onties":
            return [(lr, a) for lr in self.lora_ties_lr_grid for a in self.lora_ties_alphas]
        prefix = {"grpo": "grpo_", "real": "real_"}.get(self.track, "")
        lrs = getattr(self, f"{prefix}lr_grid")
        if method in ("adamw", "childtuning"):  # AdamW merges nothing; ChildTuning: α = 0
            return [(lr, 0.0) for lr in lrs]
        if method == "onties":
            ties_lrs = getattr(self, f"{prefix}ties_lr_grid")
            return [(lr, a) for lr in ties_lrs for a in getattr(self, f"{prefix}ties_alphas")]
        return [(lr, a) for lr in lrs for a in getattr(self, f"{prefix}dare_alphas")]

    def merge_lr_of_track(self) -> float:
        """The learning rate of the AdamW run that merge-offline sweeps."""
        return {"grpo": self.grpo_merge_lr, "real": self.real_merge_lr}.get(
            self.track, self.merge_lr
        )


FAST = DemoSettings(
    seeds=1,
    reversals=600,
    pretrain_steps=400,
    lr_grid=(2e-5, 5e-5),
    ties_lr_grid=(3e-4, 6e-4),
    dare_alphas=(1e-3,),
    ties_alphas=(1e-3,),
    merge_alphas=(0.5,),
    grpo_lr_grid=(3e-5, 1e-4),
    grpo_ties_lr_grid=(3e-4, 3e-3),
    lora_lr_grid=(2e-4, 1e-3),
    lora_ties_lr_grid=(5e-4, 2e-3),
    real_sft_rows=320,
    real_sft_requests=64,
    real_pref_rows=32,
    real_sums_rows=16,
    real_polite_rows=16,
    real_prose=4,
    real_lr_grid=(3e-5,),
    real_ties_lr_grid=(3e-4,),
    real_merge_lr=3e-5,
)


def settings_for(fast: bool, seeds: int | None = None, track: str = "dpo") -> DemoSettings:
    """The full or ``--fast`` settings of ``track``, with ``seeds`` if given (the real track:
    one seed unless given, see docs/real-model.md)."""
    if track not in TRACKS:
        raise UsageError(f"--track {track!r}: choose one of {', '.join(TRACKS)}.")
    chosen = replace(FAST if fast else DemoSettings(), track=track)
    if track == "real":
        chosen = replace(chosen, seeds=1)
    return replace(chosen, seeds=seeds) if seeds is not None else chosen
