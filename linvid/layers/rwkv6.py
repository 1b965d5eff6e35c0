"""RWKV-6 ("Finch") time mixing as a linvid mixer, buildable from a teacher's self-attention
(paper 000 §4.2-4.3; Peng et al. 2024, "Eagle and Finch", Finch time mixing as in BlinkDL's
RWKV-LM `RWKV_Tmix_x060`).

Per token t, with x_t the (normalised) input and x_{t-1} the previous token's:

    delta_t   = x_{t-1} - x_t                                       token shift
    m_t       = tanh((x_t + delta_t * mix_x) @ A) @ B_*              5 low-rank offsets
    x*_t      = x_t + delta_t * (mix_* + m*_t)     * in decay, key, value, receptance, gate
    w_t       = -exp(w0 + tanh(xdecay_t @ D1) @ D2)                 log decay, <= 0
    r, k, v   = W_r xreceptance_t, W_k xkey_t, W_v xvalue_t        per head (H, K)
    o_t       = WKV6(r, k, v, w, u)                                  linvid.ops.wkv6
    y_t       = W_o (GroupNorm_per_head(o_t) * silu(W_g xgate_t))
"""

from __future__ import annotations

import torch
from torch import nn

from linvid.layers.attention_weights import (
    AttentionGeometry,
    copy_projection,
    to_teacher,
    value_head_scales,
)
from linvid.layers.base import (
    MixerContext,
    MixerState,
    check_hidden_states,
    check_state_keys,
    check_state_tensor,
    context_mask,
)
from linvid.ops.validation import check_positive_int
from linvid.ops.wkv6 import wkv6_chunk, wkv6_step, wkv6_step_trusted

# The five data-dependent lerps of the token shift, in BlinkDL's x060 order.
SHIFT_MIX_ORDER = ("decay", "key", "value", "receptance", "gate")
# BlinkDL x060 normalises each head with GroupNorm eps 1e-5 * head_size_divisor**2 and
# head_size_divisor 8: the same as normalising o / 8 with eps 1e-5.
GROUP_NORM_EPS = 64e-5
# silu(GATE_BIAS) = 1 (to 7 digits): the gate bias that makes a zero-weight gate pass the
# normalised heads through unchanged.
GATE_BIAS = 1.2784645


