"""Mamba-2 as a linvid mixer, buildable from a teacher's self-attention (TimeViper's Mamba-2
layers, paper 002 §3.1; Dao & Gu 2024, "Transformers are SSMs", §7 Mamba-2 block; weight reuse
as in MambaInLlama, Wang et al. 2024, and mmMamba).

Per token t with (normalised) input h_t:

    x_t, B_t, C_t = SiLU(causal depthwise conv1d over time of [W_x h, W_B h, W_C h])   kernel 4
    dt_t = softplus(W_dt h_t + dt_bias),  A = -exp(A_log)
    y_t  = SSD(x, dt, A, B, C)_t + D * x_t                                   linvid.ops.ssd
    o_t  = W_out RMSNorm_per_head(y_t * SiLU(W_z h_t + b_z))                 gated, as Mamba-2

SSD (DESIGN.md "Math conventions"): state_t = exp(dt_t A) state_{t-1} + dt_t outer(x_t, B_t),
y_t = state_t @ C_t. Read as linear attention, C plays the query, B the key and x the value,
which is why W_C <- W_Q, W_B <- W_K, W_x <- W_V, W_out <- W_O (paper 003 eq. 4).

Grouped-query teachers: x and B keep the teacher's H_kv key/value heads (projections and conv at
the teacher's width, as MambaInLlama does) and are repeated to the H query heads after the conv,
as transformers' repeat_kv does (head h reads kv head h // (H / H_kv)). ssd_chunk then sees B
and C with G = H groups: C has one query per head, so B cannot stay at H_kv groups.

This module also holds `Mamba2Scan` (conv + SSD for one scan direction), `GatedRMSNorm` and the
projections and their weight reuse (`add_projections`, `reuse_attention`) that LinMU's Flex-MA
branch (mmate.py) shares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linvid.layers.attention_weights import (
    AttentionGeometry,
    check_head_layout,
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
from linvid.ops.ssd import ssd_chunk, ssd_step, ssd_step_grouped
from linvid.ops.validation import check_positive_int, check_shape

# z with silu(z) = 1 (float64 Newton root): a zero-weight gate with this bias passes y unchanged.
SILU_FIXED_POINT = 1.278464542761074
# Mamba-2's standard ranges (mamba_ssm Mamba2 defaults): A ~ U[1, 16] per head and dt
# log-uniform in [1e-3, 1e-1], floored at 1e-4, stored as dt_bias = softplus^-1(dt).
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)
DT_INIT_FLOOR = 1e-4
STATE_KEYS = ("conv", "ssm")


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm (norm_before_gate=False): RMSNorm(y * silu(z)) * weight, the root
    mean square taken over groups of `group_size` channels (one group per head here).

    y, z: (..., channels). Returns float32 (..., channels); the caller casts.
    """

    def __init__(self, channels: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        if channels % group_size:
            raise ValueError(
                f"channels ({channels}) must be a multiple of group_size ({group_size})"
            )
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())
        groups = gated.unflatten(-1, (-1, self.group_size))
        normed = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)
        return normed.flatten(-2) * self.weight.float()


