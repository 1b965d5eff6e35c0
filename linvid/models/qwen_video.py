"""Frames to Qwen2.5-VL's video inputs in plain torch: the resize of qwen-vl-utils and the
normalisation and patch layout of transformers' Qwen2-VL video processor, without building a
processor. Used by `linvid ask`, the demo and the benchmarks.

The frame sampling and sizing rules live in `linvid.video.qwen_sampling` (below the models
package); `smart_resize` is re-exported here for existing callers.
"""

from __future__ import annotations

import torch

from linvid.ops.validation import check_positive_int
from linvid.video.qwen_sampling import frame_pixel_budget, resize_frames, smart_resize

# OpenAI CLIP statistics, Qwen2-VL's image_mean / image_std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen2-VL's video processor defaults: at least 128 and at most 768 merged tokens per frame
# (qwen_sampling.VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS).
MIN_PIXELS = 128 * 28 * 28
MAX_PIXELS = 768 * 28 * 28
# The processor rescales by 1/255 and normalises in one step, with mean and std times 255.
RESCALE = 255.0
# Mean and std that map [0, 1] to [-1, 1] (models trained from scratch here, the demo teacher).
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)
# Config attribute naming a model's pixel statistics when they are not CLIP's.
PIXEL_STATISTICS_KEY = "video_pixel_statistics"


