"""Batched sampling with a KV cache and per-token log-probabilities: ``generate(model, tokenizer, prompts)``.

One loop for every causal LM transformers can run: the model's own ``forward`` does the work
(no per-architecture code), called with a left-padded prompt batch, explicit position ids and a
KV cache, asking for the logits of the last position only. Around it:

* sampling (temperature, top-k, top-p) on plain tensors, no logits-processor objects;
* classifier-free guidance (see :mod:`ankus.generation.guidance`) with a second branch and cache;
* rows end at EOS (tokenizer and ``generation_config``, possibly several ids) or a stop string;
  finished rows are dropped from the batch once enough of them have finished;
* ``logprobs`` of each sampled token under the model's raw distribution (T = 1, no filtering, no
  guidance): what PPO's old-policy log-probs need.

Speed (CPU). Profiled at batch 16, a SmolLM2-135M decode step in transformers' generate is ~75%
linear layers (MKL fp32 GEMMs with 16 rows), 5-9% ``torch.cat`` growing the KV cache, 8-15%
``torch.multinomial`` (an exponential variate for each of the 49k vocabulary entries: 16 ms per
step on one core) and ~4% attention. Here:

* every ``nn.Linear`` (and GPT-2's ``Conv1D``) runs through oneDNN with its weight reordered once
  into oneDNN's blocked layout (:func:`packed_linears`): the same fp32 products ~1.3-1.6x faster
  than MKL on this AMD CPU (lm_head ~2x), close to one core's fp32 peak. Packed weights are cached
  per parameter and re-made when the parameter changes (its version counter moves, as under an
  optimizer step). Results differ from MKL's by fp32 summation order only;
* full-attention KV layers write into buffers allocated once per call (no per-step concatenation);
* sampling draws one uniform per row against a float64 CDF (1 ms per step instead of 16);
* no attention mask is passed when no row is padded (plain causal attention).

With all the fp32 matrix products near the core's peak, what is left to gain needs lower precision:
``bf16=True`` packs bf16 weights (AVX512-BF16), opt-in because it changes the numbers (log-probs
move by up to ~0.1 on SmolLM2, enough to flip near-ties under greedy decoding). ``torch.compile``
of the decode step was measured and dropped: 85-150 s to compile on 2 cores, no faster per step.

Speed (CUDA). The decode step runs on a preallocated ``StaticCache`` with fixed-shape inputs and
is captured as a CUDA graph, then replayed each step (see :func:`_static_step`). The cache, the
input buffers and the graph are kept for later calls with the same model, batch size and cache
length (a few, least recently used first out; cache lengths are rounded up to a multiple of 64),
so a steady stream of same-shaped batches, PPO's rollout chunks or a server's, captures once.
On an H100 (benchmarks/generation.py) this is 4.6-5.4x transformers' ``generate`` for a 135M
model at batch 64 and 3.0-3.5x for a 1B one. The replayed graph is then most of a step, bound by
its count of small kernels, so ``compile=True`` (opt-in) runs ``torch.compile`` on the forward
before capture to fuse them: 7.5x at 135M, for ~30 s of compiling per shape.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ankus.data.tokens import pad_id as pad_token
from ankus.generation.guidance import cfg_scores, unconditional_prompts


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
    """CPU: run linear layers through oneDNN with weights packed once (same fp32 math, faster)."""
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
# Sampling: pure functions on (B, V) scores


def filter_scores(scores: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k, then top-p (nucleus, Holtzman et al. 2020) filtering: dropped tokens get -inf.

    scores: (B, V) float. top-k keeps the k highest (ties at the k-th value all kept); top-p keeps,
    in decreasing-probability order, each token whose preceding mass is still below top_p, so the
    kept set is the smallest whose mass reaches top_p (the most likely token always stays).
    """
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_scores, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    return scores


