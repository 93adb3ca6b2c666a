"""Hydra: the PPO reference model as a frozen branch off the policy's own trunk.

trlX's ``num_layers_unfrozen: N`` trains only the top N decoder blocks of the policy. The
bottom L−N blocks and the embeddings never change, so the policy's hidden state entering
block L−N is also the *initial* model's hidden state there, and the reference logits need
only N more blocks on top of it, not a second model (trlX ``modeling_ppo.py``,
``forward_hydra``).

trlX wrote one branch class per architecture (six forwards). Here the branch is the model's
own module tree, copied structurally (containers are re-created, leaves shared):

* the bottom L−N decoder layers are stand-ins: the last one returns the policy's cached
  hidden state at the split, the others pass their input through;
* every module that trains (the top N blocks, the final norm, an untied head if asked to
  train) is a frozen deep copy taken when the branch is built;
* everything else (embeddings, frozen head, rotary tables) is shared, and must stay frozen.

The model's own forward still runs, with its own mask and rotary code, so nothing here is
architecture-specific. The rule that keeps the reference exact is checked on every call:
whatever the branch shares with the policy (and the bottom blocks feeding the split) must be
frozen; whatever trains must have been copied into the branch. (trlX issue #517: a
reference drifted because a tied embedding/head kept training.)
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ankus.data.tokens import position_ids_from_mask
from ankus.models.layers import decoder_layers, find_decoder_layers

__all__ = ["freeze_for_hydra", "HydraReference", "TrunkCache", "eval_mode"]


# ---------------------------------------------------------------------------------------------
# finding the parts of a model, generically


def _final_modules(model: nn.Module, layers_name: str) -> list[str]:
    """Qualified names of the children of the blocks' parent registered after the block list:
    the final norm (``norm``, ``final_layer_norm``, ``ln_f``) and parameter-free helpers such as
    a rotary table. Registration order follows ``__init__``, which follows the forward in HF
    models; what comes *before* the blocks (embeddings, an embedding norm) stays frozen."""
    parent_name, _, list_attr = layers_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = list(parent._modules)
    after = names[names.index(list_attr) + 1:]
    return [f"{parent_name}.{n}" if parent_name else n for n in after if parent._modules[n] is not None]


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next(name for name, m in model.named_modules() if m is head)


def _shares_params(a: nn.Module, b: nn.Module | None) -> bool:
    if b is None:
        return False
    ids = {id(p) for p in b.parameters()}
    return any(id(p) in ids for p in a.parameters())


def _num_layers(model: nn.Module, num_layers_unfrozen: int) -> tuple[str, nn.ModuleList, int]:
    name, layers = find_decoder_layers(model)
    if not 0 <= num_layers_unfrozen <= len(layers):
        raise ValueError(f"num_layers_unfrozen={num_layers_unfrozen}, but the model has {len(layers)} decoder "
                         "layers; use -1 to train all of them")
    return name, layers, num_layers_unfrozen


# ---------------------------------------------------------------------------------------------
# freezing


def freeze_for_hydra(model: nn.Module, num_layers_unfrozen: int, *, train_head: bool = False) -> None:
    """Set ``requires_grad`` for trlX-style partial training, in place.

    Trainable: the top ``num_layers_unfrozen`` decoder blocks and the final norm after them;
    with ``train_head=True`` also an *untied* output head. Frozen: embeddings (input and
    position), the bottom blocks, anything before the blocks, and the head by default. The
    head is frozen by default so tied and untied models train the same set and the branch
    can share the head (a V×H matrix) instead of copying it. A tied head cannot train: it is
    the input embedding, which feeds the frozen trunk (trlX issue #517), so asking raises.

    ``-1`` trains everything (the reference must then be a separate copy); ``0`` freezes the
    whole LM (only a value head, kept outside the model, would train). Call it on the bare
    causal LM: a value head registered inside the model would be frozen too.
    """
    if num_layers_unfrozen == -1:
        model.requires_grad_(True)
        return
    layers_name, layers, n = _num_layers(model, num_layers_unfrozen)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if train_head:
        if head is None:
            raise ValueError("train_head=True, but the model has no output embeddings")
        if _shares_params(head, model.get_input_embeddings()):
            raise ValueError("train_head=True, but the head is tied to the input embedding, which feeds the frozen "
                             "trunk; untie it first or leave the head frozen")
    model.requires_grad_(False)
    if n == 0:
        return
    for layer in layers[len(layers) - n:]:
        layer.requires_grad_(True)
    for name in _final_modules(model, layers_name):
        model.get_submodule(name).requires_grad_(True)
    if train_head:
        head.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# the branch


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block, each one's own flag restored after (a
    reference must not see dropout; the policy's train/eval state must survive)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class _Split:
    """The hidden state handed from the policy's trunk to the branch for one call."""

    def __init__(self) -> None:
        self.hidden: Tensor | None = None


class _StandIn(nn.Module):
    """Takes a bottom decoder layer's place in the branch.

    The last stand-in returns the policy's hidden state at the split, the others return their
    input unchanged (their input is ignored downstream anyway). Attribute lookups it cannot
    answer go to the layer it replaces, so a model forward that reads per-layer attributes
    (e.g. ``attention_type`` in sliding-window models) still works. Decoder layers of Llama,
    GPT-NeoX and GPT-2 in transformers 5.x return a bare tensor, and so does this.
    """

    def __init__(self, layer: nn.Module, split: _Split | None):
        super().__init__()
        object.__setattr__(self, "_replaced", layer)  # not registered: the branch must not own it
        object.__setattr__(self, "_split", split)

    def forward(self, *args, **kwargs) -> Tensor:
        split = object.__getattribute__(self, "_split")
        if split is None:
            return args[0] if args else kwargs["hidden_states"]
        if split.hidden is None:
            raise RuntimeError("the Hydra branch was run without a hidden state; call HydraReference.logits")
        return split.hidden

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_replaced"), name)


def _restructure(root: nn.Module, replace: dict[str, nn.Module]) -> nn.Module:
    """A structural copy of ``root``: modules on the path to each replaced name are shallow
    copies with their own child/param/hook dicts, every other submodule is shared."""
    clone = copy.copy(root)
    for key, value in vars(root).items():  # fresh _modules/_parameters/hook dicts, same tensors
        if isinstance(value, (dict, set)):
            setattr(clone, key, copy.copy(value))
    nested: dict[str, dict[str, nn.Module]] = {}
    for name, module in replace.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = module
        else:
            clone._modules[head] = module
    for head, sub in nested.items():
        clone._modules[head] = _restructure(root._modules[head], sub)
    return clone


class HydraReference:
    """Reference logits for a policy whose bottom blocks are frozen: N frozen blocks on top of
    the policy's own hidden state at layer L−N.

    Build it right after :func:`freeze_for_hydra` (or any freezing where only the top
    ``num_layers_unfrozen`` blocks, the modules after them and an untied head train), with the
    model already on its device and in its dtype: the copies are taken then, so the branch is
    the model *as it is now*.
    """

    def __init__(self, model: nn.Module, num_layers_unfrozen: int):
        layers_name, layers, n = _num_layers(model, num_layers_unfrozen)
        n_layers = len(layers)
        if not 1 <= n < n_layers:
            raise ValueError(f"Hydra needs 1 <= num_layers_unfrozen < {n_layers} (the model's layer count); with "
                             f"{num_layers_unfrozen} there is no frozen trunk to branch from: use a separate copy")
        self.model = model
        self.num_layers_unfrozen = n
        self.split_index = n_layers - n  # hidden_states[split_index] enters the first trainable block
        self._split = _Split()

        stand_ins = [_StandIn(layer, self._split if i == self.split_index - 1 else None)
                     for i, layer in enumerate(layers[: self.split_index])]
        top = [copy.deepcopy(layer) for layer in layers[self.split_index:]]
        replace: dict[str, nn.Module] = {layers_name: nn.ModuleList(stand_ins + top)}
        copied = [*layers[self.split_index:]]
        for name in _final_modules(model, layers_name):
            module = model.get_submodule(name)
            replace[name] = copy.deepcopy(module)
            copied.append(module)
        head_name = _head_name(model)
        if head_name is not None:
            head = model.get_submodule(head_name)
            if any(p.requires_grad for p in head.parameters()):  # an untied head that trains
                replace[head_name] = copy.deepcopy(head)
                copied.append(head)
        for module in replace.values():
            module.requires_grad_(False)
            module.eval()
        self.branch = _restructure(model, replace)

        copied_ids = {id(p) for m in copied for p in m.parameters()}
        owned_ids = {id(p) for m in replace.values() for p in m.parameters()}
        # The rule that keeps the reference exact: the policy may train only what was copied.
        self._must_stay_frozen = [(name, p) for name, p in model.named_parameters() if id(p) not in copied_ids]
        self._owned = [(name, p) for name, p in self.branch.named_parameters(remove_duplicate=False)
                       if id(p) in owned_ids]
        self._check_frozen()

    def _check_frozen(self) -> None:
        trainable = [name for name, p in self._must_stay_frozen if p.requires_grad]
        if trainable:
            raise ValueError(
                f"Hydra reference would drift: {len(trainable)} policy parameter(s) outside the top "
                f"{self.num_layers_unfrozen} blocks train but are shared with the reference, e.g. {trainable[:3]}. "
                f"Call freeze_for_hydra(model, {self.num_layers_unfrozen}) before building the reference.")

    def owned_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The branch's own (deep-copied) parameters, as (name in the branch, tensor)."""
        return list(self._owned)

    def num_owned_bytes(self) -> int:
        """Bytes of parameters the branch adds on top of the policy."""
        seen: set[int] = set()
        total = 0
        for _, p in self._owned:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    @torch.no_grad()
    def logits(self, hidden_state_at_split: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None,
               logits_to_keep: int = 0) -> Tensor:
        """Reference logits (B, T, V) — or (B, logits_to_keep, V) — from the policy's hidden
        state entering block L−N, ``output_hidden_states=True``'s ``hidden_states[split_index]``
        (B, T, H).

        ``attention_mask`` (B, T) and ``position_ids`` must be those of the policy forward that
        produced the hidden state (``None`` means the model's default, as it did there), and that
        forward must not have used dropout, or the branch sees a noisy input.
        """
        self._check_frozen()
        self._split.hidden = hidden_state_at_split
        try:
            with eval_mode(self.branch):
                # inputs_embeds only gives the forward its shapes: the stand-ins drop it.
                out = self.branch(inputs_embeds=hidden_state_at_split, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False, logits_to_keep=logits_to_keep)
        finally:
            self._split.hidden = None
        return out.logits

    @torch.no_grad()
    def hidden_at_split(self, input_ids: Tensor, attention_mask: Tensor | None,
                        position_ids: Tensor | None = None) -> Tensor:
        """Run the policy's frozen trunk only (blocks below the split) and return the hidden state
        entering block L−N (B, T, H); for callers that have no policy forward to reuse."""
        captured: dict[str, Tensor] = {}

        def stop(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _TrunkDone

        handle = decoder_layers(self.model)[self.split_index].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with eval_mode(self.model):
                self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
        except _TrunkDone:
            pass
        finally:
            handle.remove()
        return captured["h"]


class _TrunkDone(Exception):
    """Raised by a pre-hook to stop a forward once the split's input has been captured."""


class TrunkCache:
    """The policy's top N blocks run on a cached hidden state at the split (PPO under Hydra).

    Under Hydra the bottom L−N blocks and the embeddings are frozen, so a rollout's hidden state
    entering block L−N cannot change during the PPO epochs: the scoring forward already computed
    it (``hidden_states[L−N]``). ``view`` is the policy's own module tree with the bottom blocks
    swapped for stand-ins that return that state (the branch's construction above, but with the
    top blocks, final norm and head *shared* with the policy rather than copied), so the model's
    own mask/rotary code runs and gradients reach the policy's parameters.
    """

    def __init__(self, model: nn.Module, split_index: int):
        name, layers = find_decoder_layers(model)
        self.split = _Split()
        stand_ins = [_StandIn(layer, self.split if i == split_index - 1 else None)
                     for i, layer in enumerate(layers[:split_index])]
        self.view = _restructure(model, {name: nn.ModuleList(stand_ins + list(layers[split_index:]))})

    def forward(self, value_head: nn.Module | None, hidden: Tensor, attention_mask: Tensor,
                n_resp: int) -> tuple[Tensor, Tensor | None]:
        """The response positions' logits (B, N, V) and values (B, N) (None without a value head)
        from ``hidden`` (B, T, H), as a full forward of the policy over the rows would give them."""
        self.split.hidden = hidden
        try:
            out = self.view(inputs_embeds=hidden, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask),
                            output_hidden_states=value_head is not None, logits_to_keep=n_resp + 1, use_cache=False)
        finally:
            self.split.hidden = None
        values = value_head(out.hidden_states[-1][:, -n_resp - 1:-1]) if value_head is not None else None
        return out.logits[:, :-1], values
