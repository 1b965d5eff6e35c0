"""What every linvid mixer shares: the context it reads besides its hidden states, and the
calling convention the model adapter relies on.

A mixer replaces a decoder layer's self-attention. It is called on the layer's *normalised*
hidden states (after input_layernorm) and returns what the attention returned, before the
residual add:

    output, new_state = mixer(hidden_states, context, state)

    hidden_states: (B, L, D); output: (B, L, D) in hidden_states' dtype.
    context: MixerContext for these L tokens (padding, vision tokens, video grids, scenes).
    state: None at the start of a sequence, else the dict this mixer returned for the tokens
        before (decoding: L is usually 1). Tensors in it have a fixed size that does not grow
        with the sequence. new_state is the dict to pass with the next tokens.

Processing a sequence in one call or in several consecutive calls carrying the state must give
the same outputs (prefill + token-by-token decoding == one full forward). Padding tokens
(padding_mask False, left padding) must not change the outputs or states of real tokens.
Each mixer has `from_attention(attention, config, ...)` building it from a teacher attention
module with q_proj/k_proj/v_proj/o_proj (weight reuse) and `config` the text config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MixerState = dict[str, torch.Tensor]


@dataclass
class VideoLayout:
    """Where one video's (or image's) tokens sit in a sample's sequence.

    positions: (T*H*W,) long, indices into the L tokens of the current call, in raster order
        of the grid (t, y, x); grid: (T, H, W) after the vision tower's spatial merge (and
        temporal patching): the grid the LLM sees.
    """

    positions: torch.Tensor
    grid: tuple[int, int, int]


@dataclass
class MixerContext:
    """Per-call facts about the sequence that mixers other than attention need.

    padding_mask: (B, L) bool, True for real tokens, or None when nothing is padded.
    vision_mask: (B, L) bool, True for video/image tokens, or None when there are none.
    videos: per sample, the layouts of its videos in this call's tokens (empty lists when
        the call has no vision tokens, e.g. decoding).
    scene_tokens: (B, S, D) the scene tokens of each sample's video (paper 000 §4.1: frames
        pooled per scene, every token of a scene kept, flattened over scenes), not normalised,
        or None when the call carries no video (decoding reuses what the state cached).
    scene_mask: (B, S) bool, True for real scene tokens (samples differ in scene count).
    """

    padding_mask: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None
    videos: list[list[VideoLayout]] = field(default_factory=list)
    scene_tokens: torch.Tensor | None = None
    scene_mask: torch.Tensor | None = None

    @staticmethod
    def empty(batch: int) -> MixerContext:
        """Context for plain text tokens with no padding (e.g. one decoding step)."""
        return MixerContext(videos=[[] for _ in range(batch)])
