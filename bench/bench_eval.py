"""Benchmark batched evaluation against one example at a time.

What it measures
----------------
A small Llama-style model (``--hidden``, ``--layers``; random weights, the test tokenizer) and
``--examples`` arithmetic prompts. For each task, the same work is done with ``batch_size=1``
(the baseline) and ``--batch-size``, alternating, ``--repeats`` times; the report gives the
median tokens per second of each and their ratio:

- ``preference``: ``completion_logprobs`` of chosen and rejected answers (tokens scored);
- ``generate``: greedy ``generate_answers`` with ``--new-tokens`` new tokens (tokens generated).
Both paths give the same numbers (tested in tests/unit/eval); only the speed differs.

How to run
----------
    python bench/bench_eval.py                     # default size (about a minute)
    python bench/bench_eval.py --hidden 64 --layers 2 --examples 16 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omotool.eval.generation import GenerationSettings, generate_answers
from omotool.eval.scoring import completion_logprobs
from omotool.tiny_models import build_model


def timed(work: Callable[[], int]) -> float:
    """Tokens per second of one call of ``work`` (which returns its token count)."""
    started = time.perf_counter()
    tokens = work()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = build_model(Path(folder) / "model", hidden_size=args.hidden, layers=args.layers)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompts = [f"what is {i % 10} + {i // 10 % 10} ?" for i in range(args.examples)]
    pairs = [
        (p, f"{i % 10} + {i // 10 % 10} = {i % 10 + i // 10 % 10}") for i, p in enumerate(prompts)
    ]
    settings = GenerationSettings(max_new_tokens=args.new_tokens)

    def preference(batch: int) -> int:
        _, counts = completion_logprobs(model, tokenizer, pairs, batch_size=batch)
        return sum(counts)

    def generate(batch: int) -> int:
        answers = generate_answers(model, tokenizer, prompts, settings, batch_size=batch)
        return sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)

    print(f"model: hidden {args.hidden}, {args.layers} layers; {args.examples} examples; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    print(
        f"{'task':12s} {'batch 1 tok/s':>14s} {f'batch {args.batch_size} tok/s':>15s} {'ratio':>7s}"
    )
    for name, task in (("preference", preference), ("generate", generate)):
        task(args.batch_size)  # warm-up
        single, batched = [], []
        for _ in range(args.repeats):
            single.append(timed(lambda task=task: task(1)))
            batched.append(timed(lambda task=task: task(args.batch_size)))
        one, many = statistics.median(single), statistics.median(batched)
        print(f"{name:12s} {one:14.0f} {many:15.0f} {many / one:6.1f}x")


if __name__ == "__main__":
    main()