def sample_tokens(scores: Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """Next token per row, (B,) long: argmax when greedy, else a draw from
    softmax(filter(scores / temperature))."""
    if not config.do_sample:
        return scores.argmax(dim=-1)
    scores = scores.float()
    if config.temperature != 1.0:
        scores = scores / config.temperature
    scores = filter_scores(scores, config.top_k, config.top_p)
    probs = torch.softmax(scores, dim=-1)  # (B, V)
    return sample_inverse_cdf(probs, generator)


def sample_inverse_cdf(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of (B, V) probabilities, (B,) long: the first index whose cumulative
    probability exceeds u * total, u ~ U[0, 1). Exact, one random number per row, and ~15x faster
    than ``torch.multinomial`` on CPU at B=16, V=49k (1 ms vs 16 ms). The cumulative sum is in
    float64 so that rounding cannot move the bins of unlikely tokens; a zero-probability token
    adds an empty bin and is never drawn."""
    cdf = probs.double().cumsum(-1)  # (B, V)
    # drawn where the generator lives (a CPU generator can drive CUDA sampling), then moved
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else probs.device).to(probs.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)
    return idx.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def token_logps(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B,) log softmax(logits)[token] under the raw distribution: logit - logsumexp."""
    logits = logits.float()
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# ---------------------------------------------------------------------------------------------
# Packed linear layers (CPU)

# id(parameter) -> (weak reference, (version, data_ptr, dtype, transpose), packed weight); an entry
# goes away with its parameter
_PACKED: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old/new transformers
        return None
    return Conv1D


def _packed_weight(weight: Tensor, transpose: bool, dtype: torch.dtype, rows_hint: int) -> Tensor:
    """oneDNN's blocked copy of ``weight`` (out, in), made once per parameter version."""
    key = (weight._version, weight.data_ptr(), dtype, transpose)
    hit = _PACKED.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    w = weight.detach()
    w = (w.t() if transpose else w).contiguous().to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)
    if hit is None or hit[0]() is not weight:
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    _PACKED[id(weight)] = (weakref.ref(weight), key, packed)
    return packed


def _packed_forward(module: nn.Module, packed: Tensor, out_features: int, x: Tensor, dense: bool = True) -> Tensor:
    compute_dtype = packed.dtype
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if dense and x2.shape[0] == 1 and compute_dtype == module.weight.dtype:
        # one row (batch-1 decoding): MKL's matrix-vector path is ~4% faster than oneDNN's here
        return type(module).forward(module, x)
    if x2.dtype != compute_dtype:
        x2 = x2.to(compute_dtype)
    bias = module.bias
    b = None if bias is None else bias.detach().to(compute_dtype)
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, b, "none", [], "")
    if y.dtype != x.dtype:
        y = y.to(x.dtype)  # bf16 mode: the residual stream stays in the model's dtype
    return y.reshape(*shape[:-1], out_features)


def packed_linears_available(model) -> bool:
    """CPU, oneDNN built in, and float weights."""
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and p.dtype in (torch.float32, torch.bfloat16))


@contextlib.contextmanager
def packed_linears(model, dtype: torch.dtype | None = None, rows_hint: int = 16,
                   move_frozen: bool = False) -> Iterator[int]:
    """Within the block, each plain ``nn.Linear`` / ``Conv1D`` of ``model`` computes through oneDNN
    with a packed weight (an instance-level ``forward``; the module tree, hooks and the model's
    own forward are untouched). Inference only: packed weights carry no gradient. Yields the
    number of layers swapped.

    ``move_frozen``: a weight that does not train, is used by this one layer alone (not a head
    tied to the embeddings) and keeps its dtype is *moved* into its packed form: its dense memory
    is released for the block (the parameter keeps its shape and dtype, and reads NaN), and on
    leaving it is rebuilt from the packed form bit for bit (a reorder only moves values). Other
    weights get a cached packed copy beside them, as without the flag."""
    conv1d = _conv1d_type()
    swapped: list[nn.Module] = []
    moved: list[tuple[nn.Parameter, Tensor, bool]] = []  # (weight, its packed form, transposed)
    users = _weight_users(model) if move_frozen else {}
    try:
        with torch.no_grad():
            file_ranges = _file_backed_ranges() if move_frozen else []
            for mod in model.modules():
                if "forward" in mod.__dict__:
                    continue  # already swapped (shared module) or patched by someone else
                if type(mod) is nn.Linear:
                    weight, transpose, out_features = mod.weight, False, mod.out_features
                elif conv1d is not None and type(mod) is conv1d:
                    weight, transpose, out_features = mod.weight, True, mod.nf
                else:
                    continue
                if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
                    continue
                target = dtype or weight.dtype
                if (move_frozen and not weight.requires_grad and target == weight.dtype and users.get(id(weight)) == 1
                        and _sole_owner(weight)):
                    packed = _move_to_packed(weight, transpose, rows_hint, file_ranges)
                    moved.append((weight, packed, transpose))
                    _malloc_trim()  # the reorder's freed temporaries, before the next weight's
                    mod.forward = functools.partial(_packed_forward, mod, packed, out_features, dense=False)
                else:
                    packed = _packed_weight(weight, transpose, target, rows_hint)
                    mod.forward = functools.partial(_packed_forward, mod, packed, out_features)
                swapped.append(mod)
            if moved:
                _malloc_trim()
        yield len(swapped)
    finally:
        for mod in swapped:
            del mod.forward
        rebuilt = bool(moved)
        with torch.no_grad():
            while moved:  # one packed form freed per weight rebuilt: never both in full
                weight, packed, transpose = moved.pop()
                dense = packed.to_dense()  # (out, in)
                weight.data = _mapped_empty(weight.shape, weight.dtype).copy_(dense.t() if transpose else dense)
                del packed, dense
                _malloc_trim()
        if rebuilt:
            _malloc_trim()  # the packed forms' memory


