"""Qwen2.5-VL's frame sampling and frame sizing, as qwen-vl-utils does them.

A Qwen2.5-VL user prepares a video with qwen-vl-utils (`process_vision_info`, which calls
`fetch_video`) and then HF's `Qwen2_5_VLProcessor`. qwen-vl-utils picks the frames and resizes
them; the processor then only normalises and patchifies, because the frames already have a size
its own resize keeps. This module states those rules in plain python/torch so that linvid's
reader (`linvid.video.io`, sampling="qwen") and `linvid.models.qwen_video.video_to_patches`
give the model what it was trained with:

- which frames: `frame_range` (a [video_start, video_end] window, as qwen-vl-utils'
  `calculate_video_frame_range`), `smart_nframes` (how many: an even count, at least 4 with
  `fps`), `frame_indices` (`torch.linspace(first, last, count).round()`, first and last frame
  of the window included);
- the sampled frame rate the model's time axis uses: `sample_fps`, and `second_per_grid`
  (seconds per temporal patch, the processor's `second_per_grid_ts`);
- the size: `frame_pixel_budget` (each frame's share of the total pixel budget),
  `smart_resize` (qwen-vl-utils' rule; `processor_smart_resize` is HF's, see there for the
  difference) and `frame_size` (both together);
- the pixels: `resize_frames`, torchvision's uint8 bicubic antialiased resize, bit for bit.

The reference code is qwen-vl-utils 0.0.14 (`qwen_vl_utils/vision_process.py`) and
transformers' Qwen2-VL video processor (`models/qwen2_vl/video_processing_qwen2_vl.py`); the
rules are reimplemented here, not copied. Where qwen-vl-utils reads a file it uses decord or
torchcodec (frame by decode index over the container's frame count and average rate); its
torchvision reader (read_video, gone from torchvision 0.29) sampled by timestamp instead and is
not what this module follows.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

# qwen-vl-utils' constants (vision_process.py).
FRAME_FACTOR = 2  # frame counts are multiples of this (= the temporal patch size)
DEFAULT_FPS = 2.0  # frames per second sampled when neither fps nor a frame count is given
FPS_MIN_FRAMES = 4  # at least this many frames with fps sampling
FPS_MAX_FRAMES = 768  # at most this many frames with fps sampling
SPATIAL_FACTOR = 28  # patch size 14 x spatial merge 2: frame sides are multiples of this
VIDEO_MIN_PIXELS = 128 * 28 * 28  # each frame has at least 128 merged tokens' worth of pixels
VIDEO_MAX_PIXELS = 768 * 28 * 28  # ... and at most 768
MODEL_SEQ_LEN = 128000  # qwen-vl-utils' default MODEL_SEQ_LEN (an environment variable there)
# All frames of a video together: 90% of the model's context in pixels (before the temporal
# merge, hence the FRAME_FACTOR in frame_pixel_budget).
VIDEO_TOTAL_PIXELS = MODEL_SEQ_LEN * 28 * 28 * 0.9
MAX_ASPECT_RATIO = 200


class QwenSampling(NamedTuple):
    """What qwen-vl-utils takes from one video: frame_indices (decode indices into the whole
    video, sorted, distinct), first and last (the window's first and last frame index,
    inclusive), sample_fps (sampled frames per second, qwen's definition), second_per_grid
    (seconds per temporal patch of FRAME_FACTOR frames) and size ((height, width) every frame
    is resized to)."""

    frame_indices: list[int]
    first: int
    last: int
    sample_fps: float
    second_per_grid: float
    size: tuple[int, int]


def frame_range(
    total_frames: int,
    video_fps: float,
    *,
    start: float | None = None,
    end: float | None = None,
) -> tuple[int, int]:
    """The (first, last) frame indices, inclusive, of the window [start, end] seconds.

    Reproduces qwen-vl-utils' `calculate_video_frame_range`: times are clamped to
    [0, total_frames / video_fps]; first = ceil(start * fps), last = floor(end * fps) capped at
    the last frame; no start/end: the whole video. total_frames / video_fps: the container's
    frame count and average rate. Raises ValueError when the window holds fewer than two
    frames (first >= last), as qwen-vl-utils does.
    """
    _check_count("total_frames", total_frames)
    _check_positive("video_fps", video_fps)
    for name, value in (("start", start), ("end", end)):
        if value is not None and not _is_real(value):
            raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = 0 if start is None else math.ceil(min(max(start, 0.0), duration) * video_fps)
    last = total_frames - 1
    if end is not None:
        last = min(math.floor(min(max(end, 0.0), duration) * video_fps), total_frames - 1)
    if first >= last:
        raise ValueError(
            f"start={start!r} and end={end!r} leave frames {first}..{last}: the window must hold "
            f"at least two frames of the video ({total_frames} frames at {video_fps:g} fps)"
        )
    return first, last


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
) -> int:
    """How many frames qwen-vl-utils samples from `total_frames` frames at `video_fps`.

    Reproduces qwen-vl-utils' `smart_nframes`. num_frames: that count rounded to a multiple of
    FRAME_FACTOR (half to even, as python's round); otherwise fps (default DEFAULT_FPS) frames
    per second of the span, at least min_frames (default FPS_MIN_FRAMES, rounded up to even),
    at most max_frames (default min(FPS_MAX_FRAMES, total_frames), rounded down to even) and
    total_frames, rounded down to even. min_frames and max_frames only apply with fps.
    Raises ValueError unless FRAME_FACTOR <= result <= total_frames (e.g. a 1-frame video).
    """
    if fps is not None and num_frames is not None:
        raise ValueError(
            f"give fps or num_frames, not both; got fps={fps!r} and num_frames={num_frames!r}"
        )
    _check_count("total_frames", total_frames)
    _check_positive("video_fps", video_fps)
    if num_frames is not None:
        _check_count("num_frames", num_frames)
        count = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = DEFAULT_FPS if fps is None else fps
        _check_positive("fps", fps)
        for name, value in (("min_frames", min_frames), ("max_frames", max_frames)):
            if value is not None:
                _check_count(name, value)
        lowest = _multiple_up(FPS_MIN_FRAMES if min_frames is None else min_frames)
        highest = _multiple_down(
            min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames
        )
        wanted = total_frames / video_fps * fps  # same operation order as qwen-vl-utils
        count = _multiple_down(min(max(wanted, lowest), highest, total_frames))
    if not FRAME_FACTOR <= count <= total_frames:
        raise ValueError(
            f"Qwen sampling takes {count} frames here, but it needs between {FRAME_FACTOR} and "
            f"the {total_frames} frames available (fps={fps!r}, num_frames={num_frames!r})"
        )
    return count


def frame_indices(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """The decode indices qwen-vl-utils reads: `smart_nframes` of the window's frames, spread
    by `torch.linspace(first, last, count).round()` over the `frame_range` window (both ends
    included). Reproduces the index line of qwen-vl-utils' decord and torchcodec readers.
    Arguments as in `frame_range` and `smart_nframes`; returns a sorted list of ints."""
    first, last = frame_range(total_frames, video_fps, start=start, end=end)
    count = smart_nframes(
        last - first + 1,
        video_fps,
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
    )
    return _linspace_indices(first, last, count)


def _linspace_indices(first: int, last: int, count: int) -> list[int]:
    # float32 (torch's default dtype, which qwen-vl-utils leaves in place) and torch's round
    # (half to even): the same indices as qwen-vl-utils, ties included.
    spread = torch.linspace(first, last, count, dtype=torch.float32)
    return spread.round().long().tolist()


def sample_fps(num_sampled: int, span_frames: int, video_fps: float) -> float:
    """Sampled frames per second: num_sampled / span_frames * video_fps, where span_frames is
    the number of frames in the sampled window. Reproduces qwen-vl-utils' `sample_fps` (also
    HF's `VideoMetadata.sampled_fps` with frames_indices, total_num_frames and fps)."""
    _check_count("num_sampled", num_sampled)
    _check_count("span_frames", span_frames)
    _check_positive("video_fps", video_fps)
    return num_sampled / span_frames * video_fps


def second_per_grid(sampled_fps: float, temporal_patch_size: int = FRAME_FACTOR) -> float:
    """Seconds one temporal patch spans: temporal_patch_size / sampled_fps. Reproduces
    `second_per_grid_ts` of HF's `Qwen2_5_VLProcessor._process_videos`."""
    _check_positive("sampled_fps", sampled_fps)
    _check_count("temporal_patch_size", temporal_patch_size)
    return temporal_patch_size / sampled_fps


def frame_pixel_budget(
    num_frames: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: float | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> float:
    """The most pixels one frame of a `num_frames`-frame video may keep.

    Reproduces `fetch_video`'s per-frame max_pixels: an even share of total_pixels per
    FRAME_FACTOR frames, at most VIDEO_MAX_PIXELS, at least int(1.05 * min_pixels); a given
    max_pixels (qwen-vl-utils' per-video "max_pixels") only lowers it. May be a float, as
    there. Raises ValueError when the result is below min_pixels (max_pixels < min_pixels).
    """
    _check_count("num_frames", num_frames)
    _check_pixels("min_pixels", min_pixels, allow_zero=True)
    _check_positive("total_pixels", total_pixels)
    budget = max(
        min(VIDEO_MAX_PIXELS, total_pixels / num_frames * FRAME_FACTOR), int(min_pixels * 1.05)
    )
    if max_pixels is not None:
        _check_positive("max_pixels", max_pixels)
        budget = min(max_pixels, budget)
    if budget < min_pixels:
        raise ValueError(
            f"max_pixels={max_pixels!r} is below min_pixels={min_pixels!r}: "
            "each frame could not hold min_pixels"
        )
    return budget


def smart_resize(
    height: int,
    width: int,
    factor: int = SPATIAL_FACTOR,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """The (height, width) a (height, width) frame is resized to: both sides multiples of
    `factor`, the aspect ratio kept as closely as possible, height * width within
    [min_pixels, max_pixels].

    Reproduces qwen-vl-utils' `smart_resize`, whose result the Qwen pipeline uses: each side
    rounded to the nearest multiple of factor, but never below factor; if that is too large,
    both sides scaled by sqrt(area / max_pixels) and floored to multiples; if too small,
    scaled by sqrt(min_pixels / area) and ceiled. One deliberate difference: where the
    shrinking branch would floor a side to 0 (a frame thinner than factor after scaling; the
    pipeline's resize then fails) this keeps factor, as HF's function does.

    HF's `smart_resize` (`processor_smart_resize`) differs on sides of at most factor / 2
    (14 px): it rounds them to 0 where this rounds them up to factor, so its area test takes
    the growing branch (or keeps the 0 side when min_pixels is 0). The two agree when this
    function grows the frame too, which is always the case for min_pixels above 78400
    (100 tokens; a 14 px side with the aspect ratio at most 200 rounds to at most 28 x 2800),
    so always with the video default VIDEO_MIN_PIXELS; e.g. (10, 60) with min_pixels 1568 is
    (28, 56) here and (28, 112) there. The pipeline follows this function: qwen-vl-utils
    resizes first, and the processor's smart_resize then sees a size that already fits.
    Raises ValueError for sides < 1, an aspect ratio above 200 or min_pixels > max_pixels.
    """
    _check_frame_size(height, width, factor, min_pixels, max_pixels)
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * grow / factor) * factor
        new_width = math.ceil(width * grow / factor) * factor
    return new_height, new_width


def processor_smart_resize(
    height: int,
    width: int,
    factor: int = SPATIAL_FACTOR,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """The size HF's Qwen2-VL video processor resizes a (height, width) frame to.

    Reproduces transformers' `smart_resize` (models/qwen2_vl/video_processing_qwen2_vl.py):
    as `smart_resize`, but a side of at most factor / 2 rounds to 0 (so its area test may take
    the growing branch, or keep a 0 side when min_pixels is 0). On a size `smart_resize`
    produced it returns that size whenever the size lies within [min_pixels, max_pixels],
    which is why the processor's resize is a no-op in the Qwen pipeline.
    """
    _check_frame_size(height, width, factor, min_pixels, max_pixels)
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * grow / factor) * factor
        new_width = math.ceil(width * grow / factor) * factor
    return new_height, new_width


def frame_size(
    height: int,
    width: int,
    num_frames: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: float | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
    factor: int = SPATIAL_FACTOR,
) -> tuple[int, int]:
    """The (height, width) every frame of a `num_frames`-frame video of (height, width)
    frames ends up at in the Qwen pipeline: `smart_resize` within
    [min_pixels, `frame_pixel_budget`]. Reproduces `fetch_video`'s resize target."""
    budget = frame_pixel_budget(
        num_frames, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels
    )
    return smart_resize(height, width, factor, min_pixels, budget)


def plan_sampling(
    total_frames: int,
    video_fps: float,
    height: int,
    width: int,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: float | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> QwenSampling:
    """Everything qwen-vl-utils' `fetch_video` decides for one video file before decoding it:
    which frames (`frame_indices`), at what rate (`sample_fps`, `second_per_grid`) and at what
    size (`frame_size`). total_frames, video_fps: the container's frame count and average rate;
    height, width: the stored frame size; the rest as qwen-vl-utils' per-video keys (fps,
    nframes, min_frames, max_frames, video_start, video_end, min_pixels, max_pixels,
    total_pixels)."""
    first, last = frame_range(total_frames, video_fps, start=start, end=end)
    span = last - first + 1
    count = smart_nframes(
        span,
        video_fps,
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
    )
    rate = sample_fps(count, span, video_fps)
    size = frame_size(
        height,
        width,
        count,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
    )
    return QwenSampling(
        frame_indices=_linspace_indices(first, last, count),
        first=first,
        last=last,
        sample_fps=rate,
        second_per_grid=second_per_grid(rate),
        size=size,
    )


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Frames resized as qwen-vl-utils resizes them: bicubic, antialiased, on uint8 input.

    frames: (..., 3, H, W) uint8 (one frame or a (T, 3, H, W) video; every frame is resized on
    its own, which gives the same values as resizing the stack). size: (height, width).
    Returns (..., 3, height, width) uint8; the input itself when the size is unchanged.
    Bit-identical to `torchvision.transforms.functional.resize(frames, size,
    InterpolationMode.BICUBIC, antialias=True)` on a uint8 tensor, which computes in float32,
    clamps to [0, 255] and rounds (half to even); torchvision's v2 resize would instead take
    its native uint8 kernel, whose rounding differs, so this is spelled out in torch.
    """
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim < 3:
        description = (
            f"{tuple(frames.shape)} {frames.dtype}" if isinstance(frames, torch.Tensor) else frames
        )
        raise ValueError(f"frames must be a (..., 3, H, W) uint8 tensor, got {description}")
    height, width = size
    for name, value in (("height", height), ("width", width)):
        _check_count(f"size {name}", value)
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    channels, old_height, old_width = frames.shape[-3:]
    flat = frames.reshape(-1, channels, old_height, old_width)
    resized = torch.nn.functional.interpolate(
        flat.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    resized = resized.clamp_(0, 255).round_().to(torch.uint8)
    return resized.reshape(*frames.shape[:-2], height, width)


# ---------------------------------------------------------------------------------------------
# Argument checks


def _multiple_up(value: float) -> int:
    return math.ceil(value / FRAME_FACTOR) * FRAME_FACTOR


def _multiple_down(value: float) -> int:
    return math.floor(value / FRAME_FACTOR) * FRAME_FACTOR


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_positive(name: str, value) -> None:
    if not (_is_real(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_pixels(name: str, value, allow_zero: bool = False) -> None:
    if not _is_real(value) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number of pixels {bound}, got {value!r}")


def _check_frame_size(height, width, factor, min_pixels, max_pixels) -> None:
    for name, value in (("height", height), ("width", width), ("factor", factor)):
        _check_count(name, value)
    _check_pixels("min_pixels", min_pixels, allow_zero=True)
    _check_pixels("max_pixels", max_pixels)
    if min_pixels > max_pixels:
        raise ValueError(
            f"min_pixels must be at most max_pixels, got min_pixels={min_pixels!r} and "
            f"max_pixels={max_pixels!r}"
        )
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {height}x{width} "
            f"({max(height, width) / min(height, width):.1f})"
        )
