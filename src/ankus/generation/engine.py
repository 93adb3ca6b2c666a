"""Batched sampling with a KV cache and per-token log-probabilities: ``generate(model, tokenizer, prompts)``.

One loop for every causal LM transformers can run: the model's own ``forward`` does the work
(no per-architecture code), called with a left-padded prompt batch, explicit position ids and a
KV cache, asking for the logits of the last position only. Around it:

* sampling (temperature, top-k, top-p) on plain tensors (:mod:`ankus.generation.sampling`);
* classifier-free guidance (:mod:`ankus.generation.guidance`) with a second branch and cache;
* rows end at EOS (tokenizer and ``generation_config``, possibly several ids) or a stop string;
  finished rows are dropped from the batch once enough of them have finished;
* ``logprobs`` of each sampled token under the model's raw distribution (T = 1, no filtering, no
  guidance): what PPO's old-policy log-probs need.

Where the speed comes from lives beside this loop: the KV cache and the forwards on it
(:mod:`ankus.generation.kv_cache`); on CPU, linear layers through oneDNN with packed weights
(:mod:`ankus.generation.packing`; whether that path runs here, and why not: :func:`cpu_path_info`,
:mod:`ankus.generation.onednn`; whether it is the faster one here: :mod:`ankus.generation.path_timing`;
the memory side: :mod:`ankus.generation.memory`); on CUDA, the decode step captured as a graph
(:mod:`ankus.generation.cuda_graphs`). ``torch.compile`` of the
CPU decode step was measured and dropped: 85-150 s to compile on 2 cores, no faster per step.

This module keeps no state. The caches of the modules above, and how to free them:
``packing._PACKED`` (:func:`release_packed`, :func:`~ankus.generation.packing.release_all_packed`),
``cuda_graphs._SLOTS`` (:func:`release_graphs`), ``cuda_graphs._COMPILED``
(:func:`~ankus.generation.cuda_graphs.release_compiled`), ``onednn._PROBE``
(:func:`~ankus.generation.onednn.reset_probe`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ankus.data.tokens import pad_id as pad_token
from ankus.generation.cuda_graphs import graph_safe, graph_slot, release_graphs, static_step
from ankus.generation.guidance import cfg_scores, unconditional_prompts
from ankus.generation.kv_cache import Branch, decode, keep_rows, prefill, prefill_once_per_prompt
from ankus.generation.onednn import PACKED_BF16, PLAIN
from ankus.generation.packing import packed_linears, release_packed
from ankus.generation.path_timing import cpu_path_info, measured_linear_path
from ankus.generation.sampling import filter_scores, sample_tokens, token_logps

logger = logging.getLogger("ankus.generation")

# Importable from here as before the split (trainers and tools import them from this module):
__all__ = ["GenerationConfig", "GenerationOutput", "concat_outputs", "cpu_path_info", "encode_prompts",
           "eos_token_ids", "filter_scores", "generate", "left_pad", "packed_linears", "release_graphs",
           "release_packed", "sample_tokens", "token_logps"]


@dataclass
class GenerationConfig:
    """How to sample continuations. Also the ``generation`` section of a recipe."""

    max_new_tokens: int = 48
    """Most tokens generated per prompt (fewer if every row hits EOS or a stop string)."""
    do_sample: bool = True
    """Sample from the (filtered) distribution; False = greedy argmax."""
    temperature: float = 1.0
    """Divides the scores before softmax when sampling; must be > 0."""
    top_k: int = 0
    """Keep only the k highest-scoring tokens when sampling; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1 = off."""
    stop_strings: list[str] = field(default_factory=list)
    """A row ends once its decoded response contains one of these (the text is cut before it)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance gamma (Sanchez et al. 2023); 1 = off, no extra forward."""
    negative_prompt: str | None = None
    """Unconditional context for every row under CFG; None = the prompt's last token only."""
    chat_template: bool | None = None
    """Wrap string prompts in the tokenizer's chat template; None = when the tokenizer has one."""
    ignore_eos: bool = False
    """Keep generating past EOS (fixed-length rollouts, benchmarks); stop strings still apply."""
    packed_linears: bool = True
    """CPU: run linear layers through oneDNN with weights packed once (same fp32 math, faster),
    unless plain ``F.linear`` is measured faster on this machine (timed once per model shape and
    batch, :mod:`ankus.generation.path_timing`); false = always the model's own layers."""
    move_frozen: bool = True
    """CPU packed linears: a frozen weight (``requires_grad=False``) that only its linear layer
    uses lives in packed form alone during the call, and is rebuilt bit for bit afterwards, instead
    of a packed copy being kept beside it: sampling from a model whose trunk or base is frozen (PPO's
    Hydra or frozen-trunk policy, LoRA) holds those weights once, not twice. Costs a repack per call
    (~0.4 s for SmolLM2-135M); false = cache the packed copies across calls."""
    bf16: bool = False
    """CPU opt-in: packed linear layers in bf16 (activations cast per layer); changes numerics."""
    cuda_graph: bool = True
    """CUDA: capture the decode step on a static KV cache as a CUDA graph and replay it."""
    compile: bool = False
    """CUDA graph path, opt-in: ``torch.compile`` the decode forward before it is captured (fused
    kernels; compiling takes tens of seconds for each new batch size and cache length)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} "
                             "(use do_sample=False for greedy decoding)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must not contain an empty string")


@dataclass
class GenerationOutput:
    """A batch of prompts and their sampled continuations, row i for prompt i."""

    prompt_ids: Tensor  # (B, P) left-padded with the pad token
    prompt_mask: Tensor  # (B, P) 1 = real token
    response_ids: Tensor  # (B, N) right-padded with the pad token
    response_mask: Tensor  # (B, N) 1 = generated, up to and including EOS / the stop-string token
    logprobs: Tensor  # (B, N) log-prob of each token under the raw model (T=1, no filter, no CFG); 0 on padding
    texts: list[str]  # decoded responses, cut before a stop string, special tokens skipped

    @property
    def sequences(self) -> Tensor:
        """(B, P + N) prompt and response side by side, the layout a training forward wants."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, P + N) 1 on real prompt tokens and generated tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


