"""Token merging after the vision tower, per frame, down to n tokens per frame (paper 002
§3.1: "ToMe in the projection layer", 16 tokens per frame), for Qwen2.5-VL-style models.

Qwen2.5-VL's vision tower uses windowed attention and 2D rotary positions, so merging inside
it would break both; the merge runs on its output instead: the (t*h*w, D) tokens of a video
after the 2x2 spatial merge, frame by frame (a frame is one temporal patch). The matching,
size-weighted averaging and ordering are `linvid.ops.tome`'s.

The merged tokens then need what Qwen's processor and `get_rope_index` would have built for an
unmerged video: a prompt with t*n placeholders, the features as `mm_encoder_outputs`, explicit
M-RoPE `position_ids` and a `video_grid_thw` that linvid students turn into a (t, 1, n) video
layout. `compressed_video_inputs` builds all of them, for `model(**inputs)` and
`model.generate(**inputs)` alike, for a teacher and for a linvid student.

Position rule. A merged token sits at (frame time, y, x) of its first patch: the patch of
the grid cell with the lowest raster index y * w + x among the cells merged into it. The frame
time is Qwen2.5-VL's: floor(frame * tokens_per_second * second_per_grid). Why the first patch
rather than the (rounded) size-weighted mean of the cells:
- it is a cell the token covers, whereas ToMe merges by similarity, not adjacency (two patches
  of a uniform background at opposite edges merge into one token whose mean is the centre,
  where an object may be);
- no two tokens of a frame share a position (their first patches differ), so the rotary
  angles still tell every token of a frame apart;
- a token that merged nothing keeps exactly Qwen's position, so with n >= h*w the positions,
  and hence the logits, are exactly those of the unmerged model;
- it is the same "first patch" that breaks ties in `linvid.ops.tome`'s size order.
Text after the video resumes where transformers 5.23's `get_rope_index` resumes it for the
unmerged video, at start + max(h, w) (h, w: the grid the LLM sees), so the question's
positions do not depend on n.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from linvid.eval.prompts import render_video_prompt, video_messages
from linvid.ops.tome import ORDERS, TokenMerge, bipartite_soft_matching
from linvid.ops.validation import check_positive_int, check_tensor, describe

DEFAULT_TOKENS_PER_FRAME = 16  # paper 002 §4 implementation details
VIDEO_TYPE = 2  # Qwen2.5-VL's mm_token_type_ids for video tokens


@dataclass(frozen=True)
class MergedVideo:
    """One video's tokens after per-frame ToMe.

    features: (t*n, D) merged tokens, frame after frame, each frame's n tokens in the order
        chosen by `order`.
    size: (t*n,) float32 grid cells represented by every token (each frame's sizes sum to h*w).
    positions: (3, t*n) long M-RoPE (temporal, height, width) positions relative to the
        video's first position (see the module docstring for the rule).
    merge: the per-frame merge as a `TokenMerge` with batch t: destination (t, h*w) token of
        every grid cell of every frame, size (t, n); `merge.unmerge` paints tokens back onto
        the grid.
    grid: (t, h, w) the grid the LLM would see without merging (after the spatial merge).
    tokens_per_frame: n, min(requested n, h*w).
    """

    features: torch.Tensor
    size: torch.Tensor
    positions: torch.Tensor
    merge: TokenMerge
    grid: tuple[int, int, int]
    tokens_per_frame: int

    @property
    def num_tokens(self) -> int:
        """t * n, the placeholders the prompt needs."""
        return self.features.shape[0]

    @property
    def merged(self) -> bool:
        """Whether any frame lost tokens (n < h*w)."""
        return self.tokens_per_frame < self.grid[1] * self.grid[2]

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """The (T, H, W) layout linvid mixers see: the original grid when nothing merged, else
        (t, 1, n): a merged frame is a row of n tokens, no longer a 2D grid."""
        t, h, w = self.grid
        return (t, 1, self.tokens_per_frame) if self.merged else (t, h, w)


def merge_video_tokens(
    features: torch.Tensor,
    grid,
    tokens_per_frame: int = DEFAULT_TOKENS_PER_FRAME,
    order: str = "ascending",
    *,
    time_interval: float = 1,
) -> MergedVideo:
    """Merge each frame's tokens down to `tokens_per_frame` by ToMe (paper 002 §3.1).

    features: (t*h*w, D) one video's vision-tower output (after the spatial merge), frames in
    order, each frame in raster order; grid: (t, h, w) that layout (a sequence or a tensor of
    3 ints). The merge metric is the features themselves (cosine similarity) and never crosses
    frames. Rounds of bipartite soft matching (each merges at most half a frame's tokens)
    run until n tokens remain; every round sees the tokens in raster order of their first
    cell, so its alternating sets pair spatial neighbours as ToMe's first round does. `order`
    ("ascending": unmerged tokens first, "descending", "none": ToMe's order) applies to the
    last round's output, equal sizes in raster order (`linvid.ops.tome.bipartite_soft_matching`).
    Frames with at most n tokens are kept as they are. time_interval: temporal position step
    per frame, tokens_per_second * second_per_grid for Qwen2.5-VL. Returns a MergedVideo.
    """
    check_tensor("features", features, 2, "(t*h*w, D)")
    t, h, w = _checked_grid(grid)
    if features.shape[0] != t * h * w:
        raise ValueError(
            f"features must have t*h*w = {t * h * w} rows for grid {(t, h, w)}, "
            f"got {describe(features)}"
        )
    check_positive_int("tokens_per_frame", tokens_per_frame)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if isinstance(time_interval, bool) or not isinstance(time_interval, Real) or time_interval <= 0:
        raise ValueError(f"time_interval must be a number > 0, got {time_interval!r}")

    frames = features.reshape(t, h * w, features.shape[1])
    merge = _frame_merge(frames, tokens_per_frame, order)
    merged = merge.average(frames)  # (t, n, D), from the original tokens in one step
    device = features.device
    cells = torch.arange(h * w, device=device).expand(t, -1)
    first_cell = merge.merge(cells, reduce="amin")  # (t, n)
    # Qwen2.5-VL's get_vision_position_ids: floor(frame * interval), before the start offset.
    temporal = (torch.arange(t, device=device) * time_interval).long()
    positions = torch.stack(
        [temporal[:, None].expand_as(first_cell), first_cell // w, first_cell % w]
    ).reshape(3, -1)
    return MergedVideo(
        features=merged.reshape(-1, features.shape[1]),
        size=merge.size.reshape(-1),
        positions=positions,
        merge=merge,
        grid=(t, h, w),
        tokens_per_frame=merge.size.shape[1],
    )


def _checked_grid(grid) -> tuple[int, int, int]:
    values = grid.reshape(-1).tolist() if isinstance(grid, torch.Tensor) else list(grid)
    if len(values) != 3:
        raise ValueError(f"grid must be (t, h, w), got {grid!r}")
    for axis, value in zip("thw", values, strict=True):
        check_positive_int(f"grid {axis}", value)
    return tuple(values)


def _frame_merge(frames: torch.Tensor, tokens_per_frame: int, order: str) -> TokenMerge:
    """Rounds of bipartite soft matching on (t, N, D) frames down to tokens_per_frame tokens,
    composed into one TokenMerge from the N cells to the output tokens."""
    batch, cells, _ = frames.shape
    device = frames.device
    ones = torch.ones(batch, cells, dtype=torch.float32, device=device)
    destination = torch.arange(cells, device=device).repeat(batch, 1)
    tokens, size = frames, ones
    while tokens.shape[1] > tokens_per_frame:
        count = tokens.shape[1]
        r = min(count - tokens_per_frame, count // 2)
        last = count - r == tokens_per_frame
        step = bipartite_soft_matching(tokens, r, size=size, order=order if last else "none")
        tokens, size = step.average(tokens), step.size
        destination = step.destination.gather(1, destination)
        if not last:
            tokens, size, destination = _raster_order(tokens, size, destination)
    return TokenMerge(destination=destination, input_size=ones, size=size)


def _raster_order(tokens, size, destination):
    """Reorder (t, M, ...) tokens and sizes by their first cell; destination (t, N) follows."""
    batch, outputs = size.shape
    cells = destination.shape[1]
    first_cell = torch.full_like(size, cells, dtype=torch.long).scatter_reduce(
        1, destination, torch.arange(cells, device=size.device).expand(batch, -1), "amin"
    )
    permutation = first_cell.argsort(dim=1)  # new slot -> old slot
    new_slot = torch.empty_like(permutation).scatter_(
        1, permutation, torch.arange(outputs, device=size.device).expand(batch, -1)
    )
    tokens = tokens.gather(1, permutation[..., None].expand(-1, -1, tokens.shape[2]))
    return tokens, size.gather(1, permutation), new_slot.gather(1, destination)


def merged_position_ids(
    input_ids: torch.Tensor, merged: MergedVideo, video_token_id: int
) -> torch.Tensor:
    """Qwen2.5-VL position ids (4, 1, L) for a prompt holding one merged video.

    input_ids: (L,) or (1, L) with exactly one run of merged.num_tokens video placeholders.
    Row 0 is the plain text position 0..L-1 (what generate() prepends, for mask creation);
    rows 1-3 the M-RoPE (temporal, height, width) positions: text before the video at
    0..k-1 on all three axes, the video at k + merged.positions, text after it from
    k + max(h, w) on (transformers 5.23 `get_rope_index`'s rule for the unmerged grid).
    """
    ids = input_ids[0] if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be (L,) or (1, L), got {describe(input_ids)}")
    video = (ids == video_token_id).nonzero().reshape(-1)
    count = merged.num_tokens
    if video.numel() != count or (count and int(video[-1] - video[0]) != count - 1):
        raise ValueError(
            f"input_ids must hold one run of {count} video placeholders (id {video_token_id}) "
            f"for {merged.grid[0]} frames x {merged.tokens_per_frame} tokens, "
            f"got {video.numel()} placeholders"
        )
    length = ids.shape[0]
    start, end = int(video[0]), int(video[0]) + count
    resume = start + max(merged.grid[1], merged.grid[2])
    text = torch.arange(length, device=ids.device)
    rope = torch.empty(3, length, dtype=torch.long, device=ids.device)
    rope[:, :start] = text[:start]
    rope[:, start:end] = merged.positions.to(ids.device) + start
    rope[:, end:] = text[: length - end] + resume
    return torch.cat([text[None], rope])[:, None, :]


def compressed_video_inputs(
    model,
    tokenizer,
    pixel_values_videos: torch.Tensor,
    video_grid_thw: torch.Tensor,
    question: str,
    *,
    tokens_per_frame: int = DEFAULT_TOKENS_PER_FRAME,
    order: str = "ascending",
    style: str = "standard",
    system: str | None = None,
    second_per_grid: float = 1,
) -> tuple[dict, MergedVideo]:
    """Model inputs for a question about one video whose frames were merged to
    `tokens_per_frame` tokens each after the vision tower (paper 002 §3.1).

    model: a `Qwen2_5_VLForConditionalGeneration` or a linvid student; pixel_values_videos
    (P, C) and video_grid_thw (1, 3) patch grid, e.g. from `linvid.models.qwen_video.
    video_to_patches`; style "standard" or "sandwich" (paper 001 §3.2.3); second_per_grid:
    seconds per temporal patch (Qwen's second_per_grid_ts: temporal_patch_size / sampled fps,
    as the processor gives it; 1 is transformers' default when none is passed).
    Runs the vision tower (under the caller's grad mode), merges, and returns (inputs,
    merged): inputs for `model(**inputs)` and `model.generate(**inputs)` with input_ids and
    attention_mask (1, L), mm_token_type_ids (1, L), position_ids (4, 1, L)
    (`merged_position_ids`), mm_encoder_outputs {"video": pooler_output (t*n, D)} and
    video_grid_thw (1, 3): the patch grid of merged.token_grid, which Qwen's forward ignores
    here (features and positions are given) and a student turns into its video layout.
    """
    config = model.config
    merge_size = config.vision_config.spatial_merge_size
    grid = video_grid_thw.reshape(-1)
    if grid.numel() != 3:
        raise ValueError(
            "video_grid_thw must describe one video (1, 3), "
            f"got shape {tuple(video_grid_thw.shape)}"
        )
    t, height, width = grid.tolist()
    if height % merge_size or width % merge_size:
        raise ValueError(
            f"video_grid_thw {(t, height, width)} must be divisible by the spatial merge size "
            f"{merge_size}"
        )
    device = model.device
    vision = model.get_video_features(
        pixel_values_videos.to(device, model.dtype), grid.view(1, 3).to(device), return_dict=True
    )
    merged = merge_video_tokens(
        vision.pooler_output[0],
        (t, height // merge_size, width // merge_size),
        tokens_per_frame,
        order,
        time_interval=config.vision_config.tokens_per_second * second_per_grid,
    )
    messages = video_messages(question, style=style, system=system)
    input_ids = torch.tensor([render_video_prompt(tokenizer, messages, merged.num_tokens)])
    input_ids = input_ids.to(device)
    layout = merged.token_grid
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": merged_position_ids(input_ids, merged, config.video_token_id),
        "mm_token_type_ids": (input_ids == config.video_token_id).int() * VIDEO_TYPE,
        "mm_encoder_outputs": {
            "video": BaseModelOutputWithPooling(pooler_output=(merged.features,))
        },
        "video_grid_thw": torch.tensor(
            [[layout[0], layout[1] * merge_size, layout[2] * merge_size]], device=device
        ),
        "second_per_grid_ts": torch.tensor([float(second_per_grid)], device=device),
    }
    return inputs, merged


def append_text_positions(position_ids: torch.Tensor, count: int) -> torch.Tensor:
    """Position ids (R, B, L) extended by `count` text tokens: every row continues from its
    last value + 1 (what generate() does for new tokens). Returns (R, B, L + count)."""
    check_positive_int("count", count, allow_zero=True)
    steps = torch.arange(1, count + 1, dtype=position_ids.dtype, device=position_ids.device)
    return torch.cat([position_ids, position_ids[..., -1:] + steps], dim=-1)


def merged_video_batch(
    model,
    inputs: dict,
    tokens_per_frame: int | None,
    keep_ratio: float | None = None,
    *,
    ignore_index: int = -100,
) -> dict:
    """`inputs` (right-padded, one video per sample, with pixel_values_videos or the vision
    tower's features as mm_encoder_outputs) with every frame
    merged to `tokens_per_frame` tokens, or to max(1, round(keep_ratio x its tokens)), after
    `model`'s vision tower (paper 002 §3.1; paper 001's keep ratio, here applied per frame
    after the tower; under the caller's grad mode), merged tokens in ascending size order
    (paper 001 §3.2.2): fewer video placeholders, labels and mm_token_type_ids cut alike,
    explicit M-RoPE position_ids (4, B, L) (`merged_position_ids`, temporal positions from
    the inputs' second_per_grid_ts (B,) when present), mm_encoder_outputs and a
    video_grid_thw of the merged layout. Returns new right-padded inputs with "labels" (and
    the inputs' second_per_grid_ts)."""
    config = model.config
    merge_size = config.vision_config.spatial_merge_size
    grids = inputs["video_grid_thw"]
    encoded = inputs.get("mm_encoder_outputs")
    if grids.shape[0] != inputs["input_ids"].shape[0] or (
        "pixel_values_videos" not in inputs and encoded is None
    ):
        raise ValueError(
            "per-frame ToMe needs exactly one video per sample, with its pixels or its "
            "vision-tower features (mm_encoder_outputs)"
        )
    if encoded is not None:
        vision = encoded["video"]
    else:
        vision = model.model.get_video_features(
            inputs["pixel_values_videos"].to(model.dtype), grids, return_dict=True
        )
    # Seconds per temporal patch of each video (Qwen's second_per_grid_ts); transformers' own
    # default is 1 when the inputs carry none.
    seconds = inputs.get("second_per_grid_ts")
    seconds = [1.0] * grids.shape[0] if seconds is None else seconds.reshape(-1).tolist()
    features, rows = [], {name: [] for name in ("input_ids", "labels", "mm_token_type_ids")}
    positions, layouts = [], []
    for i, (t, height, width) in enumerate(grids.tolist()):
        grid = (t, height // merge_size, width // merge_size)
        budget = tokens_per_frame or max(1, round(keep_ratio * grid[1] * grid[2]))
        interval = config.vision_config.tokens_per_second * seconds[i]
        merged = merge_video_tokens(vision.pooler_output[i], grid, budget, time_interval=interval)
        length = int(inputs["attention_mask"][i].sum())
        ids = inputs["input_ids"][i, :length]
        video = (ids == config.video_token_id).nonzero().reshape(-1)
        start, end = int(video[0]), int(video[-1]) + 1
        keep = merged.num_tokens
        for name in rows:
            row = inputs[name][i, :length]
            rows[name].append(torch.cat([row[:start], row[start : start + keep], row[end:]]))
        positions.append(merged_position_ids(rows["input_ids"][-1], merged, config.video_token_id))
        features.append(merged.features)
        layout = merged.token_grid
        layouts.append([layout[0], layout[1] * merge_size, layout[2] * merge_size])
    lengths = torch.tensor([len(row) for row in rows["input_ids"]])
    longest = int(lengths.max())

    def pad(tensors, value):
        return torch.stack(
            [torch.nn.functional.pad(t, (0, longest - t.shape[-1]), value=value) for t in tensors]
        )

    padded_positions = []
    for position in positions:  # padding continues each row's positions (masked anyway)
        steps = torch.arange(1, longest - position.shape[-1] + 1, device=position.device)
        padded_positions.append(torch.cat([position, position[..., -1:] + steps], dim=-1))
    device = inputs["input_ids"].device
    return {
        "input_ids": pad(rows["input_ids"], 0),  # padding: masked, any id does
        "attention_mask": (torch.arange(longest)[None, :] < lengths[:, None]).long().to(device),
        "labels": pad(rows["labels"], ignore_index),
        "mm_token_type_ids": pad(rows["mm_token_type_ids"], 0),
        "position_ids": torch.cat(padded_positions, dim=1),
        "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=tuple(features))},
        "video_grid_thw": torch.tensor(layouts, device=device),
        "second_per_grid_ts": torch.tensor(seconds, device=device),
    }
