"""Small real models built from configs, with a real tokenizer and chat template, offline.

Tests, the Quickstart and the benchmarks need model folders that transformers loads, without
downloading anything. ``build_model`` writes a randomly initialised Llama/Qwen2/GPT-2 model;
``build_pair`` writes a base model and an "SFT" model derived from it by a small perturbation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten plus minus equals",
    "user assistant system question answer please thank you",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ? !",
]

ARCHITECTURES = ("llama", "qwen2", "gpt2")


def build_tokenizer(
    out: str | os.PathLike[str] | None,
    vocab_size: int = 256,
    texts: Sequence[str] | None = None,
) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` (default: a built-in corpus), give it the
    chat template ``<|im_start|>role ... <|im_end|>`` and save it into ``out`` unless None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4 if texts is None else texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    if out is not None:
        fast.save_pretrained(str(out))
    return fast


def model_config(
    arch: str = "llama",
    vocab_size: int = 320,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
) -> Any:
    """A transformers config for a small model of the given architecture."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    intermediate = intermediate_size or 4 * hidden_size
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=layers,
            n_head=heads,
            n_positions=128,
            n_inner=intermediate,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=4,
        )
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=intermediate,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=4,
        pad_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_model(
    out: str | os.PathLike[str],
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
    **config_kwargs: Any,
) -> Path:
    """Write a randomly initialised model folder (safetensors, config, tokenizer, template)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # transformers initialises weights from the global RNG
    model = AutoModelForCausalLM.from_config(model_config(arch, **config_kwargs))
    return save_model(model.to(dtype), out, max_shard_size, with_tokenizer)


def save_model(
    model: Any,
    out: str | os.PathLike[str],
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """``save_pretrained`` plus the tiny tokenizer and chat template."""
    out = Path(out)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(str(out), **kwargs)
    if with_tokenizer:
        build_tokenizer(out)
    return out


def perturbed(model: Any, scale: float = 0.02, seed: int = 1) -> Any:
    """The model with every parameter moved by ``scale·N(0, 1)``: a stand-in for an SFT run."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_((scale * noise).to(param.dtype))
    return model


def build_pair(
    out: str | os.PathLike[str],
    arch: str = "llama",
    seed: int = 0,
    scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    **config_kwargs: Any,
) -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/sft`` (= base perturbed); returns both paths."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    base = build_model(out / "base", arch, seed, dtype, max_shard_size, **config_kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    sft = save_model(perturbed(model, scale, seed + 1), out / "sft", max_shard_size)
    return base, sft
