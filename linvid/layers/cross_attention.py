"""Gated cross-attention from text tokens to scene tokens (paper 000 §4.2, eq. 11-12): the
branch of the hybrid decoder layer that lets text retrieve visual detail which the RWKV state
may have decayed away."""

from __future__ import annotations

import math

import torch
from torch import nn

from linvid.layers.attention_weights import (
    AttentionGeometry,
    add_attention_projections,
    copy_attention_projections,
    to_teacher,
)
from linvid.layers.base import (
    MixerContext,
    MixerState,
    check_hidden_states,
    check_state_keys,
    check_token_mask,
    context_mask,
)
from linvid.ops.validation import check_shape, check_tensor, describe

# tanh(DYNAMIC_GATE_BIAS) = 1/2: every text token starts at the middle of the gate's range.
DYNAMIC_GATE_BIAS = math.atanh(0.5)
# "dynamic": g_d * g_s (paper 000 eq. 12); "static": g_s alone, one learnable scalar for every
# text token (the ablation of paper 000 Table 4, row 4).
GATES = ("dynamic", "static")


class GatedCrossAttention(nn.Module):
    """Text-to-scene cross-attention with a dynamic and a static gate (paper 000 eq. 11-12):

        X' = Attn(W_Q X_t, W_K norm(V_s), W_V norm(V_s)) W_O            (eq. 11)
        branch = X' * g_d * g_s,   g_d = tanh(X_t w_d + b_d) in R^n      (eq. 12)

    X_t: the (normalised) hidden states of the n text tokens (not vision, not padding); V_s: the
    scene tokens (context.scene_tokens, not normalised), passed through `norm`, the decoder
    layer's input_layernorm shared with the hidden states as in the paper; g_d: one scalar per
    text token; g_s: one learnable scalar, 0 at init. Multi-head softmax attention with the
    teacher's layout (H query heads, H_kv key/value heads, head_dim, scale 1/sqrt(head_dim)),
    no rotary embedding (scene tokens have no position in the text). Non-text tokens get 0.

    Eq. 12 adds the branch to X_t itself; here it is returned, as every mixer's output, for the
    decoder layer to add to its residual stream. `norm` is held, not registered as a submodule:
    the decoder layer owns it, and registering it twice would duplicate its parameters in
    state_dict (shared tensors that safetensors refuses to save).

    gate "static" (paper 000 Table 4's ablation) drops g_d: branch = X' * g_s, and the module
    has no dynamic_gate parameters.

    Init: q/k/v/o from the teacher attention (`from_attention`, paper 000 §4.3) or nn.Linear's
    default (plain constructor); g_s = 0 so the branch adds exactly zero until g_s is trained;
    w_d = 0 and b_d = atanh(1/2) so g_d = 1/2 for every text token at first (a nonzero g_d is
    what gives g_s a gradient; w_d gets one as soon as g_s leaves 0).

    State (decoding reuses the projected scenes): {"scene_keys": (B, H_kv, S, head_dim),
    "scene_values": (B, H_kv, S, head_dim), both in the projection dtype, "scene_mask": (B, S)
    bool}; S = 0 when the sequence has no scenes.
    """

    STATE_KEYS = ("scene_keys", "scene_values", "scene_mask")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        norm: nn.Module,
        *,
        projection_bias: bool = False,
        output_bias: bool = False,
        gate: str = "dynamic",
    ):
        super().__init__()
        if not callable(norm):
            raise ValueError(f"norm must be a module (the layer's input norm), got {norm!r}")
        if gate not in GATES:
            raise ValueError(f"unknown cross-attention gate {gate!r}; expected one of {GATES}")
        self.gate = gate
        add_attention_projections(
            self,
            hidden_size,
            num_heads,
            num_key_value_heads,
            head_dim,
            projection_bias=projection_bias,
            output_bias=output_bias,
        )
        self.static_gate = nn.Parameter(torch.zeros(1))
        if gate == "dynamic":
            self.dynamic_gate = nn.Linear(hidden_size, 1)
            with torch.no_grad():
                self.dynamic_gate.weight.zero_()
                self.dynamic_gate.bias.fill_(DYNAMIC_GATE_BIAS)
        object.__setattr__(self, "norm", norm)

    @classmethod
    def from_attention(
        cls, attention: nn.Module, config, norm: nn.Module, *, gate: str = "dynamic"
    ) -> GatedCrossAttention:
        """Build from a teacher attention: W_Q, W_K, W_V, W_O and their biases copied as they
        are (paper 000 §4.3; grouped-query heads stay grouped). config: the text config
        (hidden_size, num_attention_heads, num_key_value_heads, optional head_dim); norm: the
        decoder layer's input_layernorm; gate: one of GATES. Returns a module on the teacher's
        device and dtype."""
        geometry = AttentionGeometry.read(attention, config)
        module = cls(
            geometry.hidden_size,
            geometry.num_heads,
            geometry.num_key_value_heads,
            geometry.head_dim,
            norm,
            projection_bias=geometry.projection_bias,
            output_bias=geometry.output_bias,
            gate=gate,
        )
        copy_attention_projections(module, attention)
        return to_teacher(module, attention)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: MixerContext | None = None,
        state: MixerState | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """The gated cross-attention branch for L tokens (paper 000 eq. 11-12).

        hidden_states: (B, L, hidden) normalised; context: padding_mask and vision_mask (B, L)
        pick the text tokens, scene_tokens (B, S, hidden) and scene_mask (B, S) the scenes;
        without scene_tokens the scenes cached in `state` are used (decoding), and without
        either there are none. A sample with no real scene gets 0.
        Returns (output (B, L, hidden), 0 on non-text tokens; new state, see the class).
        """
        batch, length = check_hidden_states(hidden_states, self.hidden_size)
        padding = context_mask(context, "padding_mask", batch, length)
        vision = context_mask(context, "vision_mask", batch, length)
        scene_keys, scene_values, scene_mask = self._scenes(context, state, batch, hidden_states)
        new_state = {
            "scene_keys": scene_keys,
            "scene_values": scene_values,
            "scene_mask": scene_mask,
        }
        if length == 1 and padding is None and (vision is None or not bool(vision.any())):
            # One text token per sample (decoding): no gathering of text tokens to the front.
            return self._text_step(hidden_states, scene_keys, scene_values, scene_mask), new_state
        text = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
        if padding is not None:
            text = text & padding
        if vision is not None:
            text = text & ~vision
        output = torch.zeros_like(hidden_states)
        if scene_keys.shape[2] == 0 or not bool(text.any()):
            return output, new_state

        # Queries from text tokens only: gather each sample's text tokens to the front
        # (stable sort keeps their order), n = the largest text count in the batch.
        counts = text.sum(dim=1)
        text_count = int(counts.max())
        order = torch.argsort((~text).to(torch.int8), dim=1, stable=True)[:, :text_count]
        index = order[..., None].expand(-1, -1, self.hidden_size)
        keep = torch.arange(text_count, device=counts.device) < counts[:, None]
        has_scene = scene_mask.any(dim=1)
        keep = (keep & has_scene[:, None])[..., None]
        # Rows past a sample's text count hold other tokens: zeroed (`where`, so that not even a
        # NaN there reaches the outputs or the gradients), and their outputs dropped below.
        text_states = torch.where(keep, hidden_states.gather(1, index), 0.0)  # (B, n, hidden)

        queries = self.query(text_states).view(batch, text_count, self.num_heads, self.head_dim)
        # A sample without scenes attends to its zeroed padding scenes instead of to nothing:
        # a softmax over nothing is 0/0, NaN in some SDPA backends (CPU's math backend returns
        # 0). Its output is dropped below.
        allowed = scene_mask | ~has_scene[:, None]
        attended = nn.functional.scaled_dot_product_attention(
            queries.transpose(1, 2),
            scene_keys.to(queries.dtype),
            scene_values.to(queries.dtype),
            attn_mask=allowed[:, None, None, :],
            enable_gqa=self.num_heads != self.num_key_value_heads,
        )  # (B, H, n, head_dim)
        attended = attended.transpose(1, 2).reshape(batch, text_count, -1)
        branch = self._gated(self.output(attended), text_states)
        branch = torch.where(keep, branch, 0.0)
        # `order` is a permutation per sample, so no position is written twice.
        return output.scatter(1, index, branch), new_state

    def _text_step(self, hidden_states, scene_keys, scene_values, scene_mask):
        """forward's branch for a call of one text token per sample: hidden_states (B, 1,
        hidden), the scenes as forward gets them. The same sums as forward's general path,
        whose gathered text rows are then these tokens themselves."""
        batch = hidden_states.shape[0]
        if scene_keys.shape[2] == 0:
            return torch.zeros_like(hidden_states)
        has_scene = scene_mask.any(dim=1)
        queries = self.query(hidden_states).view(batch, 1, self.num_heads, self.head_dim)
        attended = nn.functional.scaled_dot_product_attention(
            queries.transpose(1, 2),
            scene_keys.to(queries.dtype),
            scene_values.to(queries.dtype),
            attn_mask=(scene_mask | ~has_scene[:, None])[:, None, None, :],
            enable_gqa=self.num_heads != self.num_key_value_heads,
        )  # (B, H, 1, head_dim)
        attended = attended.transpose(1, 2).reshape(batch, 1, -1)
        branch = self._gated(self.output(attended), hidden_states)
        return torch.where(has_scene[:, None, None], branch, 0.0)

    def _gated(self, attended: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """X' * g_d * g_s (paper 000 eq. 12), or X' * g_s with the static gate. attended: X'
        (B, n, hidden); text_states: the n text tokens' hidden states (B, n, hidden)."""
        if self.gate == "static":
            return attended * self.static_gate
        dynamic_gate = torch.tanh(self.dynamic_gate(text_states))  # g_d: (B, n, 1)
        return attended * dynamic_gate * self.static_gate

    def _scenes(self, context, state, batch: int, hidden_states: torch.Tensor):
        """(keys (B, H_kv, S, hd), values (B, H_kv, S, hd), mask (B, S)) from the context's scene
        tokens, else from the state, else empty (S = 0)."""
        scene_tokens = getattr(context, "scene_tokens", None)
        scene_mask = getattr(context, "scene_mask", None)
        if scene_tokens is not None:
            check_tensor("context.scene_tokens", scene_tokens, 3, "(B, S, hidden)")
            scenes = scene_tokens.shape[1]
            check_shape(
                "context.scene_tokens",
                scene_tokens,
                (batch, scenes, self.hidden_size),
                "(B, S, hidden)",
            )
            if scene_mask is None:
                scene_mask = torch.ones(batch, scenes, dtype=torch.bool, device=scene_tokens.device)
            check_token_mask("context.scene_mask", scene_mask, batch, scenes, "(B, S)")
            scene_tokens = torch.where(scene_mask[..., None], scene_tokens, 0.0)
            normed = self.norm(scene_tokens.to(hidden_states.dtype))
            heads = (batch, scenes, self.num_key_value_heads, self.head_dim)
            keys = self.key(normed).view(heads).transpose(1, 2)
            values = self.value(normed).view(heads).transpose(1, 2)
            return keys, values, scene_mask
        if scene_mask is not None:
            raise ValueError(
                f"context.scene_mask ({describe(scene_mask)}) given without context.scene_tokens"
            )
        if state is not None:
            check_state_keys(state, self.STATE_KEYS)
            keys, values, mask = (state[name] for name in self.STATE_KEYS)
            for name, tensor in (("scene_keys", keys), ("scene_values", values)):
                check_tensor(f"state['{name}']", tensor, 4, "(B, H_kv, S, head_dim)")
                expected = (batch, self.num_key_value_heads, keys.shape[2], self.head_dim)
                check_shape(f"state['{name}']", tensor, expected, "(B, H_kv, S, head_dim)")
            check_token_mask("state['scene_mask']", mask, batch, keys.shape[2], "(B, S)")
            return keys, values, mask
        empty = hidden_states.new_zeros(batch, self.num_key_value_heads, 0, self.head_dim)
        mask = torch.zeros(batch, 0, dtype=torch.bool, device=hidden_states.device)
        return empty, empty, mask
