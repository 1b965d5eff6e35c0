"""Pure tensor math for linvid's mixers and token compression (no nn.Module, no model
knowledge). Every sequence op has a plain reference (`*_recurrent` / `*_naive`), a fast form
(`*_chunk`) and a one-token form (`*_step`). Conventions: DESIGN.md, "Math conventions"."""

from linvid.ops.scan import (
    rms_permutation,
    rms_positions,
    rms_sequence_permutation,
    scan_vision_tokens,
    unscan_vision_tokens,
)
from linvid.ops.ssd import ssd_chunk, ssd_recurrent, ssd_step
from linvid.ops.tome import (
    TokenMerge,
    bipartite_soft_matching,
    proportional_attention_bias,
    tome_merge,
)
from linvid.ops.window_attention import window_attention_3d, window_attention_3d_naive
from linvid.ops.wkv6 import wkv6_chunk, wkv6_recurrent, wkv6_step

__all__ = [
    "TokenMerge",
    "bipartite_soft_matching",
    "proportional_attention_bias",
    "rms_permutation",
    "rms_positions",
    "rms_sequence_permutation",
    "scan_vision_tokens",
    "ssd_chunk",
    "ssd_recurrent",
    "ssd_step",
    "tome_merge",
    "unscan_vision_tokens",
    "window_attention_3d",
    "window_attention_3d_naive",
    "wkv6_chunk",
    "wkv6_recurrent",
    "wkv6_step",
]
