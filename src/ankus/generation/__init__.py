"""Generation: batched sampling with a KV cache and per-token log-probs, classifier-free guidance."""

from ankus.generation.engine import (
    GenerationConfig,
    GenerationOutput,
    encode_prompts,
    filter_scores,
    generate,
    packed_linears,
    release_graphs,
    sample_tokens,
    token_logps,
)
from ankus.generation.guidance import cfg_scores, unconditional_prompts

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "cfg_scores",
    "encode_prompts",
    "filter_scores",
    "generate",
    "packed_linears",
    "release_graphs",
    "sample_tokens",
    "token_logps",
    "unconditional_prompts",
]
