"""Generation: batched sampling with a KV cache and per-token log-probs, classifier-free guidance.

Modules: ``engine`` (the sampling loop, ``generate``), ``sampling`` (filtering and draws),
``kv_cache`` (prefill / decode on a KV cache), ``guidance`` (CFG), ``packing`` / ``onednn`` /
``memory`` (CPU: oneDNN packed linear layers, which path runs and why, process memory),
``cuda_graphs`` (CUDA: the decode step as a captured graph). Every module-level cache is listed
in its module's docstring with the function that frees it.
"""

from ankus.generation.cuda_graphs import release_compiled, release_graphs
from ankus.generation.engine import GenerationConfig, GenerationOutput, encode_prompts, generate
from ankus.generation.guidance import cfg_scores, unconditional_prompts
from ankus.generation.onednn import reset_probe
from ankus.generation.path_timing import cpu_path_info
from ankus.generation.packing import packed_linears, release_all_packed, release_packed
from ankus.generation.sampling import filter_scores, sample_tokens, token_logps

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "cfg_scores",
    "cpu_path_info",
    "encode_prompts",
    "filter_scores",
    "generate",
    "packed_linears",
    "release_all_packed",
    "release_compiled",
    "release_graphs",
    "release_packed",
    "reset_probe",
    "sample_tokens",
    "token_logps",
    "unconditional_prompts",
]
