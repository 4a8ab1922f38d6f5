"""Llama-family size presets. Models are plain `transformers` configs: every checkpoint loads in
transformers and vLLM, and nothing here knows about distribution."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

# Shapes follow published Llama-style models of each size; vocab and context come from the data.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the laptop demo: trains in minutes on 2 cores.
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
    # GPT-2 small / OPT-125m scale.
    "125m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16),
    # Llama 3.2 1B shape (grouped-query attention, 8 KV heads).
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0),
}


def build_config(
    preset: str,
    vocab_size: int,
    max_position_embeddings: int,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaConfig:
    """A LlamaConfig for a named preset, sized to the tokenizer and the packed sequence length."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        **PRESETS[preset],
    )


def build_model(config: LlamaConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised causal LM; the same seed gives the same weights on every rank."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def parameter_count(config: LlamaConfig) -> int:
    """Parameters of a Llama config without building it (embeddings + layers + head)."""
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    head = 0 if config.tie_word_embeddings else v * h
    return v * h + n * per_layer + h + head