class Mamba2Scan(nn.Module):
    """One scan direction of a Mamba-2 mixer: causal depthwise conv1d + SiLU over [x, B, C],
    dt = softplus(W_dt h + dt_bias), SSD with skip D (Dao & Gu 2024 §7; paper 003 eq. 1-2).

    The projections of x, B, C and the gate z belong to the caller, so that LinMU's two
    directions can share them while each has its own conv, dt, A and D. Channel layout of the
    conv: [x (num_groups*head_dim), B (num_groups*state_size), C (num_heads*state_size)];
    x and B are repeated from num_groups to num_heads heads after the conv.

    Random init (Mamba-2): conv as nn.Conv1d's default, W_dt as nn.Linear's default,
    A_log = log U[1, 16], dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1], D = 1.
    State: {"conv": (B, conv_channels, kernel - 1), the last kernel - 1 conv inputs (zeros for
    masked tokens); "ssm": (B, H, P, N)}, both float32.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        state_size: int,
        num_groups: int,
        *,
        conv_kernel: int = 4,
        chunk_size: int = 64,
    ):
        super().__init__()
        # x and B have one group per teacher kv head: num_groups is num_key_value_heads.
        check_head_layout(hidden_size, num_heads, num_groups, head_dim)
        for name, value in (
            ("state_size", state_size),
            ("conv_kernel", conv_kernel),
            ("chunk_size", chunk_size),
        ):
            check_positive_int(name, value)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.state_size = state_size
        self.num_groups = num_groups
        self.conv_kernel = conv_kernel
        self.chunk_size = chunk_size
        self.split_sizes = (num_groups * head_dim, num_groups * state_size, num_heads * state_size)
        self.conv_channels = sum(self.split_sizes)
        self.conv = nn.Conv1d(
            self.conv_channels, self.conv_channels, conv_kernel, groups=self.conv_channels
        )
        self.dt_proj = nn.Linear(hidden_size, num_heads, bias=False)
        low, high = (math.log(bound) for bound in DT_INIT_RANGE)
        dt = torch.exp(torch.rand(num_heads) * (high - low) + low).clamp(min=DT_INIT_FLOOR)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(*A_INIT_RANGE).log())
        self.D = nn.Parameter(torch.ones(num_heads))

    def step_sizes(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """dt = softplus(W_dt h + dt_bias) (Dao & Gu 2024 §7): hidden_states (..., hidden) ->
        (..., H) float32."""
        return F.softplus(self.dt_proj(hidden_states).float() + self.dt_bias.float())

    def log_decays(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """log a_t = dt_t * A, the per-token, per-head log decay of the state (<= 0):
        hidden_states (B, L, hidden) -> (B, L, H) float32 (a token that does not write, as
        forward's write_mask, decays nothing: its entry is what the caller sets to 0)."""
        return self.step_sizes(hidden_states) * -torch.exp(self.A_log.float())

    @torch.no_grad()
    def reset_conv_to_identity(self) -> None:
        """Make the conv pass each token's own input through: weight 1 on the newest tap, 0 on
        older ones, bias 0 (x, B, C = SiLU of the token's projections)."""
        self.conv.weight.zero_()
        self.conv.weight[:, 0, -1] = 1.0
        self.conv.bias.zero_()

    def forward(
        self,
        hidden_states: torch.Tensor,
        inputs: torch.Tensor,
        state: MixerState | None = None,
        write_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """Scan L tokens (ssd_chunk, or ssd_step for one token with a state).

        hidden_states: (B, L, hidden) the tokens, read by W_dt; inputs: (B, L, conv_channels)
        the projections [x, B, C] before the conv; state: None or the dict returned for the
        previous tokens; write_mask: (B, L) bool or None (all True). A token with write_mask
        False neither writes nor decays the state (dt = 0, x = 0, so no D skip either) and is a
        zero to the conv of the other tokens; it still reads the state with its own C (its own
        conv tap is kept for the C channels).
        Returns (y (B, L, H, P) float32 including D * x, new state).
        """
        batch, length, _ = inputs.shape
        check_shape("inputs", inputs, (batch, length, self.conv_channels), "(B, L, conv_channels)")
        check_shape(
            "hidden_states",
            hidden_states,
            (batch, length, self.dt_proj.in_features),
            "(B, L, hidden)",
        )
        conv_state, ssm_state = self.read_state(state, batch)
        if length == 1 and state is not None and write_mask is None:
            return self._step(hidden_states, inputs, conv_state, ssm_state)
        if conv_state is None:
            conv_shape = (batch, self.conv_channels, self.conv_kernel - 1)
            conv_state = torch.zeros(conv_shape, device=inputs.device)
        weight = self.conv.weight.float()
        raw = inputs.float()
        # torch.where, not a product: a masked token's input may be anything, even inf.
        masked = raw if write_mask is None else torch.where(write_mask[..., None], raw, 0.0)
        # The depthwise causal conv as a sum over its taps in the (B, L, channels) layout of the
        # projections: window[:, k + t] is input t - (kernel - 1) + k (the state's inputs first).
        # Same sums as conv1d over the transposed window, without transposing L x channels
        # inputs into it and the output back (at 16K tokens those copies cost more than the conv).
        window = torch.cat((conv_state.transpose(1, 2), masked), dim=1)
        taps = weight[:, 0]  # (conv_channels, kernel)
        convolved = torch.addcmul(self.conv.bias.float(), window[:, :length], taps[:, 0])
        for tap in range(1, self.conv_kernel):
            convolved = torch.addcmul(convolved, window[:, tap : tap + length], taps[:, tap])
        if write_mask is not None:
            c_size = self.split_sizes[2]
            own_tap = taps[-c_size:, -1] * raw[..., -c_size:] * (~write_mask)[..., None]
            convolved[..., -c_size:] += own_tap  # convolved is this function's own tensor
        x, B, C = F.silu(convolved).split(self.split_sizes, dim=-1)

        repeats = self.num_heads // self.num_groups
        x = x.unflatten(-1, (self.num_groups, self.head_dim)).repeat_interleave(repeats, dim=2)
        B = B.unflatten(-1, (self.num_groups, self.state_size)).repeat_interleave(repeats, dim=2)
        C = C.unflatten(-1, (self.num_heads, self.state_size))
        dt = self.step_sizes(hidden_states)
        if write_mask is not None:
            x = torch.where(write_mask[..., None, None], x, 0.0)
            dt = torch.where(write_mask[..., None], dt, 0.0)
        A = -torch.exp(self.A_log.float())
        D = self.D.float()
        if length == 1 and ssm_state is not None:
            y, ssm_state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state, D=D)
            y = y[:, None]
        else:
            y, ssm_state = ssd_chunk(
                x, dt, A, B, C, D=D, initial_state=ssm_state, chunk_size=self.chunk_size
            )
        # A copy, not a view: the state must not keep the whole prefill window alive.
        kept = window[:, window.shape[1] - (self.conv_kernel - 1) :].transpose(1, 2).contiguous()
        return y, {"conv": kept, "ssm": ssm_state}

    def _step(self, hidden_states, inputs, conv_state, ssm_state):
        """forward for one token with a state and no write mask (decoding): the same sums with
        fewer tensor operations (the window (B, channels, kernel) in the state's layout, x and B
        kept at their num_groups groups by ssd_step_grouped, no input checks on the hot path
        beyond forward's). Returns what forward returns."""
        batch = inputs.shape[0]
        window = torch.cat((conv_state, inputs.float().transpose(1, 2)), dim=2)  # (B, ch, k)
        taps = self.conv.weight.float()[:, 0]  # (conv_channels, kernel)
        convolved = torch.addcmul(self.conv.bias.float(), window[..., 0], taps[:, 0])
        for tap in range(1, self.conv_kernel):
            convolved = torch.addcmul(convolved, window[..., tap], taps[:, tap])
        x, B, C = F.silu(convolved).split(self.split_sizes, dim=-1)
        dt = self.step_sizes(hidden_states[:, 0])
        y, ssm_state = ssd_step_grouped(
            x.view(batch, self.num_groups, self.head_dim),
            dt,
            -torch.exp(self.A_log.float()),
            B.view(batch, self.num_groups, self.state_size),
            C.view(batch, self.num_heads, self.state_size),
            ssm_state,
            D=self.D.float(),
        )
        kept = window[..., 1:].contiguous()
        return y[:, None], {"conv": kept, "ssm": ssm_state}

    def read_state(self, state: MixerState | None, batch: int):
        """(conv (B, conv_channels, kernel - 1), ssm (B, H, P, N)) of a checked state dict, or
        (None, None) for None."""
        if state is None:
            return None, None
        check_state_keys(state, STATE_KEYS)
        conv_shape = (batch, self.conv_channels, self.conv_kernel - 1)
        conv = check_state_tensor(state, "conv", conv_shape, "(B, conv_channels, kernel - 1)")
        ssm_shape = (batch, self.num_heads, self.head_dim, self.state_size)
        ssm = check_state_tensor(state, "ssm", ssm_shape, "(B, H, P, N)")
        return conv.float(), ssm.float()


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer with the linvid mixer calling convention (base.py; module docstring for
    the equations). Replaces a decoder layer's self-attention (paper 002 §3.1).

    Shapes: H = num_heads, P = head_dim, N = state_size (default P), H_kv = num_key_value_heads
    (default H) groups of x and B. Parameters: x_proj (hidden -> H_kv*P), b_proj
    (hidden -> H_kv*N), c_proj (hidden -> H*N), z_proj (hidden -> H*P, with bias), scan
    (Mamba2Scan: conv, dt_proj, dt_bias, A_log, D), norm (GatedRMSNorm per head), out_proj
    (H*P -> hidden). The plain constructor is Mamba-2's random init (nn.Linear defaults, see
    Mamba2Scan, norm weight 1); `from_attention` reuses a teacher (see `reuse_attention`).
    State: Mamba2Scan's {"conv", "ssm"}, float32.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        num_key_value_heads: int | None = None,
        state_size: int | None = None,
        conv_kernel: int = 4,
        chunk_size: int = 64,
        projection_bias: bool = False,
        output_bias: bool = False,
    ):
        super().__init__()
        num_key_value_heads = num_heads if num_key_value_heads is None else num_key_value_heads
        state_size = head_dim if state_size is None else state_size
        self.hidden_size = hidden_size
        self.scan = Mamba2Scan(
            hidden_size,
            num_heads,
            head_dim,
            state_size,
            num_key_value_heads,
            conv_kernel=conv_kernel,
            chunk_size=chunk_size,
        )
        add_projections(self, self.scan, projection_bias=projection_bias, output_bias=output_bias)

    @classmethod
    def from_attention(
        cls, attention: nn.Module, config, *, conv_kernel: int = 4, chunk_size: int = 64
    ) -> Mamba2Mixer:
        """Build from a teacher attention with q_proj/k_proj/v_proj/o_proj (MambaInLlama's
        mapping, paper 003 eq. 4): C <- W_Q, B <- W_K, x <- W_V, out <- W_O with biases, H and
        H_kv from config, P = N = head_dim; other inits in `reuse_attention`.

        config: the text config (hidden_size, num_attention_heads, num_key_value_heads,
        optional head_dim). Returns a module on the teacher's device and dtype.
        """
        geometry = AttentionGeometry.read(attention, config)
        mixer = cls(
            geometry.hidden_size,
            geometry.num_heads,
            geometry.head_dim,
            num_key_value_heads=geometry.num_key_value_heads,
            conv_kernel=conv_kernel,
            chunk_size=chunk_size,
            projection_bias=geometry.projection_bias,
            output_bias=geometry.output_bias,
        )
        reuse_attention(mixer, attention)
        mixer.scan.reset_conv_to_identity()
        return to_teacher(mixer, attention)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: MixerContext | None = None,
        state: MixerState | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """Mix L tokens (prefill/training through ssd_chunk, one token with a state through
        ssd_step).

        hidden_states: (B, L, hidden); context: its padding_mask (B, L) is read: padding tokens
        neither write nor decay the state and are zeros to the conv (their own outputs are
        meaningless); state: None or the dict returned for the previous tokens.
        Returns (output (B, L, hidden) in hidden_states' dtype, new state {"conv", "ssm"}).
        """
        batch, length = check_hidden_states(hidden_states, self.hidden_size)
        padding_mask = context_mask(context, "padding_mask", batch, length)
        inputs = scan_inputs(self, hidden_states)
        y, new_state = self.scan(hidden_states, inputs, state, padding_mask)
        return gated_output(self, y, hidden_states), new_state


