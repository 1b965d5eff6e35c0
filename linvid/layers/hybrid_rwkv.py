"""The hybrid decoder layer's mixer (paper 000 §4.2, Fig. 1): RWKV-6 time mixing over every
token in parallel with gated cross-attention from the text tokens to the scene tokens."""

from __future__ import annotations

import torch
from torch import nn

from linvid.layers.base import MixerContext, MixerState, check_state_keys
from linvid.layers.cross_attention import GatedCrossAttention
from linvid.layers.rwkv6 import RWKV6TimeMix


class HybridRWKVMixer(nn.Module):
    """RWKV6TimeMix + GatedCrossAttention, summed (paper 000 Fig. 1, eq. 11-12):

        output = RWKV6(X) + Attn(W_Q X_t, W_K norm(V_s), W_V norm(V_s)) W_O' * g_d * g_s

    Each branch has its own output projection (the paper's "separate output projections").
    With g_s = 0 at init the layer starts as the time mix alone.

    State: the union of both branches' states, flat, each key prefixed with its branch:
    "time_mix.shift", "time_mix.wkv", "cross_attention.scene_keys",
    "cross_attention.scene_values", "cross_attention.scene_mask" (shapes in each class).
    """

    def __init__(self, time_mix: RWKV6TimeMix, cross_attention: GatedCrossAttention):
        super().__init__()
        if time_mix.hidden_size != cross_attention.hidden_size:
            raise ValueError(
                f"cross_attention.hidden_size ({cross_attention.hidden_size}) must equal "
                f"time_mix.hidden_size ({time_mix.hidden_size})"
            )
        self.time_mix = time_mix
        self.cross_attention = cross_attention

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The keys of this mixer's state dict."""
        return tuple(f"time_mix.{key}" for key in RWKV6TimeMix.STATE_KEYS) + tuple(
            f"cross_attention.{key}" for key in GatedCrossAttention.STATE_KEYS
        )

    @classmethod
    def from_attention(
        cls,
        attention: nn.Module,
        config,
        norm: nn.Module,
        *,
        time_mix_attention: nn.Module | None = None,
        gate: str = "dynamic",
    ) -> HybridRWKVMixer:
        """Both branches from one teacher attention (paper 000 §4.3: RWKV's W_r, W_k, W_v and
        the cross-attention's W_Q, W_K, W_V all from the attention's W_Q, W_K, W_V; each branch
        gets its own copy of W_O). norm: the decoder layer's input_layernorm, applied to the
        scene tokens. time_mix_attention: another attention module for the RWKV branch only
        (the random-init ablation of paper 000 Table 4 passes a re-initialised copy; the
        cross-attention still starts from `attention`). gate: the cross-attention's gate
        ("dynamic" or "static", Table 4). Returns a module on the teacher's device and dtype."""
        return cls(
            RWKV6TimeMix.from_attention(
                attention if time_mix_attention is None else time_mix_attention, config
            ),
            GatedCrossAttention.from_attention(attention, config, norm, gate=gate),
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: MixerContext | None = None,
        state: MixerState | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """Sum of the two branches over L tokens.

        hidden_states: (B, L, hidden) normalised; context: as read by both branches; state:
        None or the dict returned for the previous tokens. Returns (output (B, L, hidden),
        new state with the prefixed keys of `state_keys`).
        """
        time_state = cross_state = None
        if state is not None:
            check_state_keys(state, self.state_keys)
            time_state = _branch_state(state, "time_mix")
            cross_state = _branch_state(state, "cross_attention")
        time_output, time_state = self.time_mix(hidden_states, context, time_state)
        cross_output, cross_state = self.cross_attention(hidden_states, context, cross_state)
        new_state = {f"time_mix.{key}": value for key, value in time_state.items()}
        new_state.update({f"cross_attention.{key}": value for key, value in cross_state.items()})
        return time_output + cross_output, new_state


def _branch_state(state: MixerState, prefix: str) -> MixerState:
    """The entries of `state` under `prefix.`, without the prefix."""
    return {
        key.removeprefix(f"{prefix}."): value
        for key, value in state.items()
        if key.startswith(f"{prefix}.")
    }