# ---------------------------------------------------------------------------------------------
# Prompts


def encode_prompts(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], chat_template: bool | None = None
                   ) -> list[list[int]]:
    """Token ids for each prompt. Strings go through the chat template (one user turn plus the
    assistant header, ``add_generation_prompt``) when ``chat_template`` is True, or None and the
    tokenizer has one; otherwise through the plain tokenizer. Lists of ids pass through."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_template if chat_template is None else chat_template
    if use_chat and not has_template:
        raise ValueError("chat_template=True but this tokenizer has no chat template; pass chat_template=False")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if use_chat:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=False)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(prompt)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            if tokenizer.bos_token_id is None:
                raise ValueError(f"prompt {i} encodes to no tokens and the tokenizer has no BOS token to start from")
            ids = [tokenizer.bos_token_id]  # an empty prompt conditions on BOS alone
        encoded.append(ids)
    return encoded


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    """(ids, mask), both (B, width): each row right-aligned, pad_id / 0 on the left."""
    width = max(len(s) for s in seqs) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a row: the tokenizer's EOS and the model's ``generation_config`` EOS (an
    int or a list; chat models often list their end-of-turn token there)."""
    ids: list[int] = []
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for t in ([source] if isinstance(source, int) else list(source or [])):
            if t not in ids:
                ids.append(int(t))
    return ids


# ---------------------------------------------------------------------------------------------
# Stop strings


def _stop_hit(tokenizer, row_tokens: list[int], stop_strings: list[str], window: int) -> bool:
    text = tokenizer.decode(row_tokens[-window:], skip_special_tokens=True)
    return any(s in text for s in stop_strings)


