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

Images. An image is a one-temporal-patch grid (1, h, w): `merged_video_batch` merges it like
one frame (paper 001 Table 1 and Appendix setting B keep 10% of a single image's tokens too)
and places it by the same rule with Qwen's image timing (time interval 1: its temporal
position is its start). A sample may hold images, videos or both, in placeholder order;
`FrameBudget` says how many tokens each frame or image keeps, and the data loader counts a
merging stage's sequence lengths with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from linvid.eval.prompts import render_video_prompt, video_messages
from linvid.ops.tome import ORDERS, TokenMerge, bipartite_soft_matching
from linvid.ops.validation import check_positive_int, check_tensor, describe

DEFAULT_TOKENS_PER_FRAME = 16  # paper 002 §4 implementation details
IMAGE_TYPE, VIDEO_TYPE = 1, 2  # Qwen2.5-VL's mm_token_type_ids for image and video tokens
# Per modality: (mm_encoder_outputs key, pixel input, grid input).
MODALITIES = {
    IMAGE_TYPE: ("image", "pixel_values", "image_grid_thw"),
    VIDEO_TYPE: ("video", "pixel_values_videos", "video_grid_thw"),
}


@dataclass(frozen=True)
class FrameBudget:
    """How many tokens per-frame ToMe leaves of each frame of a video and of each image:
    `tokens_per_frame` (paper 002 §3.1) when given, else max(1, round(keep_ratio x its
    tokens)) (paper 001 §3.2.2 and Table 1; Appendix setting B: single images too); never
    more than the frame has. tokens_per_frame wins when both are given."""

    tokens_per_frame: int | None = None
    keep_ratio: float | None = None

    def __post_init__(self):
        if self.tokens_per_frame is not None:
            check_positive_int("tokens_per_frame", self.tokens_per_frame)
            return
        ratio = self.keep_ratio
        if ratio is None:
            raise ValueError("per-frame ToMe needs tokens_per_frame or keep_ratio, got neither")
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 < ratio <= 1:
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {ratio!r}")

    def frame_tokens(self, cells: int) -> int:
        """Tokens kept of one frame (or image) of `cells` tokens."""
        if self.tokens_per_frame is not None:
            return min(self.tokens_per_frame, cells)
        return min(cells, max(1, round(self.keep_ratio * cells)))

    def count(self, grid_thw, spatial_merge_size: int) -> int:
        """LLM tokens of one video or image with patch grid (t, h, w) (3 ints, or a tensor
        of 3) after the merge: t x frame_tokens(h/m x w/m), m the spatial merge size; exactly
        the placeholders `merged_video_batch` leaves for it."""
        t, height, width = _checked_grid(grid_thw)
        return t * self.frame_tokens((height // spatial_merge_size) * (width // spatial_merge_size))


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
    return sequence_position_ids(ids.shape[0], [(int(video[0]), merged)], ids.device)


def sequence_position_ids(
    length: int, runs: Sequence[tuple[int, MergedVideo]], device=None
) -> torch.Tensor:
    """Qwen2.5-VL position ids (4, 1, length) of one sequence holding merged videos and
    images: `runs` lists (index of its first placeholder, its MergedVideo) in sequence order.

    transformers 5.23 `get_rope_index`'s rule with the merged tokens: row 0 the plain text
    position 0..length-1; rows 1-3 count text on all three axes; a video or image starting at
    running position p takes p + its merged positions; text after it resumes at p + max(h, w)
    of its unmerged LLM grid.
    """
    text = torch.arange(length, device=device)
    rope = torch.empty(3, length, dtype=torch.long, device=device)
    cursor, position = 0, 0  # next sequence index, next text position
    for start, merged in runs:
        rope[:, cursor:start] = text[: start - cursor] + position
        position += start - cursor
        cursor = start + merged.num_tokens
        rope[:, start:cursor] = merged.positions.to(device) + position
        position += max(merged.grid[1], merged.grid[2])
    rope[:, cursor:] = text[: length - cursor] + position
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
    """`inputs` (right-padded; each sample with any number of images and videos, in
    placeholder order; with pixel_values / pixel_values_videos or the vision tower's features
    as mm_encoder_outputs) with every video frame and every image merged after `model`'s
    vision tower (paper 002 §3.1; paper 001's keep ratio, here applied per frame after the
    tower, single images included as in its Appendix setting B; under the caller's grad mode)
    to `FrameBudget(tokens_per_frame, keep_ratio)` tokens, merged tokens in ascending size
    order (paper 001 §3.2.2). An image is merged as a one-temporal-patch grid.

    The result has fewer placeholders (input_ids, labels and mm_token_type_ids cut alike),
    explicit M-RoPE position_ids (4, B, L) (`sequence_position_ids`: videos' temporal
    positions from the inputs' second_per_grid_ts (V,) when present, images' with interval 1
    as Qwen's), mm_encoder_outputs {"image": ..., "video": ...} of the merged features and
    image_grid_thw / video_grid_thw of the merged layouts (`MergedVideo.token_grid` as patch
    grids), each modality only when the inputs have it. With a budget at or above every
    frame's tokens nothing changes but the explicit positions, which equal Qwen's. Returns
    new right-padded inputs with "labels" (and second_per_grid_ts when there are videos)."""
    config = model.config
    merge_size = config.vision_config.spatial_merge_size
    budget = FrameBudget(tokens_per_frame, keep_ratio)
    features = _vision_features(model, inputs)  # kind -> per image / video (N_i, D)
    grids = {kind: inputs[MODALITIES[kind][2]].tolist() for kind in features}
    # Seconds per temporal patch of each video (Qwen's second_per_grid_ts); transformers' own
    # default is 1 when the inputs carry none.
    seconds = inputs.get("second_per_grid_ts")
    if VIDEO_TYPE in grids:
        videos = len(grids[VIDEO_TYPE])
        seconds = [1.0] * videos if seconds is None else seconds.reshape(-1).tolist()
    used = dict.fromkeys(features, 0)  # images / videos merged so far, in batch order
    merged_features = {kind: [] for kind in features}
    layouts = {kind: [] for kind in features}
    rows = {name: [] for name in ("input_ids", "labels", "mm_token_type_ids")}
    positions = []
    for i in range(inputs["input_ids"].shape[0]):
        length = int(inputs["attention_mask"][i].sum())
        types = inputs["mm_token_type_ids"][i, :length].tolist()
        kept, runs = [], []  # kept indices of the row; (new start, MergedVideo) per run
        cursor = 0
        while cursor < length:
            kind = types[cursor]
            if kind == 0:
                kept.append(cursor)
                cursor += 1
                continue
            if kind not in MODALITIES:
                raise ValueError(
                    f"sample {i}: mm_token_type_ids holds {kind} at position {cursor}; "
                    "expected 0 (text), 1 (image) or 2 (video)"
                )
            index = used.get(kind, 0)
            if index >= len(grids.get(kind, ())):
                raise ValueError(
                    f"sample {i} has more {MODALITIES[kind][0]} placeholder runs than rows in "
                    f"{MODALITIES[kind][2]} ({len(grids.get(kind, ()))} in the batch)"
                )
            t, height, width = grids[kind][index]
            grid = (t, height // merge_size, width // merge_size)
            size = grid[0] * grid[1] * grid[2]
            if types[cursor : cursor + size] != [kind] * size:
                raise ValueError(
                    f"sample {i}: expected {size} consecutive {MODALITIES[kind][0]} tokens for "
                    f"grid {(t, height, width)} at position {cursor}"
                )
            # Qwen2.5-VL spaces video frames by tokens_per_second x second_per_grid; an
            # image has no temporal spacing (get_rope_index's interval 1).
            interval = 1
            if kind == VIDEO_TYPE:
                interval = config.vision_config.tokens_per_second * seconds[index]
            merged = merge_video_tokens(
                features[kind][index],
                grid,
                budget.frame_tokens(grid[1] * grid[2]),
                time_interval=interval,
            )
            runs.append((len(kept), merged))
            kept.extend(range(cursor, cursor + merged.num_tokens))
            merged_features[kind].append(merged.features)
            layout = merged.token_grid
            layouts[kind].append([layout[0], layout[1] * merge_size, layout[2] * merge_size])
            used[kind] = index + 1
            cursor += size
        kept = torch.tensor(kept, dtype=torch.long, device=inputs["input_ids"].device)
        for name in rows:
            rows[name].append(inputs[name][i, :length][kept])
        positions.append(sequence_position_ids(len(kept), runs, inputs["input_ids"].device))
    for kind, grid_rows in grids.items():
        if used[kind] != len(grid_rows):
            raise ValueError(
                f"the batch has {len(grid_rows)} {MODALITIES[kind][0]}s in "
                f"{MODALITIES[kind][2]} but {used[kind]} runs of their placeholders"
            )
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
    result = {
        "input_ids": pad(rows["input_ids"], 0),  # padding: masked, any id does
        "attention_mask": (torch.arange(longest)[None, :] < lengths[:, None]).long().to(device),
        "labels": pad(rows["labels"], ignore_index),
        "mm_token_type_ids": pad(rows["mm_token_type_ids"], 0),
        "position_ids": torch.cat(padded_positions, dim=1),
        "mm_encoder_outputs": {},
    }
    for kind in features:
        key, _, grid_key = MODALITIES[kind]
        pooled = tuple(merged_features[kind])
        result["mm_encoder_outputs"][key] = BaseModelOutputWithPooling(pooler_output=pooled)
        result[grid_key] = torch.tensor(layouts[kind], device=device)
    if VIDEO_TYPE in features:
        result["second_per_grid_ts"] = torch.tensor(seconds, device=device)
    return result


def _vision_features(model, inputs: dict) -> dict[int, Sequence[torch.Tensor]]:
    """Per modality the inputs have a grid for (IMAGE_TYPE / VIDEO_TYPE): the vision tower's
    merged-patch outputs of each image or video in batch order, (N_i, D) each, from
    mm_encoder_outputs when given, else computed from the pixels (under the caller's grad
    mode)."""
    encoded = inputs.get("mm_encoder_outputs") or {}
    features = {}
    for kind, (key, pixel_key, grid_key) in MODALITIES.items():
        grids = inputs.get(grid_key)
        if grids is None:
            continue
        if encoded.get(key) is not None:
            outputs = encoded[key].pooler_output
        elif inputs.get(pixel_key) is not None:
            compute = model.model.get_image_features
            if kind == VIDEO_TYPE:
                compute = model.model.get_video_features
            pixels = inputs[pixel_key].to(model.dtype)
            outputs = compute(pixels, grids, return_dict=True).pooler_output
        else:
            raise ValueError(
                f"per-frame ToMe needs the {key}s' pixels ({pixel_key}) or their vision-tower "
                f"features (mm_encoder_outputs[{key!r}]); the inputs have {grid_key} only"
            )
        if len(outputs) != grids.shape[0]:
            raise ValueError(
                f"mm_encoder_outputs[{key!r}] holds {len(outputs)} {key}s, {grid_key} "
                f"{grids.shape[0]}"
            )
        features[kind] = outputs
    if not features:
        raise ValueError(
            "per-frame ToMe needs images or videos: the inputs have neither image_grid_thw "
            "nor video_grid_thw"
        )
    return features
