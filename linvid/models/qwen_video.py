"""Frames to Qwen2.5-VL's video inputs in plain torch: the resize, normalisation and patch
layout of transformers' Qwen2-VL video processor, which needs torchvision (not a linvid
dependency). Used by `linvid ask`, the demo and the benchmarks.
"""

from __future__ import annotations

import math

import torch

from linvid.ops.validation import check_positive_int

# OpenAI CLIP statistics, Qwen2-VL's image_mean / image_std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen2-VL's video processor defaults: at least 128 and at most 768 merged tokens per frame.
MIN_PIXELS = 128 * 28 * 28
MAX_PIXELS = 768 * 28 * 28
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


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The (height, width) nearest to the input's with both divisible by `factor`, the aspect
    ratio kept as closely as possible and height * width within [min_pixels, max_pixels]
    (Qwen2-VL's rule)."""
    if min(height, width) < 1:
        raise ValueError(f"frame size must be positive, got height {height}, width {width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    resized_height = max(factor, round(height / factor) * factor)
    resized_width = max(factor, round(width / factor) * factor)
    if resized_height * resized_width > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        resized_height = max(factor, math.floor(height / shrink / factor) * factor)
        resized_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * grow / factor) * factor
        resized_width = math.ceil(width * grow / factor) * factor
    return resized_height, resized_width


def video_to_patches(
    frames: torch.Tensor,
    vision_config,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    resize: bool = True,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL `pixel_values_videos` and `video_grid_thw` for one video.

    frames: (T, 3, H, W) uint8 (or float in [0, 1]). vision_config: the model's vision config
    (patch_size, temporal_patch_size, spatial_merge_size). Frames are resized (bicubic,
    antialiased) to smart_resize's size, scaled to [0, 1], normalised with `mean` and `std`
    (CLIP's by default; a model's own: `pixel_statistics(config)`), the last frame repeated to
    a multiple of the temporal patch, and flattened in the processor's patch order. Returns
    (pixel values (t*h*w, 3*tp*p*p) float32, grid (1, 3) long = [t, h, w] in patches).
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
    video = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    height, width = video.shape[-2:]
    factor = patch * merge
    if resize:
        height, width = smart_resize(height, width, factor, min_pixels, max_pixels)
        if (height, width) != tuple(video.shape[-2:]):
            video = torch.nn.functional.interpolate(
                video, size=(height, width), mode="bicubic", antialias=True, align_corners=False
            ).clamp(0.0, 1.0)
    elif height % factor or width % factor:
        raise ValueError(
            f"frame size {height}x{width} must be divisible by {factor} when resize=False"
        )
    video = (video - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
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