def cut_text(text: str, stop_strings: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


# ---------------------------------------------------------------------------------------------
# The loop


def _decode_mode(model, config: GenerationConfig) -> str:
    """'graph': static cache + CUDA graph (CUDA, full-attention models); 'eager': the model's
    forward on a dynamic cache. ('static', the graph path without capture, is for tests.)"""
    device = next(model.parameters()).device
    if config.compile and device.type != "cuda":
        logger.warning("generation.compile applies to the CUDA graph path only; on %s sampling runs eagerly", device)
    if config.cuda_graph and device.type == "cuda" and graph_safe(model):
        return "graph"
    return "eager"


def _start_branch(model, tag: int, ids: Tensor, mask: Tensor, config: GenerationConfig, mode: str
                  ) -> tuple[Branch, Tensor, Callable[[Tensor], Tensor]]:
    """Prefill one branch (tag 0: the prompts, 1: CFG's unconditional prompts); returns it, the
    (B, V) logits of its first new token and its decode step."""
    N = config.max_new_tokens
    if mode == "eager":  # a dynamic cache can repeat rows: each distinct prompt is run once
        branch, logits = prefill_once_per_prompt(model, ids, mask, N)
        return branch, logits, functools.partial(decode, model, branch)
    dtype = next(model.parameters()).dtype
    compiled = config.compile and mode == "graph"
    slot = graph_slot(model, tag, ids.shape[0], ids.shape[1] + N, dtype, compiled)  # kept between calls
    branch, logits = prefill(model, ids, mask, N, static=True, slot=slot)
    return branch, logits, static_step(model, branch, dtype, capture=mode == "graph", slot=slot, compiled=compiled)


def _mark_stop_strings(tokenizer, rows: Tensor, tokens: Tensor, live: Tensor, done: Tensor,
                       host_tokens: list[list[int]], stop_strings: list[str]) -> None:
    """Append each live row's token to its host-side copy and mark ``done`` (in place) where the
    decoded tail now holds a stop string."""
    window = max(len(s) for s in stop_strings) + 8  # tokens enough to hold a stop string
    for j, (r, tok) in enumerate(zip(rows.tolist(), tokens.tolist())):
        if live[j]:
            host_tokens[r].append(tok)
            if _stop_hit(tokenizer, host_tokens[r], stop_strings, window):
                done[j] = True


def _sample_loop(tokenizer, branches: list[tuple[Branch, Tensor, Callable]], config: GenerationConfig,
                 eos: list[int], pad_id: int, generator: torch.Generator | None, drop_rows: bool,
                 response: Tensor, response_mask: Tensor, logprobs: Tensor) -> None:
    """Sample column t of ``response``, ``response_mask`` and ``logprobs`` (B, N) in place, step
    by step, until every row has ended or N tokens are made. ``branches``: the conditional one,
    then CFG's unconditional one if guided. ``drop_rows``: finished rows leave the batch (dynamic
    caches only) once a quarter of the rows still computed are done."""
    device = response.device
    B, N = response.shape
    logits = [b[1] for b in branches]
    eos_t = torch.tensor(eos if eos else [-1], device=device)
    rows = torch.arange(B, device=device)  # original index of each row still computed
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per computed row
    host_tokens: list[list[int]] = [[] for _ in range(B)]
    for t in range(N):
        scores = cfg_scores(logits[0], logits[1], config.guidance_scale) if len(logits) == 2 else logits[0]
        tokens = sample_tokens(scores, config, generator)  # (b,)
        live = ~done
        response[rows, t] = torch.where(live, tokens, torch.full_like(tokens, pad_id))
        response_mask[rows, t] = live.long()
        logprobs[rows, t] = torch.where(live, token_logps(logits[0], tokens), torch.zeros((), device=device))
        done = done | torch.isin(tokens, eos_t)
        if config.stop_strings:
            _mark_stop_strings(tokenizer, rows, tokens, live, done, host_tokens, config.stop_strings)
        if t == N - 1:
            break
        n_done = int(done.sum()) if (device.type != "cuda" or t % 8 == 7) else 0  # a sync; rarely on GPU
        if n_done == done.numel():
            break
        if drop_rows and n_done and 4 * n_done >= done.numel():
            keep = (~done).nonzero().squeeze(-1)
            for branch, _, _ in branches:
                keep_rows(branch, keep)
            rows, done, tokens = rows[keep], done[keep], tokens[keep]
        logits = [step(tokens) for _, _, step in branches]


def _response_texts(tokenizer, response: Tensor, response_mask: Tensor, stop_strings: list[str]) -> list[str]:
    texts = []
    for r in range(response.shape[0]):
        n = int(response_mask[r].sum())
        text = tokenizer.decode(response[r, :n].tolist(), skip_special_tokens=True)
        texts.append(cut_text(text, stop_strings) if stop_strings else text)
    return texts


@torch.no_grad()
def _generate_chunk(model, tokenizer, prompt_ids: list[list[int]], uncond_ids: list[list[int]] | None,
                    config: GenerationConfig, eos: list[int], pad_id: int,
                    generator: torch.Generator | None) -> GenerationOutput:
    device = next(model.parameters()).device
    B, N = len(prompt_ids), config.max_new_tokens
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    response = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((B, N), dtype=torch.long, device=device)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
    if N == 0:
        return GenerationOutput(ids, mask, response, response_mask, logprobs, [""] * B)

    mode = _decode_mode(model, config)
    branches = [_start_branch(model, 0, ids, mask, config, mode)]
    if config.guidance_scale != 1.0:
        u_ids, u_mask = left_pad(uncond_ids, pad_id)
        branches.append(_start_branch(model, 1, u_ids.to(device), u_mask.to(device), config, mode))
    _sample_loop(tokenizer, branches, config, eos, pad_id, generator, mode == "eager",
                 response, response_mask, logprobs)
    texts = _response_texts(tokenizer, response, response_mask, config.stop_strings)
    return GenerationOutput(ids, mask, response, response_mask, logprobs, texts)


def concat_outputs(outputs: list[GenerationOutput], pad_id: int, prompt_width: int | None = None,
                   response_width: int | None = None) -> GenerationOutput:
    """Several outputs as one batch: prompts left-padded, responses right-padded to the widest
    (or to the given widths, e.g. the widest over all processes)."""
    P = max(o.prompt_ids.shape[1] for o in outputs) if prompt_width is None else prompt_width
    N = max(o.response_ids.shape[1] for o in outputs) if response_width is None else response_width
    if len(outputs) == 1 and outputs[0].prompt_ids.shape[1] == P and outputs[0].response_ids.shape[1] == N:
        return outputs[0]

    def pad(t: Tensor, width: int, value, left: bool) -> Tensor:
        extra = width - t.shape[1]
        return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value) if extra else t

    return GenerationOutput(
        prompt_ids=torch.cat([pad(o.prompt_ids, P, pad_id, True) for o in outputs]),
        prompt_mask=torch.cat([pad(o.prompt_mask, P, 0, True) for o in outputs]),
        response_ids=torch.cat([pad(o.response_ids, N, pad_id, False) for o in outputs]),
        response_mask=torch.cat([pad(o.response_mask, N, 0, False) for o in outputs]),
        logprobs=torch.cat([pad(o.logprobs, N, 0.0, False) for o in outputs]),
        texts=[t for o in outputs for t in o.texts],
    )


