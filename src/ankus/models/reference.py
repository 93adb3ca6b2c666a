"""The PPO reference model, one front door for three ways of keeping it (trlX PPO, step 3):

* ``"hydra"``: the policy trains only its top N blocks; the reference is N frozen blocks on
  the policy's own hidden state at layer L−N (:mod:`ankus.models.hydra`). Cost: N layers.
* ``"lora"``: the policy trains LoRA adapters; the reference is the same model with the
  adapters switched off (peft's ``disable_adapter``). Cost: one more forward, no memory.
* ``"copy"``: a deep-copied, frozen, eval-mode model. Cost: a second model. The only choice
  when everything trains (``num_layers_unfrozen=-1``).

:func:`make_reference` also prepares the policy (freezes its trunk, or adds adapters) so the
trainable set and the reference always agree; ``Reference.policy`` is the model to train.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn

from ankus.config import LoRAConfig
from ankus.data.tokens import position_ids_from_mask
from ankus.losses.ppo import logprobs_from_logits
from ankus.models.hydra import HydraReference, eval_mode, freeze_for_hydra
from ankus.models.lora import apply_lora, is_peft

__all__ = ["Reference", "make_reference"]

Mode = Literal["hydra", "lora", "copy"]


@dataclass
class Reference:
    """Reference log-probs for PPO's KL penalty.

    Attributes:
        mode: ``"hydra"``, ``"lora"`` or ``"copy"``.
        policy: the model to train (a ``PeftModel`` under ``"lora"``, else the model given).
        hidden_index: for ``"hydra"``, which entry of the policy forward's
            ``output_hidden_states=True`` tuple :meth:`logps` wants (L−N); ``None`` otherwise.
        hydra: the :class:`~ankus.models.hydra.HydraReference` (``"hydra"`` only).
        base: the model whose log-probs are the reference's: the frozen copy (``"copy"``) or the
            ``PeftModel``, run with its adapters disabled (``"lora"``); ``None`` under ``"hydra"``.
    """

    mode: str
    policy: nn.Module
    hidden_index: int | None
    _logits: Callable[..., Tensor] = field(repr=False)
    hydra: HydraReference | None = None
    base: nn.Module | None = field(default=None, repr=False)

    def logits(self, input_ids: Tensor, attention_mask: Tensor, policy_hidden: Tensor | None = None,
               position_ids: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """Reference logits (B, T, V), or the last ``logits_to_keep`` positions, without grad.

        ``position_ids`` default to :func:`position_ids_from_mask` (left padding skipped, as in
        generation); under ``"hydra"`` they must be the ones the policy forward used.
        """
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        with torch.no_grad():
            return self._logits(input_ids, attention_mask, policy_hidden, position_ids, logits_to_keep)

    def logps(self, input_ids: Tensor, attention_mask: Tensor, policy_hidden: Tensor | tuple | None = None,
              n_resp: int | None = None, position_ids: Tensor | None = None) -> Tensor:
        """Per-token reference log-probs of ``input_ids[:, 1:]`` (B, T−1), or of the last
        ``n_resp`` tokens (B, n_resp), float32, without grad.

        ``policy_hidden`` (``"hydra"`` only) is the policy forward's hidden state at
        ``hidden_index`` (B, T, H), or that forward's whole ``hidden_states`` tuple; the forward
        must share ``attention_mask``/``position_ids`` and run without dropout. Without it the
        frozen trunk is run here (L−N layers). Positions whose target is padding hold
        meaningless values: mask them with ``attention_mask[:, 1:]``.
        """
        if isinstance(policy_hidden, (tuple, list)):
            policy_hidden = policy_hidden[self.hidden_index]
        keep = 0 if n_resp is None else n_resp + 1
        logits = self.logits(input_ids, attention_mask, policy_hidden, position_ids, keep)
        labels = input_ids[:, 1:] if n_resp is None else input_ids[:, input_ids.shape[1] - n_resp:]
        return logprobs_from_logits(logits[:, :-1], labels)  # logits at t predict token t+1

    @contextlib.contextmanager
    def frozen_model(self) -> Iterator[nn.Module]:
        """The reference as a plain causal LM, in eval mode: the frozen copy (``"copy"``) or the
        policy with its adapters switched off (``"lora"``). A Hydra reference has none: it reads
        the policy's hidden states and runs only the frozen top blocks."""
        if self.base is None:
            raise ValueError("a Hydra reference reads the policy's hidden states: it is not a whole model")
        adapters_off = self.base.disable_adapter() if self.mode == "lora" else contextlib.nullcontext()
        with eval_mode(self.base), adapters_off:
            yield self.base


def _full_forward(model: nn.Module) -> Callable[..., Tensor]:
    def run(input_ids, attention_mask, _hidden, position_ids, logits_to_keep):
        with eval_mode(model):
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=logits_to_keep).logits
    return run


def _hydra_forward(hydra: HydraReference) -> Callable[..., Tensor]:
    def run(input_ids, attention_mask, hidden, position_ids, logits_to_keep):
        if hidden is None:
            hidden = hydra.hidden_at_split(input_ids, attention_mask, position_ids)
        return hydra.logits(hidden, attention_mask, position_ids, logits_to_keep)
    return run


def _lora_forward(peft_model: nn.Module) -> Callable[..., Tensor]:
    forward = _full_forward(peft_model)

    def run(*args):
        with peft_model.disable_adapter():
            return forward(*args)
    return run


def make_reference(model: nn.Module, mode: Mode = "hydra", num_layers_unfrozen: int = 2, *,
                   lora: LoRAConfig | None = None) -> Reference:
    """Prepare ``model`` as a PPO policy and build its reference (the model as it is now).

    * ``"hydra"``: :func:`~ankus.models.hydra.freeze_for_hydra` with ``num_layers_unfrozen``
      (1 <= N < L), then a :class:`~ankus.models.hydra.HydraReference` branch.
    * ``"lora"``: :func:`apply_lora` with ``lora`` (default ``LoRAConfig()``: r 8, alpha 16, every
      linear layer but the head; its ``enabled`` flag is not read: this mode always adapts),
      unless ``model`` already is a peft model; the policy is the ``PeftModel``,
      ``num_layers_unfrozen`` is ignored.
    * ``"copy"``: freezes like Hydra (``-1`` trains everything) and deep-copies the model, frozen.
    """
    if mode == "hydra":
        if num_layers_unfrozen < 1:
            raise ValueError(f"mode 'hydra' needs num_layers_unfrozen >= 1 (got {num_layers_unfrozen}); "
                             "use mode 'copy' to train every layer")
        freeze_for_hydra(model, num_layers_unfrozen)
        hydra = HydraReference(model, num_layers_unfrozen)
        return Reference("hydra", model, hydra.split_index, _hydra_forward(hydra), hydra)
    if mode == "lora":
        policy = model if is_peft(model) else apply_lora(model, lora or LoRAConfig(enabled=True))
        return Reference("lora", policy, None, _lora_forward(policy), base=policy)
    if mode == "copy":
        freeze_for_hydra(model, num_layers_unfrozen)
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        return Reference("copy", model, None, _full_forward(frozen), base=frozen)
    raise ValueError(f"unknown reference mode '{mode}'; expected 'hydra', 'lora' or 'copy'")