def add_projections(
    module: nn.Module, scan: Mamba2Scan, *, projection_bias: bool, output_bias: bool
) -> None:
    """Give `module` the projections of a Mamba-2 mixer whose scans are shaped like `scan`:
    x_proj, b_proj, c_proj (hidden -> the conv's x, B, C widths), z_proj (hidden -> H*P, with
    bias), norm (GatedRMSNorm per head) and out_proj (H*P -> hidden)."""
    hidden_size = scan.dt_proj.in_features
    x_size, b_size, c_size = scan.split_sizes
    inner_size = scan.num_heads * scan.head_dim
    module.x_proj = nn.Linear(hidden_size, x_size, bias=projection_bias)
    module.b_proj = nn.Linear(hidden_size, b_size, bias=projection_bias)
    module.c_proj = nn.Linear(hidden_size, c_size, bias=projection_bias)
    module.z_proj = nn.Linear(hidden_size, inner_size)
    module.norm = GatedRMSNorm(inner_size, scan.head_dim)
    module.out_proj = nn.Linear(inner_size, hidden_size, bias=output_bias)


def scan_inputs(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The conv's input [x, B, C] = [W_x h, W_B h, W_C h] (B, L, conv_channels), in
    Mamba2Scan's channel order, from the projections of a module made by `add_projections`."""
    projections = (module.x_proj, module.b_proj, module.c_proj)
    return torch.cat([projection(hidden_states) for projection in projections], dim=-1)


def gated_output(module: nn.Module, y: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """W_out RMSNorm_per_head(y * SiLU(W_z h + b_z)) (module docstring, last line) for a module
    made by `add_projections`: y (B, L, H, P) float32, hidden_states h (B, L, hidden).
    Returns (B, L, hidden) in hidden_states' dtype."""
    normed = module.norm(y.flatten(2), module.z_proj(hidden_states))
    return module.out_proj(normed.to(hidden_states.dtype))


@torch.no_grad()
def reuse_attention(module: nn.Module, attention: nn.Module) -> None:
    """Initialise a module made by `add_projections` (a Mamba2Mixer or LinMU's FlexMA) from a
    teacher attention (paper 003 eq. 4; MambaInLlama):

    - c_proj, b_proj, x_proj, out_proj <- q_proj, k_proj, v_proj, o_proj, weights and biases
      (a projection whose teacher has no bias gets bias 0); x and B keep the H_kv kv heads;
    - gate z: weight 0, bias SILU_FIXED_POINT, so silu(z) = 1 for every token: the "identity
      initialisation" of gates of paper 003 §3.2.1;
    - norm weight of head h = the root mean square of its value channels for unit-variance
      inputs, sqrt((|W_V,h|_F^2 + |b_V,h|^2) / P) (`value_head_scales`). The RMSNorm removes
      y's scale, so without this the output's scale would be that of W_O alone; with it the
      output starts on (the upper end of) the teacher attention's scale.

    The conv, dt, A and D are left to the caller (Mamba-2 inits; convs set to identity taps).
    """
    copy_projection(module.c_proj, attention.q_proj)
    copy_projection(module.b_proj, attention.k_proj)
    copy_projection(module.x_proj, attention.v_proj)
    copy_projection(module.out_proj, attention.o_proj)
    module.z_proj.weight.zero_()
    module.z_proj.bias.fill_(SILU_FIXED_POINT)
    head_dim = module.norm.group_size
    num_heads = module.norm.weight.numel() // head_dim
    module.norm.weight.copy_(value_head_scales(attention.v_proj, head_dim, num_heads))
