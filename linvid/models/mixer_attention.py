"""The adapter that lets a linvid mixer sit where a decoder layer's self-attention was.

transformers' decoder layers call `self_attn(hidden_states=..., attention_mask=...,
position_embeddings=..., cache=..., ...)` (`past_key_values=` before transformers 5.24) and
expect `(output, attention_weights)`.
`MixerAttention` keeps that contract, reads the per-call `MixerContext` that the model put in a
shared `ContextHolder`, and keeps the mixer's state in the layer's `MixerStateLayer` of the
`HybridCache`. Rotary embeddings and the 4D attention mask are not used: linear mixers are
causal by construction and take padding from the context.
"""

from __future__ import annotations

import torch
from torch import nn

from linvid.layers.base import MixerContext
from linvid.models.cache import HybridCache, given_cache


class ContextHolder:
    """The MixerContext of the forward call in progress, shared by one model's adapters (a
    plain object, not a module, so it is neither a parameter nor part of the state dict)."""

    def __init__(self):
        self.context: MixerContext | None = None


class MixerAttention(nn.Module):
    """Runs `mixer` in place of the self-attention of decoder layer `layer_idx`."""

    def __init__(self, mixer: nn.Module, layer_idx: int, holder: ContextHolder):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx
        self.context_holder = holder

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        position_embeddings=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states: (B, L, D) normalised by the decoder layer; the cache comes as `cache`
        or `past_key_values`, as the installed transformers names it. Returns ((B, L, D), None)."""
        context = self.context_holder.context or MixerContext.empty(hidden_states.shape[0])
        past_key_values = given_cache(cache, past_key_values)
        entry = None
        if past_key_values is not None:
            if not isinstance(past_key_values, HybridCache):
                raise ValueError(
                    f"a converted model needs a linvid HybridCache, got "
                    f"{type(past_key_values).__name__}; let the model create its cache "
                    "(pass past_key_values=None) or build one with model.make_cache()"
                )
            entry = past_key_values.layers[self.layer_idx]
        state = entry.state if entry is not None else None
        output, new_state = self.mixer(hidden_states, context, state)
        if entry is not None:
            entry.store(new_state, hidden_states.shape[1])
        return output, None