def _weight_users(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many (module, name) slots hold it (2 for a head tied to the embeddings)."""
    counts: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def _sole_owner(weight: Tensor) -> bool:
    """Nothing but ``weight`` holds its memory (no view of it elsewhere), and it is all of it."""
    storage = weight.untyped_storage()
    # 2 = the parameter and the ``storage`` object made on the line above
    return (torch._C._storage_Use_Count(storage._cdata) == 2 and weight.is_contiguous()
            and storage.nbytes() == weight.numel() * weight.element_size())


def _move_to_packed(weight: nn.Parameter, transpose: bool, rows_hint: int, file_ranges) -> Tensor:
    """The packed form of ``weight``; its dense memory is released (see ``packed_linears``)."""
    hit = _PACKED.pop(id(weight), None)  # a cached copy of this very version is reused
    key = (weight._version, weight.data_ptr(), weight.dtype, transpose)
    if hit is not None and hit[0]() is weight and hit[1] == key:
        packed = hit[2]
    else:
        packed = torch.ops.mkldnn._reorder_linear_weight(
            (weight.detach().t() if transpose else weight.detach()).contiguous(), rows_hint)
    start, nbytes = weight.data_ptr(), weight.numel() * weight.element_size()
    # same shape and dtype, one element of storage: anything that reads it during the block gets NaN
    weight.data = torch.full((), float("nan"), dtype=weight.dtype).expand(weight.shape)
    if any(lo <= start and start + nbytes <= hi for lo, hi in file_ranges):
        _release_pages(start, nbytes)
    return packed


def _mapped_empty(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous tensor in pages of its own (an anonymous ``mmap``), outside
    malloc's heap. A rebuilt weight lives for the rest of the run; in the heap, where glibc puts
    blocks of this size once larger ones have been freed, it would pin the heap's free space
    around it, and the next phase's allocations would grow the heap instead (measured: a Hydra
    PPO run peaked 150 MB higher). Its pages go back to the OS when the tensor is freed."""
    import mmap

    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):  # (Windows: malloc's memory, as any tensor)
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # (a writable buffer: no warning is due; be sure none is shown)
        warnings.simplefilter("ignore")
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shared with a fork
        return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)


def _file_backed_ranges() -> list[tuple[int, int]]:
    """[start, end) of this process's memory mapped from files (Linux), e.g. safetensors weights
    that ``from_pretrained`` maps rather than copies. Empty elsewhere."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def _release_pages(start: int, nbytes: int) -> None:
    """Drop the whole pages of [start, start + nbytes) from a private file mapping whose tensor is
    gone (``MADV_DONTNEED``): the mapping stays, for the weights beside it, but these pages stop
    counting as the process's memory. A page shared with a neighbouring tensor is kept."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + nbytes) // page * page
    if hi > lo:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
        except (OSError, AttributeError):
            pass


def release_packed(model: nn.Module) -> int:
    """Drop the packed copies of ``model``'s weights that :func:`packed_linears` keeps for later
    calls (as large as the weights themselves: 0.5 GB for SmolLM2-135M in fp32); the next call
    packs them again (~0.4 s for SmolLM2-135M on one core). For a caller that does other work
    between generations, such as PPO scoring and updating after its rollouts. The freed memory is
    then handed back to the OS (glibc's ``malloc_trim``: freed heap blocks are otherwise kept by
    the process). Returns the number of packed weights dropped."""
    ids = {id(p) for p in model.parameters()}
    dropped = 0
    for key in ids & _PACKED.keys():
        ref, _, packed = _PACKED[key]
        if packed is not None:
            _PACKED[key] = (ref, None, None)  # the entry and its finalizer stay, for the next packing
            dropped += 1
    if dropped:
        _malloc_trim()
    return dropped


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): freed memory stays with the process
        pass


