"""Data parallelism across processes, as free functions over ``torch.distributed``.

Launch any trainer with several processes and it trains one model on their combined batches:

    torchrun --nproc_per_node 8 -m ankus.cli train dpo_smollm2
    accelerate launch --config_file configs/accelerate/ddp_multigpu.yaml -m ankus.cli train sft_tiny

Both launchers set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; :func:`setup` reads them
and joins the process group (gloo for CPU tensors, NCCL for CUDA ones). Without them every
function here is a no-op for one process, so single-process code paths are the same code.

How the trainers use it (see docs/distributed.md):

* ``trainer.batch_size`` counts examples *per process*: N processes with batch b train exactly
  like one process with batch N·b. Every process builds the same global batch order from the
  same seed and takes its :func:`shard`.
* Losses that are means over examples or tokens are computed locally and scaled by
  local count / global count, so that the **sum** over processes is the global mean; gradients
  are then summed over processes with :func:`sync_gradients` (an explicit all-reduce after
  backward rather than a ``DistributedDataParallel`` wrapper: it is exact, needs no equal
  number of forwards per process, and does not care that a Hydra policy has frozen parameters
  or that the value head is a separate module). Every process then holds the same gradient,
  clips it the same way and takes the same optimizer step, so the replicas stay identical.
* Statistics that need the whole batch (advantage whitening, running reward moments, the KL
  fed to the controller, logged metrics) are computed from sums over processes — the ``reduce``
  argument of :mod:`ankus.rl.stats` takes :func:`all_reduce_sum` — or over gathered tensors.
* Only the main process (rank 0) writes the run directory, metrics, plots and checkpoints
  (:func:`on_main`, :func:`main_only`); checkpoints also carry every rank's torch RNG state
  (:func:`rank_rng_states`).
* Sharding (SFT, DPO, PPO and the reward model, ``trainer.fsdp: true``): :func:`fsdp_wrap` shards parameters, gradients
  and optimizer state with torch's FSDP2 (``fully_shard``, one unit per decoder layer plus the
  root). FSDP then reduce-scatters the gradients itself — summed, not averaged, so the same
  loss scaling holds and :func:`sync_gradients` is skipped; :func:`clip_grad_norm` returns the
  global norm; :func:`checkpoint_views` and :func:`unsharded_copy` gather full state dicts for
  checkpoints and the saved Hugging Face model. Every process must then run the same forwards,
  except inside :func:`full_params`, which gathers the whole model once (PPO samples and scores
  rollouts there).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

__all__ = ["DistState", "setup", "state", "is_main", "world_size", "rank", "all_reduce_sum", "all_reduce_max",
           "sum_floats", "any_rank", "broadcast_object", "all_gather_objects", "all_gather_cat", "shard",
           "shard_bounds", "sync_gradients", "broadcast_parameters", "weighted_stats", "on_main", "main_only",
           "barrier", "rank_rng_states", "restore_rank_rng", "teardown", "resolve_device", "use_fsdp",
           "fsdp_wrap", "is_sharded", "clip_grad_norm", "full_params", "checkpoint_views", "unsharded_copy"]


@dataclass(frozen=True)
class DistState:
    """Where this process stands: its rank among ``world_size`` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    """This process's accelerator (cuda:LOCAL_RANK when CUDA is there), else cpu."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_STATE = DistState()
_OWN_GROUP = False  # True when setup() created the process group (then teardown() destroys it)


def _env_flag(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true")


def setup(fsdp_ok: bool = False, shard: bool = False) -> DistState:
    """Join the process group when launched with several processes; idempotent.

    A group already created by the caller (or by Accelerate) is used as is. The backend string
    ``cpu:gloo,cuda:nccl`` routes each collective by its tensors' device, so trainers that keep
    some tensors on the CPU work on GPU machines too. A launch with an Accelerate DeepSpeed
    configuration is refused, and so is an FSDP one unless the trainer shards (``fsdp_ok``:
    SFT, DPO, PPO and the reward model, see :func:`use_fsdp`). ``shard`` (the trainer's ``trainer.fsdp``) joins a
    group of one too when a launcher started a single process, so that it can shard over a mesh
    of one (the sharded code path on a single GPU).
    """
    global _STATE, _OWN_GROUP
    for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if _env_flag(var) and not (fsdp_ok and what == "FSDP"):
            # running replicated under a sharding config would be a silent surprise (or an OOM)
            raise RuntimeError(f"launched with an Accelerate {what} configuration, but this trainer replicates the "
                               "model on every process (data parallel) and does not shard it (FSDP: SFT, DPO, "
                               "PPO, the reward model and pretrain only, trainer.fsdp=true); launch with "
                               "configs/accelerate/ddp_multigpu.yaml or "
                               "torchrun (see docs/distributed.md)")
    if dist.is_available() and dist.is_initialized():
        pass
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
            fsdp_ok and (shard or _env_flag("ACCELERATE_USE_FSDP")) and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" in os.environ):
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())  # more processes than GPUs: share
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)  # env:// rendezvous, set up by the launcher
        _OWN_GROUP = True
        atexit.register(teardown)
    else:
        _STATE = DistState(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        return _STATE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = (torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available()
              else torch.device("cpu"))
    _STATE = DistState(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return _STATE


def teardown() -> None:
    """Leave the process group if :func:`setup` created it (also registered at exit)."""
    global _STATE, _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False
    _STATE = DistState()


def state() -> DistState:
    return _STATE


def is_main() -> bool:
    return _STATE.rank == 0


def world_size() -> int:
    return _STATE.world_size


def rank() -> int:
    return _STATE.rank


def barrier() -> None:
    if _STATE.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# reductions


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes, in place, and return it (a no-op for one process).

    This is the ``reduce`` argument of :mod:`ankus.rl.stats` (``masked_mean``, ``masked_whiten``,
    ``RunningMoments``): they pass sums and counts through it and get global statistics.
    """
    if _STATE.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over all processes, in place."""
    if _STATE.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_floats(*values: float) -> list[float]:
    """Sum a few Python numbers over processes in one collective (float64)."""
    if not _STATE.enabled:
        return [float(v) for v in values]
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def any_rank(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (e.g. a stop signal that reached one rank)."""
    if not _STATE.enabled:
        return bool(flag)
    return bool(all_reduce_max(torch.tensor([1.0 if flag else 0.0]))[0] > 0)


def weighted_stats(values: dict[str, float], weight: float, max_keys: Iterable[str] = ()) -> dict[str, float]:
    """Σ_ranks weight·value for each key (one collective): the global mean of a statistic when each
    rank passes its local mean and weight = its share of the counted elements (shares sum to 1).
    Keys in ``max_keys`` are maxima over ranks instead. Same keys, in any order, on every rank."""
    keys = sorted(values)
    maxed = [k for k in keys if k in set(max_keys)]
    summed = [k for k in keys if k not in set(maxed)]
    out = {}
    if summed:
        vec = torch.tensor([values[k] * weight for k in summed], dtype=torch.float64)
        out.update(zip(summed, all_reduce_sum(vec).tolist()))
    if maxed:
        vec = torch.tensor([values[k] for k in maxed], dtype=torch.float64)
        out.update(zip(maxed, all_reduce_max(vec).tolist()))
    return out


# ---------------------------------------------------------------------------------------------
# moving objects and tensors


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every process (pickled; for small things)."""
    if not _STATE.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order, on every process (pickled; for small things)."""
    if not _STATE.enabled:
        return [obj]
    out: list[Any] = [None] * _STATE.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate every process's ``t`` along dim 0, in rank order; the first dimension may differ
    between processes, the others must agree."""
    if not _STATE.enabled:
        return t
    t = t.contiguous()
    sizes = torch.zeros(_STATE.world_size, dtype=torch.long)
    sizes[_STATE.rank] = t.shape[0]
    sizes = all_reduce_sum(sizes).tolist()
    biggest = max(sizes)
    if t.shape[0] < biggest:  # all_gather wants equal shapes: pad, then trim
        t = torch.cat([t, t.new_zeros((biggest - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, t)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous block of ``n`` items; block sizes differ by at most
    one (the first ``n % world`` ranks get the extra item), and the blocks in rank order are 0..n."""
    r = _STATE.rank if rank_ is None else rank_
    w = _STATE.world_size if world is None else world
    q, rem = divmod(n, w)
    start = r * q + min(r, rem)
    return start, start + q + (1 if r < rem else 0)


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> Sequence[T]:
    """This rank's contiguous block of ``items`` (see :func:`shard_bounds`). Every rank builds the
    same global order and takes its block, so rank 0's block followed by rank 1's ... is the global
    order a single process would use."""
    start, stop = shard_bounds(len(items), rank_, world)
    return items[start:stop]


# ---------------------------------------------------------------------------------------------
# gradients and parameters


@torch.no_grad()
def sync_gradients(params: Iterable[Tensor], average: bool = False, bucket_numel: int = 1 << 24) -> None:
    """Sum (or average) the ``.grad`` of ``params`` over processes, in place.

    Call it after backward and before clipping. Trainers scale each rank's loss by its share of
    the global count, so the sum is the global batch's gradient. A parameter that received no
    gradient on some ranks counts as zero there; one that received none on any rank keeps
    ``grad=None`` (so AdamW skips it, as it would in a single process). Gradients travel in a few
    flat buckets of at most ``bucket_numel`` elements, one all-reduce each. Sharded (FSDP)
    parameters are skipped: FSDP has reduce-scattered their gradients already.
    """
    if not _STATE.enabled:
        return
    params = [p for p in params if not _is_dtensor(p)]  # FSDP reduce-scatters those itself
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    has_grad = all_reduce_sum(has_grad).tolist()
    live = [p for p, h in zip(params, has_grad) if h > 0]
    buckets: list[list[Tensor]] = []
    for p in live:  # consecutive parameters of one device and dtype share a bucket
        b = buckets[-1] if buckets else None
        if (b is None or b[0].device != p.device or b[0].dtype != p.dtype
                or sum(q.numel() for q in b) + p.numel() > bucket_numel):
            buckets.append([p])
        else:
            b.append(p)
    for bucket in buckets:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if average:
            flat /= _STATE.world_size
        offset = 0
        for p in bucket:
            g = flat[offset:offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += p.numel()


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every process's ``module`` (start all
    replicas bitwise equal, whatever ran before on each rank)."""
    if not _STATE.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


# ---------------------------------------------------------------------------------------------
# the main process does the writing


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call ``fn`` on the main process only; every process returns its result. If it raises,
    every process raises it (so no rank is left waiting for a result that never comes)."""
    if not _STATE.enabled:
        return fn(*args, **kwargs)
    result, error = None, None
    if _STATE.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to every rank below
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


class _Nothing:
    """Stands in for an object that only the main process holds: every method call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def main_only(make: Callable[[], T]) -> T:
    """``make()`` on the main process; elsewhere an object whose methods do nothing (a metrics
    logger that writes only once, say)."""
    return make() if _STATE.is_main else _Nothing()  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# per-rank RNG in checkpoints


def rank_rng_states() -> dict[str, torch.Generator]:
    """Every rank's global torch RNG, as ``{"torch_rank<r>": generator}`` for the ``generators``
    argument of :func:`ankus.checkpoint.save_checkpoint` (collective; call on every rank). The
    checkpoint's own ``torch`` entry is the main process's state; these let each rank resume its
    own stream (dropout draws differ between ranks). Empty for one process."""
    if not _STATE.enabled:
        return {}
    states = all_gather_objects(torch.get_rng_state())
    out = {}
    for r, s in enumerate(states):
        g = torch.Generator()  # a CPU generator's state has the layout of the global CPU RNG's
        g.set_state(s)
        out[f"torch_rank{r}"] = g
    return out


def restore_rank_rng(checkpoint: str | Path) -> None:
    """After ``load_checkpoint``: put this rank's own saved torch RNG state back, if the
    checkpoint has one (a checkpoint from a single-process run has none)."""
    if not _STATE.enabled:
        return
    saved = torch.load(Path(checkpoint) / "rng.pt", weights_only=True)
    key = f"torch_rank{_STATE.rank}"
    if key in saved.get("generators", {}):
        torch.set_rng_state(saved["generators"][key])


# ---------------------------------------------------------------------------------------------
# device


def resolve_device(choice: str = "auto") -> torch.device:
    """``trainer.device``: ``auto`` = this process's GPU when CUDA is there (cuda:LOCAL_RANK),
    else the CPU; ``cpu``; ``cuda`` (an error without CUDA). Call after :func:`setup`."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda, but torch sees no CUDA device (use auto or cpu)")
    if choice not in ("auto", "cuda"):
        raise ValueError(f"trainer.device must be auto, cpu or cuda, got {choice!r}")
    if torch.cuda.is_available():
        return torch.device("cuda", _STATE.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# sharding (FSDP2)


def use_fsdp(requested: bool) -> bool:
    """Shard when ``trainer.fsdp`` is set or the launch used an Accelerate FSDP configuration, and
    the process group exists: several processes, or one launched by torchrun / accelerate with
    sharding asked for (a mesh of one: the sharded code path on a single GPU). A plain single
    process has no group: it trains unsharded."""
    return (requested or _env_flag("ACCELERATE_USE_FSDP")) and dist.is_available() and dist.is_initialized()


def fsdp_wrap(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place over all processes with FSDP2 (``fully_shard``): each decoder layer
    is one unit (its parameters are gathered for its forward and backward only), the rest
    (embeddings, final norm, head; tied weights stay together) is the root unit. Gradients are
    reduce-scattered as **sums** (divide factor 1): trainers already scale each process's loss by
    its share of the global batch. Call before building the optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (_STATE.world_size,))
    from ankus.models.layers import decoder_layers

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.set_gradient_divide_factor(1.0)
            # a plain SUM (with a divide factor FSDP would use PREMUL_SUM, which gloo lacks); a
            # factor of 1 then scales by nothing
            mod.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "full_tensor")  # a DTensor: a parameter sharded by fully_shard