def _unconditional_ids(tokenizer, prompt_ids: list[list[int]], negative_prompts, config: GenerationConfig
                       ) -> list[list[int]] | None:
    """CFG's unconditional context per prompt (None when not guided): the negative prompts, or
    ``config.negative_prompt`` for every row, encoded like the prompts; else the last token."""
    if config.guidance_scale == 1.0:
        if negative_prompts is not None and len(negative_prompts) != len(prompt_ids):
            raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompt_ids)} prompts")
        return None
    negative_ids = None
    if negative_prompts is not None:
        negative_ids = encode_prompts(tokenizer, negative_prompts, config.chat_template)
    elif config.negative_prompt is not None:
        negative_ids = encode_prompts(tokenizer, [config.negative_prompt] * len(prompt_ids), config.chat_template)
    return unconditional_prompts(prompt_ids, negative_ids)


def _linear_layers(model, config: GenerationConfig, rows: int) -> contextlib.AbstractContextManager:
    """The linear layers the call runs (see :func:`ankus.generation.path_timing.measured_linear_path`):
    packed oneDNN ones, or the model's own."""
    path, reason = measured_linear_path(model, config.packed_linears, config.bf16, min(rows, 64))
    logger.debug("generate: linear layers %s (%s)", path, reason)
    if path == PLAIN:
        return contextlib.nullcontext()
    return packed_linears(model, torch.bfloat16 if path == PACKED_BF16 else None, rows_hint=min(rows, 64),
                          move_frozen=config.move_frozen)


def generate(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], config: GenerationConfig | None = None,
             *, negative_prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
             generator: torch.Generator | None = None, batch_size: int | None = None) -> GenerationOutput:
    """Sample a continuation for each prompt (strings, or token-id lists used as is).

    ``negative_prompts`` (one per prompt) or ``config.negative_prompt`` give CFG's unconditional
    context when ``config.guidance_scale != 1``; they are encoded like the prompts. ``generator``
    makes sampling reproducible. ``batch_size`` splits a long prompt list into chunks (a progress
    bar shows when there are several); outputs are padded to a common width and concatenated.
    """
    config = config or GenerationConfig()
    if not prompts:
        raise ValueError("no prompts given")
    prompt_ids = encode_prompts(tokenizer, prompts, config.chat_template)
    uncond_ids = _unconditional_ids(tokenizer, prompt_ids, negative_prompts, config)
    eos = [] if config.ignore_eos else eos_token_ids(model, tokenizer)
    pad_id = pad_token(tokenizer)

    size = batch_size or len(prompt_ids)
    starts = list(range(0, len(prompt_ids), size))
    if len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    layers = _linear_layers(model, config, size)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with layers:
            for s in starts:
                u_chunk = uncond_ids[s:s + size] if uncond_ids is not None else None
                outputs.append(_generate_chunk(model, tokenizer, prompt_ids[s:s + size], u_chunk, config, eos,
                                               pad_id, generator))
    finally:
        model.train(was_training)
    return concat_outputs(outputs, pad_id)