# ---------------------------------------------------------------------------------------------
# One stream of forwards: a batch, its KV cache, its attention mask


@dataclass
class _Branch:
    """The state of one batch of sequences being extended (the conditional or CFG's unconditional
    branch): a KV cache, a preallocated (B, P + N) attention mask of which ``length`` columns are
    in use, and the position id of each row's next token."""

    cache: object
    mask: Tensor  # (B, P + N) long
    length: int
    positions: Tensor  # (B, 1) long
    static: bool  # a StaticCache: the model sees the full-width mask every step
    padded: bool  # some row is left-padded; without padding the mask is plain causal and is not passed


def _growing_layer_class():
    """A ``DynamicLayer`` (attention sees exactly the tokens so far, rows can be dropped) that
    writes into a buffer allocated once for the whole generation instead of concatenating: the
    ``torch.cat`` of every layer's keys and values each step was ~10% of a CPU decode step."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, max_len: int):
            super().__init__()
            self.max_len = max_len
            self.length = 0

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            B, H, _, _ = key_states.shape
            self.device = key_states.device
            self.key_buf = key_states.new_zeros((B, H, self.max_len, key_states.shape[-1]))
            self.value_buf = value_states.new_zeros((B, H, self.max_len, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.max_len:
                raise RuntimeError(f"KV buffer of {self.max_len} positions overflowed")
            self.key_buf[:, :, self.length:end] = key_states
            self.value_buf[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self.key_buf = self.key_buf.index_select(0, indices)
                self.value_buf = self.value_buf.index_select(0, indices)
                self.keys, self.values = self.key_buf[:, :, :self.length], self.value_buf[:, :, :self.length]

        def reset(self) -> None:
            self.length = 0
            self.is_initialized = False
            self.keys = self.values = None

    return PreallocatedLayer


def _new_cache(model, static: bool, max_len: int):
    """A ``StaticCache`` (fixed shapes, for CUDA graphs), or a ``DynamicCache`` whose full-attention
    layers are preallocated; sliding-window and other special layers keep transformers' classes."""
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import DynamicLayer

    if static:
        return StaticCache(config=model.config, max_cache_len=max_len)
    cache = DynamicCache(config=model.config)
    layer_cls = _growing_layer_class()
    cache.layers = [layer_cls(max_len) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _prefill(model, ids: Tensor, mask: Tensor, max_new: int, static: bool,
             slot: "_GraphSlot | None" = None) -> tuple[_Branch, Tensor]:
    """Run the prompts; returns the branch state and the (B, V) logits for the first new token.
    ``slot``: a kept static cache (and graph) to run in, reset first; its length may exceed P + N."""
    B, P = ids.shape
    width = slot.length if slot is not None else P + max_new
    full = torch.zeros((B, width), dtype=torch.long, device=ids.device)
    full[:, :P] = mask
    # Left padding: a row's first real token is position 0 (as transformers' generate does)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    if slot is not None:
        slot.cache.reset()  # in place: the captured graph keeps reading the same buffers
        cache = slot.cache
    else:
        cache = _new_cache(model, static, P + max_new)
    # Without padding, no mask: attention is plain causal (sdpa's is_causal, or no mask at all for
    # one query), which skips building a (B, 1, q, kv) mask per step (transformers does the same)
    padded = bool((mask == 0).any())
    out = model(input_ids=ids, attention_mask=full if static else (mask if padded else None), position_ids=positions,
                cache=cache, use_cache=True, logits_to_keep=1)
    branch = _Branch(cache=cache, mask=full, length=P, positions=positions[:, -1:] + 1, static=static, padded=padded)
    return branch, out.logits[:, -1]


def _prefill_once_per_prompt(model, ids: Tensor, mask: Tensor, max_new: int) -> tuple[_Branch, Tensor]:
    """:func:`_prefill` (dynamic cache) where equal prompt rows run once: k samples of one prompt
    (GRPO, RLOO, ``eval_samples``) share its prefill, whose cache rows are then repeated."""
    distinct, inverse = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
    if distinct.shape[0] == ids.shape[0]:
        return _prefill(model, ids, mask, max_new, static=False)
    P = ids.shape[1]
    branch, logits = _prefill(model, distinct[:, :P], distinct[:, P:], max_new, static=False)
    _keep_rows(branch, inverse)  # (U, ...) -> (B, ...): row i gets its prompt's cache, mask and position
    return branch, logits[inverse]


def _decode(model, branch: _Branch, tokens: Tensor) -> Tensor:
    """Feed one token per row (B,); returns the (B, V) logits for the next."""
    branch.mask[:, branch.length] = 1
    branch.length += 1
    mask = branch.mask if branch.static else (branch.mask[:, :branch.length] if branch.padded else None)
    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=branch.positions,
                cache=branch.cache, use_cache=True, logits_to_keep=1)
    branch.positions = branch.positions + 1
    return out.logits[:, -1]