def clip_grad_norm(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """``clip_grad_norm_`` whose result is the global norm as a plain tensor (with sharded
    parameters torch returns a DTensor); ``max_norm`` <= 0 only measures. Sharded and plain
    parameters may be mixed (PPO under FSDP: a sharded policy and a replicated value head):
    the norm is then sqrt(‖sharded‖² + ‖plain‖²) and both groups are scaled alike."""
    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if _is_dtensor(p)]
    if not sharded or len(sharded) == len(params):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    plain = [p for p in params if not _is_dtensor(p)]
    sharded_norm = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
    plain_norm = torch.nn.utils.get_total_norm([p.grad for p in plain])
    norm = torch.linalg.vector_norm(torch.stack([sharded_norm, plain_norm.to(sharded_norm.device)]))
    if max_norm > 0:
        coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))  # as clip_grad_norm_ computes it
        for p in params:
            p.grad.mul_(coef)
    return norm


@contextlib.contextmanager
def full_params(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block a sharded model holds its full parameters on every process, so its
    forwards run with no collective (sampling, where processes stop after different numbers of
    steps; a Hydra branch that shares the model's frozen head). A collective on entry and exit:
    call it on every process. Memory: the whole model, as unsharded training would hold it.
    A model that is not sharded is returned as is."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    layers = [m for m in units if m is not model]
    for unit in units:
        unit.unshard()  # all-gather; a forward's own unshard is then a no-op
    for unit in layers:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in layers:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()


class _Gathered:
    """A sharded module or optimizer as :func:`ankus.checkpoint.save_checkpoint` and
    ``load_checkpoint`` see it: full (unsharded) state dicts, keyed like the unsharded model's."""

    def __init__(self, model, optimizer=None, state=None):
        self.model, self.optimizer, self.state = model, optimizer, state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state, strict: bool = True):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, strict=strict)
        if self.optimizer is None:
            result = set_model_state_dict(self.model, state, options=options)
            # a tied weight saved under one name only (an unsharded run's checkpoint) is not missing
            own = dict(self.model.named_parameters())  # tied parameters appear once
            return type(result)([k for k in result.missing_keys if k in own], result.unexpected_keys)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=options)