def pixel_statistics(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a model's video pixels are normalised with: the config's
    `video_pixel_statistics` {"mean": [...], "std": [...]} if set (models trained here),
    else CLIP's (real Qwen2.5-VL checkpoints)."""
    statistics = getattr(config, PIXEL_STATISTICS_KEY, None)
    if not statistics:
        return CLIP_MEAN, CLIP_STD
    return tuple(statistics["mean"]), tuple(statistics["std"])


def video_to_patches(
    frames: torch.Tensor,
    vision_config,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int | None = None,
    resize: bool = True,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL `pixel_values_videos` and `video_grid_thw` for one video.

    frames: (T, 3, H, W) uint8 (or float in [0, 1]). vision_config: the model's vision config
    (patch_size, temporal_patch_size, spatial_merge_size). With resize, frames go to
    `smart_resize`'s size within [min_pixels, max_pixels]; max_pixels None is qwen-vl-utils'
    per-frame budget for T frames (`frame_pixel_budget`: 768 * 28 * 28 up to 300 frames,
    less beyond). uint8 frames are resized as qwen-vl-utils does it (`resize_frames`: bicubic,
    antialiased, rounded back to uint8) and then normalised as HF's processor does
    ((x - 255 * mean) / (255 * std) in float32), so frames from the Qwen pipeline, or the raw
    uint8 frames it started from, give the processor's values; float frames are resized in
    float (bicubic, antialiased, clamped to [0, 1]) and normalised as (x - mean) / std.
    (The processor keeps frames whose size already lies within its own pixel bounds, which
    qwen-vl-utils' defaults guarantee; frames qwen-vl-utils sized below the processor's
    min_pixels would be resized a second time there, in float, which this does not repeat.)
    `mean` and `std` are CLIP's by default (a model's own: `pixel_statistics(config)`). The
    last frame is repeated to a multiple of the temporal patch, and the patches flattened in
    the processor's order. Returns (pixel values (t*h*w, 3*tp*p*p) float32, grid (1, 3) long
    = [t, h, w] in patches).
    """
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames)
        raise ValueError(f"frames must be a (T, 3, H, W) tensor, got {shape}")
    if frames.shape[0] == 0:
        raise ValueError("frames has no frames (T = 0)")
    patch = vision_config.patch_size
    temporal = vision_config.temporal_patch_size
    merge = vision_config.spatial_merge_size
    for name, value in (("patch_size", patch), ("temporal_patch_size", temporal)):
        check_positive_int(f"vision_config.{name}", value)
    height, width = frames.shape[-2:]
    factor = patch * merge
    if resize:
        if max_pixels is None:
            max_pixels = frame_pixel_budget(frames.shape[0], min_pixels=min_pixels)
        height, width = smart_resize(height, width, factor, min_pixels, max_pixels)
    elif height % factor or width % factor:
        raise ValueError(
            f"frame size {height}x{width} must be divisible by {factor} when resize=False"
        )
    if frames.dtype == torch.uint8:
        video = resize_frames(frames, (height, width)).float()
        scale = RESCALE
    else:
        video = frames.float()
        if (height, width) != tuple(video.shape[-2:]):
            video = torch.nn.functional.interpolate(
                video, size=(height, width), mode="bicubic", antialias=True, align_corners=False
            ).clamp(0.0, 1.0)
        scale = 1.0
    # float32 statistics times the scale, subtracted then divided: the processor's arithmetic.
    mean = (torch.tensor(mean, dtype=torch.float32) * scale).view(1, 3, 1, 1)
    std = (torch.tensor(std, dtype=torch.float32) * scale).view(1, 3, 1, 1)
    video = (video - mean) / std
    if padding := -video.shape[0] % temporal:
        video = torch.cat([video, video[-1:].expand(padding, -1, -1, -1)])
    grid_t, grid_h, grid_w = video.shape[0] // temporal, height // patch, width // patch
    patches = video.view(
        grid_t, temporal, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    )
    # Merge windows are contiguous: (t, h-block, w-block, h-in-block, w-in-block) rows, each row
    # (channel, temporal, patch y, patch x), as the processor lays them out.
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(grid_t * grid_h * grid_w, 3 * temporal * patch * patch)
    return pixel_values, torch.tensor([[grid_t, grid_h, grid_w]])


def video_token_count(grid: torch.Tensor, merge_size: int) -> int:
    """LLM tokens of one video with patch grid (t, h, w): t * h * w / merge_size^2."""
    t, h, w = (int(value) for value in grid.reshape(-1)[:3])
    return t * h * w // (merge_size * merge_size)


# qwen-vl-utils' `sample_fps` for a video given as a list of frames (no source timing): 2, so
# such a video's second_per_grid_ts is 1, transformers' own default when none is passed.
FRAME_LIST_FPS = 2.0


def video_inputs(
    frames: torch.Tensor,
    vision_config,
    *,
    sample_fps: float = FRAME_LIST_FPS,
    statistics: tuple[tuple[float, ...], tuple[float, ...]] = (CLIP_MEAN, CLIP_STD),
    processor=None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int | None = None,
    resize: bool = True,
) -> dict[str, torch.Tensor]:
    """The video inputs Qwen's processor returns for one video: the one function every linvid
    caller (ask, distill data, option scoring, the demo) builds video inputs with.

    frames: (T, 3, H, W) uint8 shown at `sample_fps` frames per second (`load_video`'s
    meta["sample_fps"] for a file). vision_config: the model's (patch, temporal patch, merge).
    processor: a checkpoint's Qwen2.5-VL processor: its video processor computes the pixels,
    called as a user calls it (the frames' metadata, no frame sampling, `min_pixels` /
    `max_pixels` as its size); without one, `video_to_patches` with `statistics` (mean, std;
    `pixel_statistics(config)`) gives the same pixels (within 1e-5; tests/video, tests/eval).
    Returns {"pixel_values_videos": (t*h*w, C) float32, "video_grid_thw": (1, 3) long,
    "second_per_grid_ts": (1,) float32 = temporal_patch_size / sample_fps}.
    """
    if (
        isinstance(sample_fps, bool)
        or not isinstance(sample_fps, int | float)
        or not (sample_fps > 0)
    ):
        raise ValueError(f"sample_fps must be > 0 (frames per second), got {sample_fps!r}")
    if processor is not None:
        size = dict(processor.video_processor.size)
        size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        processed = processor.video_processor(
            videos=[frames],
            video_metadata=[frame_list_metadata(frames.shape[0], sample_fps)],
            do_sample_frames=False,
            do_resize=resize,
            size=size,
            return_tensors="pt",
        )
        pixels, grid = processed["pixel_values_videos"], processed["video_grid_thw"]
    else:
        mean, std = statistics
        pixels, grid = video_to_patches(
            frames,
            vision_config,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            resize=resize,
            mean=mean,
            std=std,
        )
    seconds = vision_config.temporal_patch_size / float(sample_fps)
    return {
        "pixel_values_videos": pixels,
        "video_grid_thw": grid,
        "second_per_grid_ts": torch.tensor([seconds], dtype=torch.float32),
    }


def frame_list_metadata(count: int, sample_fps: float) -> dict:
    """transformers' VideoMetadata for `count` frames already sampled at `sample_fps`: its
    `sampled_fps`, which Qwen's processor turns into second_per_grid_ts, is sample_fps.
    Frames given without metadata are taken as 24 fps by transformers 5.23 / 5.24."""
    return {
        "total_num_frames": count,
        "fps": float(sample_fps),
        "frames_indices": list(range(count)),
    }
