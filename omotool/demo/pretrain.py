"""The demo's base model: a small Llama pre-trained on the world's corpus with a plain
next-token loop (pre-training is not an omotool command). Its tokenizer is
``omotool.tiny_models.build_tokenizer`` trained on the world's text."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def base_config(tokenizer: Any, hidden: int, layers: int, heads: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pretrain(
    tokenizer: Any,
    corpus: Sequence[str],
    out: Path,
    *,
    hidden: int = 96,
    layers: int = 4,
    heads: int = 4,
    steps: int = 1500,
    batch_size: int = 32,
    block: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Pre-train a fresh Llama on ``corpus`` (packed into ``block``-token rows, AdamW, cosine
    schedule with 5% warm-up) and save it with the tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(base_config(tokenizer, hidden, layers, heads))
    rng = random.Random(seed)
    stream: list[int] = []
    for line in corpus:
        stream += tokenizer(line + "\n", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor(stream)
    starts = len(tokens) - block - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + torch.cos(torch.tensor((step - warmup) / (steps - warmup) * 3.14159)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: float(factor(s)))
    model.train()
    for step in range(steps):
        rows = torch.stack(
            [tokens[i : i + block + 1] for i in (rng.randrange(starts) for _ in range(batch_size))]
        )
        loss = model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, loss.item())
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
