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

The checks at the end of this module are the ones every mixer runs on these inputs, so that a
wrong hidden_states, context mask or state reads the same from every mixer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from linvid.ops.validation import check_shape, check_tensor, describe

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


def check_hidden_states(hidden_states, hidden_size: int) -> tuple[int, int]:
    """Require a floating (B, L, hidden_size) tensor with L >= 1; returns (B, L)."""
    check_tensor("hidden_states", hidden_states, 3, "(B, L, hidden)")
    batch, length, _ = hidden_states.shape
    check_shape("hidden_states", hidden_states, (batch, length, hidden_size), "(B, L, hidden)")
    if length == 0:
        raise ValueError(
            f"hidden_states must have at least one token, got {describe(hidden_states)}"
        )
    return batch, length


def check_token_mask(
    name: str, mask, batch: int, length: int, layout: str = "(B, L)"
) -> torch.Tensor | None:
    """Require None or a bool tensor of shape (batch, length) (a MixerContext mask); returns
    it. `layout` names the axes in the error message."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = describe(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor {layout}, got {got}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{name} must have shape {layout} = {(batch, length)}, got {describe(mask)}"
        )
    return mask


def context_mask(
    context: MixerContext | None, name: str, batch: int, length: int
) -> torch.Tensor | None:
    """context.<name> (padding_mask or vision_mask; None without a context), checked to be None
    or a bool (B, L) tensor."""
    return check_token_mask(f"context.{name}", getattr(context, name, None), batch, length)


def check_state_keys(state, expected: tuple[str, ...]) -> None:
    """Require a mixer state: a dict with exactly the keys `expected`."""
    if not isinstance(state, dict) or set(state) != set(expected):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state must be a dict with keys {sorted(expected)}, got {got}")


def check_state_tensor(
    state: MixerState, key: str, expected: tuple[int, ...], layout: str
) -> torch.Tensor:
    """Require state[key] to be a floating tensor of shape `expected` (`layout` names its axes,
    e.g. "(B, H, K, K)"); returns it."""
    name = f"state['{key}']"
    check_tensor(name, state[key], len(expected), layout)
    check_shape(name, state[key], expected, layout)
    return state[key]