def checkpoint_views(model: torch.nn.Module, optimizer=None, gather: bool = True,
                     optimizer_owner: torch.nn.Module | None = None):
    """``(model, optimizer)`` for save_checkpoint / load_checkpoint: themselves when ``model`` is
    not sharded; under FSDP stand-ins that gather full state dicts (``gather``: for saving; a
    collective, call on every process, then save on the main one) or scatter a full state dict
    back into the shards (for loading, on every process). ``optimizer_owner``: a module holding
    every parameter the optimizer updates, when that is more than ``model`` (PPO: the policy and
    its value head); the optimizer state is then keyed by names in it."""
    if not is_sharded(model):
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    owner = optimizer_owner if optimizer_owner is not None else model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the main process gets it all
    model_state = get_model_state_dict(model, options=options) if gather else None
    opt_state = get_optimizer_state_dict(owner, optimizer, options=options) if gather and optimizer else None
    return (_Gathered(model, state=model_state),
            _Gathered(owner, optimizer, state=opt_state) if optimizer is not None else None)


def unsharded_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """An ordinary (unsharded, CPU) copy of a sharded model on the main process, None elsewhere;
    ``model`` itself when it is not sharded. A collective: call on every process. For saving in
    Hugging Face format and for evaluations that only the main process runs."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not _STATE.is_main:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclassed it
    dtype = next(iter(state.values())).dtype
    plain = cls(model.config).to(dtype)
    plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    if hasattr(model, "generation_config"):
        plain.generation_config = model.generation_config
    return plain.eval()
