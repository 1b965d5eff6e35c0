"""LinMU's M-MATE block (paper 003 §3.1, Algorithm 1) as a linvid mixer: a Flex-MA branch (a
bidirectional Mamba-2 over the Rotary-Major-Scanned sequence whose reverse direction sees only
vision tokens) and a Local-Swin branch (3D window attention over each video's tokens), fused as

    y_t = LayerNorm(lambda * y_t^Flex + (1 - lambda) * y_t^LS)        Algorithm 1 line 8

Flex-MA (paper 003 §3.1.1), on u = RMS(z), the layer's scan order of the vision tokens:

    h_t^fwd = A_t h_{t-1}^fwd + B_t u_t,            y_t^fwd = C_t h_t^fwd              eq. 1
    h_t^rev = A~_t h_{t+1}^rev + B~_t (M_V . u_t),  y_t^rev = C~_t h_t^rev             eq. 2
    y_t^Flex = W_o (g_t . y_t^fwd + (1 - g_t) . y_t^rev)                                eq. 3

with each direction a Mamba-2 scan (linvid.layers.mamba2), then Rev-RMS. Local-Swin (§3.1.2):
softmax(Q K^T / sqrt(d_h)) V inside (16, 4, 4) windows of each video's (T, H, W) grid, shifted
by half a window on odd layers, zeros on text tokens. Both branches start from the teacher's
W_Q, W_K, W_V, W_O (paper 003 eq. 4-5).

Decoding: tokens generated after the prompt are text after every video, so the reverse direction
(which would need the future) and Local-Swin contribute nothing to them, in a full forward as
well; the state is the forward direction's {"conv", "ssm"} and prefill + token-by-token
decoding equals one full forward. A text token *before* a video does read the video through the
reverse direction in a full forward (the paper's design: Fig. 3's "causal maps for text" hold
for text after the vision tokens); this stays consistent because every video is complete within
one call. If a later call (with a state) brings a new video, tokens of earlier calls cannot see
it through the reverse direction as one full forward over everything would.
"""

from __future__ import annotations

import torch
from torch import nn

from linvid.layers.attention_weights import (
    AttentionGeometry,
    check_head_layout,
    copy_projection,
    to_teacher,
)
from linvid.layers.base import (
    MixerContext,
    MixerState,
    VideoLayout,
    check_hidden_states,
    context_mask,
)
from linvid.layers.mamba2 import (
    Mamba2Scan,
    add_projections,
    gated_output,
    reuse_attention,
    scan_inputs,
)
from linvid.ops.scan import rms_sequence_permutation
from linvid.ops.validation import check_positive_int, describe
from linvid.ops.window_attention import window_attention_3d

DEFAULT_WINDOW = (16, 4, 4)  # (frames, height, width): paper 003 §3.1.2 for long videos