def _keep_rows(branch: _Branch, keep: Tensor) -> None:
    """Keep the rows ``keep`` of a (dynamic-cache) branch, in that order: its cache layers, mask and
    positions. Drops finished rows; with repeated indices it also repeats rows (a shared prefill)."""
    branch.cache.batch_select_indices(keep)
    branch.mask = branch.mask.index_select(0, keep)
    branch.positions = branch.positions.index_select(0, keep)


# ---------------------------------------------------------------------------------------------
# CUDA: a static-cache decode step captured as a graph


def _sharded(model) -> bool:
    """An FSDP-sharded model (its forward hooks gather parameters; see ankus.distributed)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(model, FSDPModule)


def _graph_safe(model) -> bool:
    """Full attention in every layer, through sdpa or eager attention: our own 4-D additive mask
    is then exactly the model's mask (flash-attention kernels want 2-D masks instead). Not a
    sharded model: its forward runs FSDP's hooks, which a graph replay would skip."""
    if _sharded(model):
        return False
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    return getattr(cfg, "sliding_window", None) in (None, 0) and not getattr(cfg, "is_encoder_decoder", False)


def _additive_mask(mask2d: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 1/0 -> (B, 1, 1, L) 0 / dtype-min: a one-query attention bias that sdpa and eager
    attention both accept. Causality is implicit: columns past the current token are still 0."""
    return torch.zeros(mask2d.shape, dtype=dtype, device=mask2d.device).masked_fill(
        mask2d == 0, torch.finfo(dtype).min)[:, None, None, :]


@dataclass(eq=False)
class _GraphSlot:
    """What a captured decode step reads and writes, kept between calls: the static cache, the
    input buffers (token, position, 4-D additive mask) and the graph with its output."""

    model: "weakref.ref"
    weights: int  # data pointer of the first parameter: a model whose weights moved needs a new slot
    cache: object
    length: int  # the cache's positions
    tok_buf: Tensor  # (B, 1)
    pos_buf: Tensor  # (B, 1)
    mask_buf: Tensor  # (B, 1, 1, length)
    graph: object = None  # torch.cuda.CUDAGraph once captured; False if capture failed
    logits: Tensor | None = None  # the graph's output buffer
    warm: bool = False  # one eager step has run (kernels and allocator warmed up before capture)


_SLOTS: "dict[tuple, _GraphSlot]" = {}  # insertion order = least recently used first
_MAX_SLOTS = 4


def _graph_slot(model, tag: int, batch: int, length: int, dtype: torch.dtype, compiled: bool = False) -> _GraphSlot:
    """The kept slot for (model, branch tag, batch size, cache length, dtype), made if missing.
    ``length`` is rounded up to a multiple of 64 so that prompts of similar lengths share one."""
    length = -(-length // 64) * 64
    first = next(model.parameters())
    key = (id(model), tag, batch, length, dtype, first.device, compiled)
    for stale in [k for k, v in _SLOTS.items() if v.model() is None]:  # its model is gone: free its buffers
        del _SLOTS[stale]
    slot = _SLOTS.pop(key, None)
    if slot is None or slot.model() is not model or slot.weights != first.data_ptr():
        dev = first.device
        slot = _GraphSlot(model=weakref.ref(model), weights=first.data_ptr(), cache=_new_cache(model, True, length),
                          length=length, tok_buf=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                          pos_buf=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                          mask_buf=torch.zeros((batch, 1, 1, length), dtype=dtype, device=dev))
    _SLOTS[key] = slot  # most recently used last
    while len(_SLOTS) > _MAX_SLOTS:
        _SLOTS.pop(next(iter(_SLOTS)))
    return slot


def release_graphs() -> int:
    """Drop every kept CUDA graph and static cache (their GPU memory returns to torch's allocator);
    returns how many there were. Later calls capture again."""
    n = len(_SLOTS)
    _SLOTS.clear()
    return n


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> torch.compile(model)


def _static_step(model, branch: _Branch, dtype: torch.dtype, capture: bool,
                 slot: _GraphSlot | None = None, compiled: bool = False) -> Callable[[Tensor], Tensor]:
    """A decode step with the same contract as :func:`_decode`, on fixed-shape buffers.

    The forward reads three static buffers (token, position, 4-D additive mask) refilled before
    each call, and ``StaticCache`` writes keys / values in place at an index it keeps in a device
    tensor; so the same forward, replayed, is always a valid next step. With ``capture`` (CUDA)
    the first step of a new slot runs eagerly on a side stream (a real step that also warms up
    kernels and the allocator), the next captures the forward as a CUDA graph, and every step
    after that, in this call and in later calls given the same ``slot``, replays it: one launch
    per step instead of hundreds. Without ``capture`` every step runs the forward eagerly on the
    same buffers, which is how the CPU tests check this path.
    """
    if slot is None:  # buffers for this call only
        B, width = branch.mask.shape
        dev = branch.mask.device
        slot = _GraphSlot(model=weakref.ref(model), weights=0, cache=branch.cache, length=width,
                          tok_buf=torch.zeros((B, 1), dtype=torch.long, device=dev),
                          pos_buf=branch.positions.clone(), mask_buf=_additive_mask(branch.mask, dtype))

    run = model
    if compiled:
        if model not in _COMPILED:
            _COMPILED[model] = torch.compile(model, dynamic=False)
        run = _COMPILED[model]

    def forward() -> Tensor:
        return run(input_ids=slot.tok_buf, attention_mask=slot.mask_buf, position_ids=slot.pos_buf,
                     cache=slot.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(tokens: Tensor) -> Tensor:
        branch.mask[:, branch.length] = 1
        branch.length += 1
        slot.tok_buf.copy_(tokens[:, None])
        slot.pos_buf.copy_(branch.positions)
        slot.mask_buf.copy_(_additive_mask(branch.mask, dtype))
        branch.positions = branch.positions + 1
        if not capture:
            return forward()
        if not slot.warm:
            slot.warm = True
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = forward()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if slot.graph is None:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    slot.logits = forward()
                slot.graph = graph
            except RuntimeError as e:  # a forward that syncs with the host cannot be captured
                warnings.warn(f"CUDA graph capture failed ({e}); decoding on the static cache without it")
                slot.graph = False
        if slot.graph is False:
            return forward()  # capture records without running: the cache has not moved
        slot.graph.replay()
        return slot.logits

    return step


def _decode_mode(model, config: GenerationConfig) -> str:
    """'graph': static cache + CUDA graph (CUDA, full-attention models); 'eager': the model's
    forward on a dynamic cache. ('static', the graph path without capture, is for tests.)"""
    device = next(model.parameters()).device
    if device.type == "cuda" and config.cuda_graph and _graph_safe(model):
        return "graph"
    return "eager"


# ---------------------------------------------------------------------------------------------
# The loop


def _stop_hit(tokenizer, row_tokens: list[int], stop_strings: list[str], window: int) -> bool:
    text = tokenizer.decode(row_tokens[-window:], skip_special_tokens=True)
    return any(s in text for s in stop_strings)


def cut_text(text: str, stop_strings: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


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
    static = mode in ("static", "graph")
    dtype = next(model.parameters()).dtype
    guided = config.guidance_scale != 1.0
    eos_t = torch.tensor(eos if eos else [-1], device=device)
    window = max((len(s) for s in config.stop_strings), default=0) + 8  # tokens enough to hold a stop string

    def slot(tag: int, rows: int, prompt_len: int) -> _GraphSlot | None:  # graphs are kept between calls
        return _graph_slot(model, tag, rows, prompt_len + N, dtype, compiled) if static else None

    compiled = config.compile and mode == "graph"

    def stepper(b: _Branch, s: _GraphSlot | None) -> Callable[[Tensor], Tensor]:
        return (_static_step(model, b, dtype, capture=mode == "graph", slot=s, compiled=compiled) if static
                else functools.partial(_decode, model, b))

    def prefill(tag: int, p_ids: Tensor, p_mask: Tensor) -> tuple[_Branch, Tensor, _GraphSlot | None]:
        if not static:  # a dynamic cache can repeat rows: each distinct prompt is run once
            return (*_prefill_once_per_prompt(model, p_ids, p_mask, N), None)
        s = slot(tag, B, p_ids.shape[1])
        return (*_prefill(model, p_ids, p_mask, N, static=True, slot=s), s)

    branch, logits, c_slot = prefill(0, ids, mask)
    step = stepper(branch, c_slot)
    if guided:
        u_ids, u_mask = left_pad(uncond_ids, pad_id)
        u_branch, u_logits, u_slot = prefill(1, u_ids.to(device), u_mask.to(device))
        u_step = stepper(u_branch, u_slot)

    rows = torch.arange(B, device=device)  # original index of each row still computed
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per computed row
    host_tokens: list[list[int]] = [[] for _ in range(B)]
    for t in range(N):
        scores = cfg_scores(logits, u_logits, config.guidance_scale) if guided else logits
        tokens = sample_tokens(scores, config, generator)  # (b,)
        live = ~done
        response[rows, t] = torch.where(live, tokens, torch.full_like(tokens, pad_id))
        response_mask[rows, t] = live.long()
        logprobs[rows, t] = torch.where(live, token_logps(logits, tokens), torch.zeros((), device=device))
        done = done | torch.isin(tokens, eos_t)
        if config.stop_strings:
            for j, (r, tok) in enumerate(zip(rows.tolist(), tokens.tolist())):
                if live[j]:
                    host_tokens[r].append(tok)
                    if _stop_hit(tokenizer, host_tokens[r], config.stop_strings, window):
                        done[j] = True
        if t == N - 1:
            break
        n_done = int(done.sum()) if (device.type != "cuda" or t % 8 == 7) else 0  # a sync; rarely on GPU
        if n_done == done.numel():
            break
        if not static and n_done and 4 * n_done >= done.numel():
            keep = (~done).nonzero().squeeze(-1)
            _keep_rows(branch, keep)
            if guided:
                _keep_rows(u_branch, keep)
            rows, done, tokens = rows[keep], done[keep], tokens[keep]
        logits = step(tokens)
        if guided:
            u_logits = u_step(tokens)

    texts = []
    for r in range(B):
        n = int(response_mask[r].sum())
        text = tokenizer.decode(response[r, :n].tolist(), skip_special_tokens=True)
        texts.append(cut_text(text, config.stop_strings) if config.stop_strings else text)
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
    negative_ids = None
    if config.guidance_scale != 1.0:
        if negative_prompts is not None:
            negative_ids = encode_prompts(tokenizer, negative_prompts, config.chat_template)
        elif config.negative_prompt is not None:
            negative_ids = encode_prompts(tokenizer, [config.negative_prompt] * len(prompt_ids), config.chat_template)
        uncond_ids = unconditional_prompts(prompt_ids, negative_ids)
    elif negative_prompts is not None and len(negative_prompts) != len(prompt_ids):
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompt_ids)} prompts")
    all_eos = eos_token_ids(model, tokenizer)
    eos = [] if config.ignore_eos else all_eos
    pad_id = pad_token(tokenizer)

    size = batch_size or len(prompt_ids)
    starts = list(range(0, len(prompt_ids), size))
    if len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    if config.bf16 and not packed_linears_available(model):
        raise ValueError("bf16=True is a CPU option (oneDNN bf16 linears); on GPU load the model in bf16 instead")
    use_packed = config.bf16 or (config.packed_linears and packed_linears_available(model) and not _sharded(model))
    pack = (packed_linears(model, torch.bfloat16 if config.bf16 else None, rows_hint=min(size, 64),
                           move_frozen=config.move_frozen) if use_packed else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with pack:
            for s in starts:
                chunk = prompt_ids[s:s + size]
                u_chunk = uncond_ids[s:s + size] if config.guidance_scale != 1.0 else None
                outputs.append(_generate_chunk(model, tokenizer, chunk, u_chunk, config, eos, pad_id, generator))
    finally:
        model.train(was_training)
    return concat_outputs(outputs, pad_id)
