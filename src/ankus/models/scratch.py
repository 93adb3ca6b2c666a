"""Small models to pretrain from scratch, by name, random-init from a seed.

With SmolLM2's 49,152-token vocabulary the embeddings are most of a ~20M-parameter model, so the
shapes are chosen around them:

* ``llama-20m``: Llama (RMSNorm, SwiGLU, rotary, grouped-query attention), tied input and output
  embeddings as SmolLM2 has them; 256 wide, 10 layers, 8 heads (4 key/value heads).
* ``llama-5m``: the same Llama, 96 wide and 4 layers, for experiments that must fit minutes on one
  CPU thread (docs/efficient_training.md).
* ``pythia-20m``: GPT-NeoX shaped like Pythia: parallel residual (attention and MLP read the same
  input), rotary on 25% of each head, LayerNorm, GELU, an untied output head; 192 wide, 4 layers,
  3 heads. The untied head costs another 49,152 x 192 parameters, hence the narrower width.

Exact parameter counts (``parameter_count``; tied weights counted once): see SCRATCH_MODELS and
tests/unit/test_pretrain.py, which checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SCRATCH_MODELS", "ScratchSpec", "scratch_config", "scratch_model", "parameter_count"]


@dataclass(frozen=True)
class ScratchSpec:
    arch: str
    description: str
    shape: dict[str, Any]


SCRATCH_MODELS: dict[str, ScratchSpec] = {
    "llama-20m": ScratchSpec("llama", "random-init Llama for pretraining, 10 layers x 256 wide, tied embeddings "
                             "(20.4M params with SmolLM2's tokenizer)",
                             dict(hidden_size=256, intermediate_size=768, num_hidden_layers=10, num_attention_heads=8,
                                  num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
                                  rope_theta=10000.0)),
    "llama-5m": ScratchSpec("llama", "random-init Llama for CPU experiments, 4 layers x 96 wide, tied embeddings "
                            "(5.1M params with SmolLM2's tokenizer, 4.7M of them the embeddings)",
                            dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                                 rope_theta=10000.0)),
    "pythia-20m": ScratchSpec("gpt-neox", "random-init Pythia-shaped GPT-NeoX for pretraining, 4 layers x 192 wide, "
                              "parallel residual, rotary_pct 0.25, untied head (20.7M params)",
                              dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                                   max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                                   tie_word_embeddings=False, hidden_act="gelu")),
}


def scratch_config(name: str, vocab_size: int, bos: int, eos: int):
    """The transformers config of a named scratch model for a tokenizer of ``vocab_size`` tokens."""
    from transformers import GPTNeoXConfig, LlamaConfig

    spec = SCRATCH_MODELS[name]
    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    cls = LlamaConfig if spec.arch == "llama" else GPTNeoXConfig
    return cls(**spec.shape, **common)


def scratch_model(name: str, tokenizer, seed: int = 0):
    """``(model, tokenizer)``: the named model random-initialised from ``seed`` (the global RNG is
    left as it was), its vocabulary sized to ``tokenizer`` (``load_model`` passes SmolLM2's)."""
    if name not in SCRATCH_MODELS:
        raise KeyError(f"unknown scratch model '{name}'; known: {', '.join(SCRATCH_MODELS)}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config = scratch_config(name, len(tokenizer), bos, tokenizer.eos_token_id)
    return seeded_model(config, seed, tokenizer.eos_token_id), tokenizer


def seeded_model(config, seed: int, pad_token_id: int) -> torch.nn.Module:
    """An fp32 causal LM random-initialised from ``config`` with ``seed``, leaving the global RNG
    as it was (every random-init spec of ``load_model`` is built this way)."""
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = pad_token_id
    return model


def parameter_count(model: torch.nn.Module) -> int:
    """Trainable parameters, a tied weight counted once."""
    return sum(p.numel() for p in model.parameters())
