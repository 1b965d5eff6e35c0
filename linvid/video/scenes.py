"""Scene boundaries from adjacent-frame similarity and one pooled token set per scene
(paper 000 §4.1 eq. 8-10). Conventions: DESIGN.md, "Math conventions", Scenes."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from linvid.ops.validation import check_positive_int, check_tensor, describe


def _check_frames(frames) -> None:
    check_tensor("frames", frames, 3, "(T, N, D)")
    if frames.shape[0] == 0:
        raise ValueError(f"frames must hold at least one frame (T, N, D), got {describe(frames)}")


def adjacent_frame_similarity(frames: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each frame's flattened tokens with the next frame's (paper 000
    eq. 8 writes its inverse, s_t = 1 / Sim(V_t, V_{t+1})).

    frames: (T, N, D) -> (T - 1,) float32; entry t compares frames t and t + 1.
    """
    _check_frames(frames)
    unit = F.normalize(frames.reshape(frames.shape[0], -1).float(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def scene_boundaries(frames: torch.Tensor, max_scenes: int = 16, tau: float = 0.6) -> list[int]:
    """Cut the video where adjacent frames differ most (paper 000 eq. 9, with K = max_scenes - 1).

    frames: (T, N, D). Candidate cuts are the t with similarity(t, t + 1) < tau; the at most
    max_scenes - 1 least similar are kept (ties go to the earlier cut). Returns them sorted;
    cut t ends a scene at frame t (0-based), so the next scene starts at frame t + 1.
    """
    _check_frames(frames)
    check_positive_int("max_scenes", max_scenes)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite real similarity threshold, got {tau!r}")
    similarity = adjacent_frame_similarity(frames)
    candidates = torch.nonzero(similarity < tau).flatten()
    least_similar = similarity[candidates].argsort(stable=True)[: max_scenes - 1]
    return sorted(candidates[least_similar].tolist())


def scene_tokens(frames: torch.Tensor, boundaries: Sequence[int]) -> torch.Tensor:
    """Average the frames of each scene (paper 000 eq. 10).

    frames: (T, N, D); boundaries: strictly increasing cuts in [0, T - 2] as returned by
    `scene_boundaries`. Returns (S, N, D) with S = len(boundaries) + 1, in frames' dtype.
    """
    _check_frames(frames)
    frame_count = frames.shape[0]
    expected = (
        f"boundaries must be strictly increasing ints in [0, T - 2] = [0, {frame_count - 2}] "
        f"for frames {describe(frames)}"
    )
    try:
        cuts = [operator.index(cut) for cut in boundaries]
    except TypeError as error:
        raise ValueError(f"{expected}, got {boundaries!r}") from error
    ends = [*cuts, frame_count - 1]
    starts = [0, *(cut + 1 for cut in cuts)]
    if any(end < start for start, end in zip(starts, ends, strict=True)):
        raise ValueError(f"{expected}, got {boundaries!r}")
    lengths = [end - start + 1 for start, end in zip(starts, ends, strict=True)]
    return torch.stack([scene.mean(dim=0) for scene in frames.split(lengths)])
