"""LoRA adapters on any causal LM, through peft."""

from __future__ import annotations

from torch import nn

from ankus.config import LoRAConfig

__all__ = ["apply_lora", "is_peft"]


def apply_lora(model: nn.Module, lora: LoRAConfig) -> nn.Module:
    """Wrap ``model`` in LoRA adapters (peft ``get_peft_model``); returns the ``PeftModel``.

    The base weights are frozen by peft and the adapters' B matrices start at zero, so the
    wrapped model starts equal to ``model``. An empty ``lora.target`` means ``"all-linear"``:
    every Linear/Conv1D but the output head, which covers Llama's q/k/v/o/gate/up/down,
    GPT-NeoX's query_key_value/dense/dense_h_to_4h/dense_4h_to_h and GPT-2's c_attn/c_proj/c_fc
    without a per-architecture table. ``model`` is modified in place (its layers are wrapped).
    ``lora.enabled`` is the caller's business: this always wraps.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2's Conv1D stores its weight transposed; saying so up front spares peft's warning.
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules=list(lora.target) or "all-linear", fan_in_fan_out=conv1d)
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    """A peft-wrapped model (adapters that can be disabled)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
