"""Benchmark a whole LoRA training step with online merging against LoRA with plain AdamW.

What it measures
----------------
A Llama built from its config with random weights (default: the 135M shapes, hidden 576,
30 layers, MLP 1536, 9 heads / 3 KV heads, vocab 49152, tied embeddings), wrapped by PEFT in a
LoRA adapter (``--rank`` 16 on all linear layers but the head, dropout 0), and a task vector
``τ = 1e-3·N(0, 1)`` for every adapted weight. Methods, each with its own optimizer over the
same adapter factors:

- ``lora-adamw``: ``OnlineMergingAdamW(method="none")`` on the factors (what ``omotool train
  --lora-r 16 --merge none`` runs): the baseline, ratio 1.0;
- ``lora-dare``, ``lora-ties``: the same AdamW wrapped in ``LoraOnlineMerging`` (OnDARE /
  OnTIES, ``reserve_p`` 0.01, ``alpha`` 1e-7), what ``--merge dare|ties`` runs.

A step is forward and backward of a causal-LM loss on a batch of ``--batch`` random sequences
of ``--tokens`` tokens, the optimizer step and ``zero_grad``; methods take steps in turn, the
order rotating each round, after ``--warmup`` untimed steps each. The report gives each
method's median ms per step (and of its optimizer part alone: step and ``zero_grad``, the only
part that differs between methods), its ratio to ``lora-adamw`` (goal: at most 1.3) and the memory
the merge adds: ``T``'s bytes and, on CUDA, the peak allocated during a step beyond
``lora-adamw``'s.

How to run
----------
    python bench/bench_lora.py --device cuda               # the 135M shapes on a GPU
    python bench/bench_lora.py --quick                     # smoke run (seconds, CPU)
    python bench/bench_lora.py --json

Run it with this checkout first on ``PYTHONPATH`` (``export PYTHONPATH=$PWD``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.mlp,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(args.device)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    return get_peft_model(model, lora)


def optimizers(model, args: argparse.Namespace) -> dict[str, torch.optim.Optimizer]:
    from omotool.optim import OnlineMergingAdamW
    from omotool.optim.lora_merging import LoraOnlineMerging, peft_lora_modules

    modules = peft_lora_modules(model)
    generator = torch.Generator().manual_seed(1)
    tau = {m.name: 1e-3 * torch.randn(m.weight.shape, generator=generator) for m in modules}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def adamw() -> OnlineMergingAdamW:
        return OnlineMergingAdamW([{"params": named}], None, lr=1e-4, method="none")

    made = {"lora-adamw": adamw()}
    for method in ("dare", "ties"):
        made[f"lora-{method}"] = LoraOnlineMerging(
            adamw(), modules, tau, method=method, reserve_p=0.01, alpha=1e-7
        )
    return made


def step(model, optimizer, batch: torch.Tensor, device: str) -> float:
    """One training step; returns the seconds of its optimizer part (step and zero_grad)."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    model = build(args)
    methods = optimizers(model, args)
    batch = torch.randint(0, args.vocab, (args.batch, args.tokens), device=args.device)
    times: dict[str, list[float]] = {name: [] for name in methods}
    optimizer_times: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, int] = {}
    names = list(methods)
    for round_ in range(args.warmup + args.steps):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            synchronize(args.device)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            optimizer_seconds = step(model, methods[name], batch, args.device)
            synchronize(args.device)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
                optimizer_times[name].append(optimizer_seconds)
                if args.device.startswith("cuda"):
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    base = statistics.median(times["lora-adamw"])
    report = {"settings": vars(args), "methods": {}}
    for name, optimizer in methods.items():
        median = statistics.median(times[name])
        references = getattr(optimizer, "references", {})
        report["methods"][name] = {
            "median_ms": 1e3 * median,
            "optimizer_median_ms": 1e3 * statistics.median(optimizer_times[name]),
            "ratio": median / base,
            "goal_1.3x": "PASS" if median / base <= 1.3 else "MISS",
            "tau_bytes": sum(r.nbytes for r in references.values()),
            "extra_peak_bytes": peaks[name] - peaks["lora-adamw"] if peaks else None,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.mlp, args.heads, args.kv_heads = 64, 2, 128, 4, 2
        args.vocab, args.rank, args.batch, args.tokens, args.steps = 320, 4, 2, 16, 2
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, row in report["methods"].items():
        extra = row["extra_peak_bytes"]
        print(
            f"{name:11s} {row['median_ms']:9.2f} ms/step (optimizer "
            f"{row['optimizer_median_ms']:.2f})  ratio {row['ratio']:.3f} "
            f"({row['goal_1.3x']})  T {row['tau_bytes'] / 2**20:.2f} MiB"
            + (f"  extra peak {extra / 2**20:.1f} MiB" if extra is not None else "")
        )


if __name__ == "__main__":
    main()
