"""Finding a model's decoder blocks without per-architecture code."""

from __future__ import annotations

from torch import nn

__all__ = ["find_decoder_layers", "decoder_layers"]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks.

    A ModuleList as long as ``config.num_hidden_layers``, the shallowest if several (an MoE
    layer's expert list can be as long); without a config, the longest ModuleList.
    """
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    config = getattr(model, "config", None)
    n_layers = None
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = getattr(text_config, "num_hidden_layers", None)
    if n_layers is not None:
        lists = [(name, m) for name, m in lists if len(m) == n_layers]
        if lists:
            return min(lists, key=lambda nm: nm[0].count("."))
    elif lists:
        return max(lists, key=lambda nm: len(nm[1]))
    raise ValueError(f"no list of decoder layers found in {type(model).__name__}"
                     + (f" (looked for a ModuleList of length num_hidden_layers={n_layers})" if n_layers else ""))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order: ``model.model.layers`` (Llama), ``model.gpt_neox.layers``
    (GPT-NeoX), ``model.transformer.h`` (GPT-2), ... found without per-architecture code."""
    return find_decoder_layers(model)[1]