class RWKV6TimeMix(nn.Module):
    """RWKV-6 time mixing (Finch, x060) with the linvid mixer calling convention (base.py).

    One RWKV head per teacher query head, head size = the teacher's head_dim, so r, k, w, u are
    (H, K) per token and the WKV state is (H, K, K). Relative position comes only from the
    token shift and the decays: RWKV has no rotary embedding, unlike the teacher.

    The plain constructor gives a random initialisation (BlinkDL's x060 scheme, see
    `_initialise_randomly`, which depends on the layer's depth layer_idx / num_layers;
    projections keep PyTorch's nn.Linear default, the gate bias is 0, GroupNorm is 1/0).
    `from_attention` reuses the teacher's weights (paper 000 §4.3) and sets the parts without a
    teacher counterpart so that at init the layer reads what the attention reads and writes on
    its output's scale:
      - W_r, W_k, W_v, W_o <- W_Q, W_K, W_V, W_O with their biases; grouped-query K/V rows are
        repeated per query head as transformers' repeat_kv does (head h uses kv head
        h // (H / H_kv));
      - token shift off: every mix_* = 0 (and A = 0 as in x060), so r, k, v, g of token t are
        the teacher's projections of x_t; the shift is learnt in distillation;
      - decays: BlinkDL's depth-dependent spectrum w0 in [-6, -1] (per-token decay
        exp(-exp(w0)) from 0.998, a half-life of ~280 tokens, down to 0.69) and D1 = 0, so
        w_t = w0 at init: the heads keep a range of memory lengths;
      - bonus u = 1: the current token counts like an undecayed past token, the linear-attention
        reading of RWKV (paper 000 eq. 7 and 13) that motivates W_r <- W_Q;
      - gate: W_g = 0 and bias GATE_BIAS so silu(g) = 1 for every token;
      - GroupNorm weight of head h = the root-mean-square of the teacher's value channels of
        that head on unit-variance inputs, sqrt((|W_V,h|_F^2 + |b_V,h|^2) / K), bias 0: each
        normalised head then has the scale of one teacher value vector, the upper end of what
        a softmax average of value vectors can have.

    Parameters: receptance, key, value, gate (nn.Linear hidden -> H*K; the gate always has a
    bias, the others as the teacher), output (H*K -> hidden),
    output_norm (GroupNorm, H groups, eps GROUP_NORM_EPS), shift_mix_x (hidden,),
    shift_mix (5, hidden) rows in SHIFT_MIX_ORDER, shift_mix_down (hidden, 5*R1),
    shift_mix_up (5, R1, hidden), decay_base w0 (H*K,), decay_down (hidden, R2),
    decay_up (R2, H*K), bonus u (H, K); R1 = shift_mix_rank, R2 = decay_rank.
    State: {"shift": (B, hidden) float32, the input of the last real token; "wkv": (B, H, K, K)
    float32}.
    """

    STATE_KEYS = ("shift", "wkv")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        projection_bias: bool = False,
        output_bias: bool = False,
        layer_idx: int = 0,
        num_layers: int = 1,
        shift_mix_rank: int = 32,
        decay_rank: int = 64,
    ):
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("num_layers", num_layers),
            ("shift_mix_rank", shift_mix_rank),
            ("decay_rank", decay_rank),
        ):
            check_positive_int(name, value)
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        attention_size = num_heads * head_dim
        mixes = len(SHIFT_MIX_ORDER)

        self.receptance = nn.Linear(hidden_size, attention_size, bias=projection_bias)
        self.key = nn.Linear(hidden_size, attention_size, bias=projection_bias)
        self.value = nn.Linear(hidden_size, attention_size, bias=projection_bias)
        self.gate = nn.Linear(hidden_size, attention_size, bias=True)
        self.output = nn.Linear(attention_size, hidden_size, bias=output_bias)
        self.output_norm = nn.GroupNorm(num_heads, attention_size, eps=GROUP_NORM_EPS)

        self.shift_mix_x = nn.Parameter(torch.empty(hidden_size))
        self.shift_mix = nn.Parameter(torch.empty(mixes, hidden_size))
        self.shift_mix_down = nn.Parameter(torch.empty(hidden_size, mixes * shift_mix_rank))
        self.shift_mix_up = nn.Parameter(torch.empty(mixes, shift_mix_rank, hidden_size))
        self.decay_base = nn.Parameter(torch.empty(attention_size))
        self.decay_down = nn.Parameter(torch.empty(hidden_size, decay_rank))
        self.decay_up = nn.Parameter(torch.empty(decay_rank, attention_size))
        self.bonus = nn.Parameter(torch.empty(num_heads, head_dim))
        self._initialise_randomly(layer_idx, num_layers)

    @torch.no_grad()
    def _initialise_randomly(self, layer_idx: int, num_layers: int) -> None:
        """BlinkDL's x060 init: mixes and decays vary over channels and with depth, the
        low-rank down-projections start at 0 (so the data-dependent parts start at 0) and the
        up-projections at U(-0.01, 0.01) (so the down-projections still get gradients)."""
        depth = layer_idx / max(num_layers - 1, 1)  # 0 at the first layer, 1 at the last
        shallowness = 1.0 - layer_idx / num_layers  # 1 at the first layer, towards 0
        channel = torch.arange(self.hidden_size) / self.hidden_size
        self.shift_mix_x.copy_(1.0 - channel**shallowness)
        rows = {
            "decay": 1.0 - channel**shallowness,
            "key": 1.0 - channel**shallowness,
            "value": 1.0 - (channel**shallowness + 0.3 * depth),
            "receptance": 1.0 - channel ** (0.5 * shallowness),
            "gate": 1.0 - channel ** (0.5 * shallowness),
        }
        self.shift_mix.copy_(torch.stack([rows[name] for name in SHIFT_MIX_ORDER]))
        self.shift_mix_down.zero_()
        self.shift_mix_up.uniform_(-0.01, 0.01)

        attention_size = self.num_heads * self.head_dim
        position = torch.arange(attention_size) / max(attention_size - 1, 1)
        self.decay_base.copy_(-6.0 + 5.0 * position ** (0.7 + 1.3 * depth))
        self.decay_down.zero_()
        self.decay_up.uniform_(-0.01, 0.01)
        zigzag = ((torch.arange(attention_size) + 1) % 3 - 1) * 0.1
        self.bonus.copy_((depth * (1.0 - position) + zigzag).view_as(self.bonus))
        self.gate.bias.zero_()

    @classmethod
    def from_attention(cls, attention: nn.Module, config) -> RWKV6TimeMix:
        """Build the time mix from a teacher attention with q_proj/k_proj/v_proj/o_proj (paper
        000 §4.3: W_r, W_k, W_v, W_o <- W_Q, W_K, W_V, W_O; other inits in the class docstring).

        config: the text config (hidden_size, num_attention_heads, num_key_value_heads,
        optional head_dim, optional num_hidden_layers); attention.layer_idx (if present) picks
        the depth of the decay spectrum. Returns a module on the teacher's device and dtype.
        """
        geometry = AttentionGeometry.read(attention, config)
        layer_idx = getattr(attention, "layer_idx", None) or 0
        num_layers = max(getattr(config, "num_hidden_layers", 1), layer_idx + 1)
        module = cls(
            geometry.hidden_size,
            geometry.num_heads,
            geometry.head_dim,
            projection_bias=geometry.projection_bias,
            output_bias=geometry.output_bias,
            layer_idx=layer_idx,
            num_layers=num_layers,
        )
        head_dim = geometry.head_dim
        groups = geometry.num_heads // geometry.num_key_value_heads
        copy_projection(module.receptance, attention.q_proj)
        copy_projection(module.key, attention.k_proj, repeats=groups, head_dim=head_dim)
        copy_projection(module.value, attention.v_proj, repeats=groups, head_dim=head_dim)
        copy_projection(module.output, attention.o_proj)
        with torch.no_grad():
            module.shift_mix_x.zero_()
            module.shift_mix.zero_()
            module.bonus.fill_(1.0)
            module.gate.weight.zero_()
            module.gate.bias.fill_(GATE_BIAS)
            module.output_norm.weight.copy_(
                value_head_scales(attention.v_proj, head_dim, geometry.num_heads)
            )
            module.output_norm.bias.zero_()
        return to_teacher(module, attention)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: MixerContext | None = None,
        state: MixerState | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """Time-mix L tokens (prefill/training through wkv6_chunk, one token through wkv6_step).

        hidden_states: (B, L, hidden) normalised; context: padding_mask (B, L) is read
        (padding tokens change nothing: their inputs and values are zeroed, their decay set to
        none, and the shift skips them); state: None or the dict returned
        for the previous tokens. Returns (output (B, L, hidden) in hidden_states' dtype,
        new state {"shift": (B, hidden), "wkv": (B, H, K, K)}, both float32).
        """
        batch, length = check_hidden_states(hidden_states, self.hidden_size)
        real = context_mask(context, "padding_mask", batch, length)
        shift, wkv_state = self._read_state(state, batch)
        if length == 1 and real is None and state is not None:
            return self._step(hidden_states, shift, wkv_state)
        mixed, last_input = self._shift_mixes(hidden_states, shift, real)
        decay_input, key_input, value_input, receptance_input, gate_input = mixed.unbind(2)
        log_decay = self._log_decay(decay_input)
        receptance = self.receptance(receptance_input)
        key = self.key(key_input)
        value = self.value(value_input)
        if real is not None:
            # A padding token must add nothing to the state and decay it not at all. Projection
            # biases make v nonzero for its zeroed input; v = 0 makes k^T v = 0 whatever k is.
            value = torch.where(real[..., None], value, 0.0)
            log_decay = torch.where(real[..., None], log_decay, 0.0)
        gate = nn.functional.silu(self.gate(gate_input))

        heads = (batch, length, self.num_heads, self.head_dim)
        receptance, key, value, log_decay = (
            tensor.view(heads) for tensor in (receptance, key, value, log_decay)
        )
        if length == 1:
            if wkv_state is None:
                wkv_state = torch.zeros(
                    batch, self.num_heads, self.head_dim, self.head_dim, device=key.device
                )
            mixed_heads, wkv_state = wkv6_step(
                receptance[:, 0], key[:, 0], value[:, 0], log_decay[:, 0], self.bonus, wkv_state
            )
            mixed_heads = mixed_heads[:, None]
        else:
            mixed_heads, wkv_state = wkv6_chunk(
                receptance, key, value, log_decay, self.bonus, initial_state=wkv_state
            )
        attention_size = self.num_heads * self.head_dim
        normed = self.output_norm(mixed_heads.reshape(batch * length, attention_size))
        output = self.output(normed.view(batch, length, attention_size) * gate)
        return output, {"shift": last_input.float(), "wkv": wkv_state}

    def log_decays(
        self,
        hidden_states: torch.Tensor,
        context: MixerContext | None = None,
        state: MixerState | None = None,
    ) -> torch.Tensor:
        """w_t, the per-token, per-channel log decay forward applies to the WKV state (module
        docstring; <= 0): hidden_states (B, L, hidden) as forward's -> (B, L, H, K) float32,
        0 at padding tokens (they decay nothing)."""
        batch, length = check_hidden_states(hidden_states, self.hidden_size)
        real = context_mask(context, "padding_mask", batch, length)
        shift, _ = self._read_state(state, batch)
        mixed, _ = self._shift_mixes(hidden_states, shift, real)
        log_decay = self._log_decay(mixed[:, :, 0])
        if real is not None:
            log_decay = torch.where(real[..., None], log_decay, 0.0)
        return log_decay.view(batch, length, self.num_heads, self.head_dim)

    def _shift_mixes(self, hidden_states, shift, real):
        """The five token-shift mixes x*_t (module docstring): (B, L, 5, hidden) in
        SHIFT_MIX_ORDER, and the last real input (B, hidden), the next call's shift."""
        batch, length, _ = hidden_states.shape
        inputs = hidden_states
        if real is not None:  # `where`, not a product: nothing in a padding token can leak
            inputs = torch.where(real[..., None], hidden_states, 0.0)
        if shift is None:
            shift = inputs.new_zeros(batch, self.hidden_size)
        previous, last_input = token_shift(inputs, shift.to(hidden_states.dtype), real)
        delta = previous - inputs
        mixes = len(SHIFT_MIX_ORDER)
        low_rank = torch.tanh((inputs + delta * self.shift_mix_x) @ self.shift_mix_down)
        offsets = torch.einsum(
            "blmr,mrd->blmd", low_rank.view(batch, length, mixes, -1), self.shift_mix_up
        )
        return inputs[:, :, None] + delta[:, :, None] * (self.shift_mix + offsets), last_input

    def _log_decay(self, decay_input):
        """w = -exp(w0 + tanh(x_decay @ D1) @ D2) in float32, the shape of decay_input."""
        decay_logits = self.decay_base + torch.tanh(decay_input @ self.decay_down) @ self.decay_up
        return -torch.exp(decay_logits.float())

    def _step(self, hidden_states, shift, wkv_state):
        """forward for one token with a state and no padding mask (decoding): the same sums
        on (B, hidden) rows, the five mixes as one batched matmul and the WKV step without
        re-checking inputs it builds itself. Returns what forward returns."""
        batch = hidden_states.shape[0]
        inputs = hidden_states[:, 0]  # (B, hidden)
        delta = shift.to(inputs.dtype) - inputs
        mixes = len(SHIFT_MIX_ORDER)
        low_rank = torch.tanh((inputs + delta * self.shift_mix_x) @ self.shift_mix_down)
        # (mixes, B, R1) @ (mixes, R1, hidden): the offsets of the five mixes, mix-major.
        offsets = torch.bmm(low_rank.view(batch, mixes, -1).transpose(0, 1), self.shift_mix_up)
        mixed = inputs + delta * (self.shift_mix[:, None] + offsets)  # (mixes, B, hidden)
        decay_input, key_input, value_input, receptance_input, gate_input = mixed.unbind(0)

        log_decay = self._log_decay(decay_input)
        heads = (batch, self.num_heads, self.head_dim)
        mixed_heads, wkv_state = wkv6_step_trusted(
            self.receptance(receptance_input).float().view(heads),
            self.key(key_input).float().view(heads),
            self.value(value_input).float().view(heads),
            log_decay.view(heads),
            self.bonus.float(),
            wkv_state.float(),
        )
        gate = nn.functional.silu(self.gate(gate_input))
        normed = self.output_norm(mixed_heads.to(inputs.dtype).view(batch, -1))
        output = self.output(normed * gate)
        return output[:, None], {"shift": inputs.float(), "wkv": wkv_state}

    def _read_state(self, state: MixerState | None, batch: int):
        """(shift (B, hidden), wkv (B, H, K, K)) from a state dict, or (None, None)."""
        if state is None:
            return None, None
        check_state_keys(state, self.STATE_KEYS)
        shift = check_state_tensor(state, "shift", (batch, self.hidden_size), "(B, hidden)")
        wkv_shape = (batch, self.num_heads, self.head_dim, self.head_dim)
        wkv = check_state_tensor(state, "wkv", wkv_shape, "(B, H, K, K)")
        return shift, wkv


def token_shift(inputs: torch.Tensor, shift: torch.Tensor, real: torch.Tensor | None):
    """The previous real token's input for each token (RWKV's token shift, skipping padding).

    inputs: (B, L, D); shift: (B, D), the input of the last real token before this call (zeros
    at the start of a sequence); real: (B, L) bool or None (all real).
    Returns (previous (B, L, D), last (B, D): the input of the last real token up to the end
    of this call, which is `shift` for a sample whose tokens here are all padding).
    """
    extended = torch.cat((shift[:, None], inputs), dim=1)  # index 0: the token before the call
    if real is None:
        return extended[:, :-1], extended[:, -1]
    batch, length, width = inputs.shape
    positions = torch.arange(1, length + 1, device=inputs.device)
    # Index into `extended` of the last real token at or before each token (0 = `shift`).
    last_real = torch.where(real, positions, 0).cummax(dim=1).values
    before = torch.cat((last_real.new_zeros(batch, 1), last_real[:, :-1]), dim=1)
    previous = extended.gather(1, before[..., None].expand(-1, -1, width))
    last = extended.gather(1, last_real[:, -1:, None].expand(-1, -1, width))[:, 0]
    return previous, last