class FlexMA(nn.Module):
    """Flex-MA branch (paper 003 §3.1.1, eq. 1-3; Algorithm 1 lines 1-4): Mamba-2 run forward
    and backward over the sequence with each video's tokens in layer `layer_idx`'s Rotary Major
    Scan order, the backward direction reading only vision tokens, fused per token and head by
    a learned gate g_t = sigmoid(W_g u_t + b_g), then the gated RMSNorm and W_o, then un-scanned.

    Shared by both directions: x_proj, b_proj, c_proj, z_proj, norm, out_proj (as in
    Mamba2Mixer; paper 003 eq. 4 maps one W_X, W_B, W_C per layer) and direction_gate
    (hidden -> H). Per direction (forward_scan, reverse_scan, each a Mamba2Scan): conv, dt, A, D,
    which give eq. 2 its own A~, B~, C~.

    Eq. 2's mask M_V: in the reverse direction a text (or padding) token neither writes nor
    decays the state and is a zero to the conv of its neighbours, so vision outputs of the
    reverse direction do not depend on any text token, even one between two videos (the reverse
    direction is a scan of the vision tokens alone); a text token still reads the reverse state
    with its own C~ (a text token before a video sees the video). The forward direction masks
    only padding. State: the forward direction's {"conv", "ssm"}, float32.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        layer_idx: int,
        *,
        num_key_value_heads: int | None = None,
        state_size: int | None = None,
        conv_kernel: int = 4,
        chunk_size: int = 64,
        projection_bias: bool = False,
        output_bias: bool = False,
    ):
        super().__init__()
        check_positive_int("layer_idx", layer_idx, allow_zero=True)
        num_key_value_heads = num_heads if num_key_value_heads is None else num_key_value_heads
        state_size = head_dim if state_size is None else state_size
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        scan_shape = (hidden_size, num_heads, head_dim, state_size, num_key_value_heads)
        scan_options = {"conv_kernel": conv_kernel, "chunk_size": chunk_size}
        self.forward_scan = Mamba2Scan(*scan_shape, **scan_options)
        self.reverse_scan = Mamba2Scan(*scan_shape, **scan_options)
        add_projections(
            self, self.forward_scan, projection_bias=projection_bias, output_bias=output_bias
        )
        self.direction_gate = nn.Linear(hidden_size, num_heads)

    @torch.no_grad()
    def init_from_attention(self, attention: nn.Module) -> None:
        """Teacher weight reuse (paper 003 eq. 4, `linvid.layers.mamba2.reuse_attention`), both
        convs identity taps, and the direction gate at g = 1/2 (W_g = 0, b_g = 0): the paper
        gives no init for g; the two directions start equal, and since the gated RMSNorm follows
        the fusion, a token whose reverse output is 0 (text after the videos) gets the forward
        direction's output whatever g is (up to the norm's eps)."""
        reuse_attention(self, attention)
        self.forward_scan.reset_conv_to_identity()
        self.reverse_scan.reset_conv_to_identity()
        self.direction_gate.weight.zero_()
        self.direction_gate.bias.zero_()

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: MixerContext | None = None,
        state: MixerState | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """Flex-MA output y^Flex (paper 003 eq. 3 after Rev-RMS).

        hidden_states: (B, L, hidden); context: padding_mask, vision_mask and videos (per
        sample, each video's layout; the scan order is built per sample); state: None or the
        forward direction's state after the previous tokens.
        Returns (output (B, L, hidden) in hidden_states' dtype, new forward state).
        """
        batch, length = check_hidden_states(hidden_states, self.hidden_size)
        padding_mask = context_mask(context, "padding_mask", batch, length)
        videos, vision_mask = read_videos(context, batch, length, hidden_states.device)
        if vision_mask is not None:
            rows = torch.arange(batch, device=hidden_states.device)[:, None]
            order, inverse = self.scan_order(videos, length, hidden_states.device)
            # RMS moves vision tokens only within their own video's slots, so the padding and
            # vision masks read the same before and after the scan.
            hidden_states = hidden_states[rows, order]
        inputs = scan_inputs(self, hidden_states)
        forward_y, new_state = self.forward_scan(hidden_states, inputs, state, padding_mask)
        gate = torch.sigmoid(self.direction_gate(hidden_states).float())[..., None]  # (B,L,H,1)
        if vision_mask is None:
            # The reverse direction reads only vision tokens: it is zero on every token of a
            # call without any (e.g. decoding), and (1 - g) * 0 adds exactly nothing.
            fused = gate * forward_y
        else:
            reverse_y, _ = self.reverse_scan(
                hidden_states.flip(1), inputs.flip(1), None, vision_mask.flip(1)
            )
            fused = gate * forward_y + (1 - gate) * reverse_y.flip(1)
        output = gated_output(self, fused, hidden_states)
        if vision_mask is not None:
            output = output[rows, inverse]
        return output, new_state

    def scan_order(
        self, videos: list[list[VideoLayout]], length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (order, inverse) LongTensors (B, L) of this layer's Rotary Major Scan
        (paper 003 §3.1.1, `linvid.ops.rms_sequence_permutation`): x[rows, order] is scanned,
        and indexing that with inverse gives x back."""
        pairs = [
            rms_sequence_permutation(
                length, [(layout.positions, layout.grid) for layout in layouts], self.layer_idx
            )
            for layouts in videos
        ]
        order = torch.stack([order.to(device) for order, _ in pairs])
        inverse = torch.stack([inverse.to(device) for _, inverse in pairs])
        return order, inverse


class LocalSwin(nn.Module):
    """Local-Swin branch (paper 003 §3.1.2; Algorithm 1 lines 5-7): softmax(Q K^T / sqrt(d_h)) V
    inside 3D windows of each video's (T, H, W) token grid (`window_attention_3d`), without
    rotary embedding, written back to the video's positions with zeros on every other token.

    q_proj (hidden -> H*d), k_proj, v_proj (hidden -> H_kv*d, repeated to H heads as repeat_kv
    does), o_proj (H*d -> hidden). Window (16, 4, 4) by default; on odd layer_idx the grid is
    shifted by half a window, (wt//2, wy//2, wx//2), as Swin. As in (Video) Swin, a window that
    covers a whole axis of a grid is clipped to it and that axis is not shifted (a shift would
    only move tokens within their one window).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        layer_idx: int,
        *,
        num_key_value_heads: int | None = None,
        window: tuple[int, int, int] = DEFAULT_WINDOW,
        projection_bias: bool = False,
        output_bias: bool = False,
    ):
        super().__init__()
        check_positive_int("layer_idx", layer_idx, allow_zero=True)
        num_key_value_heads = num_heads if num_key_value_heads is None else num_key_value_heads
        check_head_layout(hidden_size, num_heads, num_key_value_heads, head_dim)
        if not isinstance(window, tuple | list) or len(window) != 3:
            raise ValueError(f"window must be a tuple of 3 ints (t, y, x), got {window!r}")
        for axis, size in enumerate(window):
            check_positive_int(f"window[{axis}]", size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_key_value_heads = num_key_value_heads
        self.layer_idx = layer_idx
        self.window = tuple(window)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=projection_bias)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=projection_bias)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=projection_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=output_bias)

    @torch.no_grad()
    def init_from_attention(self, attention: nn.Module) -> None:
        """W_Q, W_K, W_V, W_O and biases <- the teacher's (paper 003 eq. 5); a projection whose
        teacher has no bias gets bias 0."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            copy_projection(getattr(self, name), getattr(attention, name))

    def window_and_shift(
        self, grid: tuple[int, int, int]
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(window, shift) used for a video of this (T, H, W) grid at this layer: the window
        clipped to the grid, shifted by half of it along the axes it does not cover on odd
        layers (paper 003 §3.1.2: shift (tau//2, s//2, s//2) in alternating layers)."""
        window = tuple(min(size, extent) for size, extent in zip(self.window, grid, strict=True))
        if self.layer_idx % 2 == 0:
            return window, (0, 0, 0)
        shift = tuple(
            size // 2 if size < extent else 0 for size, extent in zip(window, grid, strict=True)
        )
        return window, shift

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext | None = None
    ) -> torch.Tensor:
        """Local-Swin output y^LS (Algorithm 1 lines 6-7), one video at a time.

        hidden_states: (B, L, hidden); context.videos: per sample, each video's layout.
        Returns (B, L, hidden) in hidden_states' dtype: window attention of each video's tokens
        at their positions, zeros at every other token.
        """
        batch, length = check_hidden_states(hidden_states, self.hidden_size)
        videos, _ = read_videos(context, batch, length, hidden_states.device)
        output = torch.zeros_like(hidden_states)
        repeats = self.num_heads // self.num_key_value_heads
        for sample, layouts in enumerate(videos):
            for layout in layouts:
                positions = layout.positions.to(hidden_states.device)
                tokens = hidden_states[sample, positions][None]  # (1, N, hidden)
                q = self.q_proj(tokens).unflatten(-1, (self.num_heads, self.head_dim))
                k = self.k_proj(tokens).unflatten(-1, (-1, self.head_dim))
                v = self.v_proj(tokens).unflatten(-1, (-1, self.head_dim))
                k, v = (tensor.repeat_interleave(repeats, dim=2) for tensor in (k, v))
                window, shift = self.window_and_shift(layout.grid)
                attended = window_attention_3d(q, k, v, layout.grid, window, shift)
                output[sample, positions] = self.o_proj(attended.flatten(2))[0]
        return output


# M-MATE's branches: both (paper 003 Algorithm 1), or one of them alone (the ablations of paper
# 003 Table 4: Flex-MA only, "a pure Mamba2-based model"; Local-Swin only).
BRANCHES = ("both", "flex", "swin")


class MMATE(nn.Module):
    """LinMU's M-MATE block with the linvid mixer calling convention (base.py): paper 003
    §3.1, Algorithm 1, y = LayerNorm(lambda * y^Flex + (1 - lambda) * y^LS).

    branches "flex" / "swin" (paper 003 Table 4's ablations) build one branch only, with no
    lambda: y = LayerNorm(y^Flex) or LayerNorm(y^LS) (zero on text tokens, which Local-Swin
    does not reach; the block then carries no state).

    Submodules: flex (FlexMA), swin (LocalSwin), norm (nn.LayerNorm(hidden)); parameter
    flex_weight = lambda, a learnable scalar. The plain constructor is a random init (Mamba-2's
    for Flex-MA, nn.Linear defaults, gate g = sigmoid of a default nn.Linear, lambda = 1/2,
    LayerNorm 1/0); `from_attention` reuses a teacher (paper 003 eq. 4-5).
    The paper gives no init for lambda: 1/2 weighs both branches equally, and on text tokens,
    where y^LS = 0, the LayerNorm removes lambda's scale altogether.
    State: Flex-MA's forward direction {"conv": (B, conv_channels, kernel - 1),
    "ssm": (B, H, P, N)}, float32 (see the module docstring for decoding).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        layer_idx: int,
        *,
        num_key_value_heads: int | None = None,
        state_size: int | None = None,
        conv_kernel: int = 4,
        chunk_size: int = 64,
        window: tuple[int, int, int] = DEFAULT_WINDOW,
        projection_bias: bool = False,
        output_bias: bool = False,
        branches: str = "both",
    ):
        super().__init__()
        if branches not in BRANCHES:
            raise ValueError(f"unknown M-MATE branches {branches!r}; expected one of {BRANCHES}")
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.branches = branches
        self.flex = self.swin = self.flex_weight = None
        if branches != "swin":
            self.flex = FlexMA(
                hidden_size,
                num_heads,
                head_dim,
                layer_idx,
                num_key_value_heads=num_key_value_heads,
                state_size=state_size,
                conv_kernel=conv_kernel,
                chunk_size=chunk_size,
                projection_bias=projection_bias,
                output_bias=output_bias,
            )
        if branches != "flex":
            self.swin = LocalSwin(
                hidden_size,
                num_heads,
                head_dim,
                layer_idx,
                num_key_value_heads=num_key_value_heads,
                window=window,
                projection_bias=projection_bias,
                output_bias=output_bias,
            )
        if branches == "both":
            self.flex_weight = nn.Parameter(torch.tensor(0.5))
        self.norm = nn.LayerNorm(hidden_size)

    @classmethod
    def from_attention(
        cls,
        attention: nn.Module,
        config,
        layer_idx: int | None = None,
        *,
        window: tuple[int, int, int] = DEFAULT_WINDOW,
        conv_kernel: int = 4,
        chunk_size: int = 64,
        branches: str = "both",
    ) -> MMATE:
        """Build from a teacher attention with q_proj/k_proj/v_proj/o_proj (paper 003 §3.2.1):
        Flex-MA's C, B, x, out <- W_Q, W_K, W_V, W_O (eq. 4, FlexMA.init_from_attention) and
        Local-Swin's Q, K, V, O <- the same (eq. 5); lambda = 1/2; LayerNorm bias 0 and weight
        the expected root mean square of y^Flex at init, sqrt(mean_d sum_c (W_o[d, c] s_c)^2)
        with s the Flex-MA norm's per-head value scales, so the block writes on the scale of
        y^Flex (the teacher attention's, see reuse_attention) rather than at unit scale.

        config: the text config (hidden_size, num_attention_heads, num_key_value_heads,
        optional head_dim); layer_idx: this layer's index (scan order and shift), default
        attention.layer_idx; branches: one of BRANCHES (with "swin" the LayerNorm keeps weight
        1). Returns a module on the teacher's device and dtype.
        """
        if layer_idx is None:
            layer_idx = getattr(attention, "layer_idx", None)
        if layer_idx is None:
            raise ValueError("layer_idx must be given when attention.layer_idx is None or absent")
        geometry = AttentionGeometry.read(attention, config)
        block = cls(
            geometry.hidden_size,
            geometry.num_heads,
            geometry.head_dim,
            layer_idx,
            num_key_value_heads=geometry.num_key_value_heads,
            conv_kernel=conv_kernel,
            chunk_size=chunk_size,
            window=window,
            projection_bias=geometry.projection_bias,
            output_bias=geometry.output_bias,
            branches=branches,
        )
        if block.swin is not None:
            block.swin.init_from_attention(attention)
        if block.flex is None:
            return to_teacher(block, attention)
        block.flex.init_from_attention(attention)
        with torch.no_grad():
            # Expected root mean square of y^Flex at init: W_o applied to heads normalised to
            # the norm's per-head scales (unit-variance entries times norm.weight).
            scaled = block.flex.out_proj.weight.float() * block.flex.norm.weight.float()
            block.norm.weight.fill_(scaled.square().sum(1).mean().sqrt())
        return to_teacher(block, attention)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: MixerContext | None = None,
        state: MixerState | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """M-MATE output (paper 003 Algorithm 1).

        hidden_states: (B, L, hidden); context: padding_mask, vision_mask (must mark exactly
        the positions of context.videos) and videos; state: None or the dict returned for the
        previous tokens. Returns (output (B, L, hidden) in hidden_states' dtype, new state).
        """
        has_video = context is not None and any(context.videos)
        if self.flex is None:  # Local-Swin alone: no state; zero without a video (decoding)
            if state:
                raise ValueError(
                    f"a Local-Swin-only M-MATE block has no state, got {sorted(state)}"
                )
            swin = self.swin(hidden_states, context) if has_video else hidden_states * 0
            return self.norm(swin).to(hidden_states.dtype), {}
        flex, new_state = self.flex(hidden_states, context, state)
        if self.swin is None:
            fused = flex
        elif has_video:
            swin = self.swin(hidden_states, context)
            fused = self.flex_weight * flex + (1 - self.flex_weight) * swin
        else:
            # No video in this call (e.g. decoding): Local-Swin is zero on every token.
            fused = self.flex_weight * flex
        return self.norm(fused).to(hidden_states.dtype), new_state


def read_videos(
    context: MixerContext | None, batch: int, length: int, device: torch.device
) -> tuple[list[list[VideoLayout]], torch.Tensor | None]:
    """Per-sample video layouts of a context, checked, and the (B, L) bool vision mask they
    define (None when no sample has a video). context.videos must hold one list per sample (or
    be empty: no videos); each layout's positions a LongTensor (T*H*W,) of distinct positions
    in [0, L) in increasing (raster) order; context.vision_mask, if given, must be True exactly
    at those positions."""
    videos = [] if context is None else context.videos
    if len(videos) == 0:
        videos = [[] for _ in range(batch)]
    if len(videos) != batch:
        raise ValueError(
            f"context.videos must hold one list of VideoLayout per sample (B = {batch}), got "
            f"{len(videos)} lists"
        )
    given = context_mask(context, "vision_mask", batch, length)
    if not any(videos):
        # No video (e.g. decoding): the mask would be all False; one reduction checks `given`.
        if given is not None and bool(given.any()):
            raise ValueError(
                f"context.vision_mask must be True exactly at the positions of context.videos: "
                f"it marks {int(given.sum())} tokens, the videos cover 0"
            )
        return videos, None
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for sample, layouts in enumerate(videos):
        for index, layout in enumerate(layouts):
            name = f"context.videos[{sample}][{index}]"
            check_video_layout(name, layout, length)
            positions = layout.positions.to(device)
            if bool(mask[sample, positions].any()):
                raise ValueError(f"{name} shares positions with another video of sample {sample}")
            mask[sample, positions] = True
    if given is not None and not torch.equal(given.to(device), mask):
        raise ValueError(
            f"context.vision_mask must be True exactly at the positions of context.videos: it "
            f"marks {int(given.sum())} tokens, the videos cover {int(mask.sum())}, and they "
            f"differ at {int((given.to(device) != mask).sum())} positions"
        )
    return videos, (mask if bool(mask.any()) else None)


def check_video_layout(name: str, layout, length: int) -> None:
    """Require a VideoLayout whose grid is 3 ints >= 1 and whose positions are a LongTensor
    (T*H*W,) strictly increasing within [0, length)."""
    if not isinstance(layout, VideoLayout):
        raise ValueError(f"{name} must be a VideoLayout, got {type(layout).__name__}")
    grid = layout.grid
    if not isinstance(grid, tuple | list) or len(grid) != 3:
        raise ValueError(f"{name}.grid must be a tuple (T, H, W) of 3 ints, got {grid!r}")
    for axis, size in enumerate(grid):
        check_positive_int(f"{name}.grid[{axis}]", size)
    count = grid[0] * grid[1] * grid[2]
    positions = layout.positions
    if (
        not isinstance(positions, torch.Tensor)
        or positions.dtype != torch.long
        or tuple(positions.shape) != (count,)
    ):
        got = describe(positions) if isinstance(positions, torch.Tensor) else type(positions)
        raise ValueError(
            f"{name}.positions must be a LongTensor (T*H*W,) = ({count},) for grid "
            f"{tuple(grid)}, got {got}"
        )
    if int(positions.min()) < 0 or int(positions.max()) >= length:
        raise ValueError(
            f"{name}.positions must lie in [0, {length}) (the call's length), got values from "
            f"{int(positions.min())} to {int(positions.max())}"
        )
    if not bool((positions[1:] > positions[:-1]).all()):
        raise ValueError(f"{name}.positions must be strictly increasing (raster order)")
