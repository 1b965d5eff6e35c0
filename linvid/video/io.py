"""Decode and sample frames from video files as a stream (DESIGN.md, "Data flow": video file
--video.io--> frames (T, 3, H, W) + timestamps).

Two ways to pick and size frames (`sampling`):
- "qwen" (the default): what Qwen2.5-VL was trained with, as qwen-vl-utils' `fetch_video`
  does it (`linvid.video.qwen_sampling`): frames picked by decode index, spread by linspace
  over the clip with its first and last frame, an even number of them (at least 4 at the
  default 2 fps), each resized to the pipeline's final size (sides multiples of 28, within
  the per-frame pixel budget) with torchvision's uint8 bicubic antialiased result, so that
  HF's processor only normalises and patchifies them;
- "timestamps": linvid's own plan: the decoded frame nearest to each planned time (one every
  1/fps s, or num_frames spread uniformly, or every frame), shrunk by area to max_pixels.

A long video never sits in memory: frames are decoded one at a time, and only those picked by
the sampling plan are converted to RGB (and resized); `load_video` writes them into one
preallocated (T, 3, H, W) uint8 tensor. The plan is made from the container's metadata before
decoding (`probe_video`, then `sampling_plan`), so the number of frames is known up front:
`iter_video_frames` yields them one by one for callers that consume a video chunk by chunk.

Times are seconds from the video's first frame (a stream that starts at a non-zero
timestamp, as MPEG-TS streams do, still starts at 0.0 here).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np
import torch

from linvid.video import qwen_sampling

BACKENDS = ("pyav", "decord")
DECORD_BATCH = 16  # frames per decord get_batch call: a bounded amount decoded at once
SAMPLING_MODES = ("qwen", "timestamps")
DEFAULT_SAMPLING = "qwen"
# Arguments only the "qwen" mode understands (qwen-vl-utils' per-video keys); min_pixels is
# accepted by both (the "timestamps" loader only shrinks frames, so it leaves min_pixels to the
# resize in `video_to_patches`).
QWEN_ONLY_ARGUMENTS = ("min_frames", "total_pixels")


class VideoError(ValueError):
    """A video file that cannot be read as asked: missing, empty, not a video, truncated,
    without decodable frames. The message names the file and the problem."""


class SampledFrame(NamedTuple):
    """One sampled frame: pixels (3, H, W) uint8 RGB; index of the source frame ("qwen"
    sampling: its decode index; "timestamps": from its timestamp and the source fps, so
    approximate for variable-frame-rate videos); timestamp in seconds from the first frame."""

    pixels: torch.Tensor
    index: int
    timestamp: float


class SamplingPlan(NamedTuple):
    """Which frames to decode and how large to return them, decided before decoding.

    sampling: "qwen" or "timestamps"; times: the planned times (s from the first frame; for
    "qwen" the frames' nominal times index / source_fps); frame_indices: "qwen": the decode
    indices to keep (sorted, distinct), "timestamps": None (each time takes its nearest
    frame); sample_fps: frames per second of the sampled video ("qwen": qwen-vl-utils'
    `sample_fps`, "timestamps": the requested rate, or samples per second of the span);
    size: (H, W) of the returned frames; span: (first, last) source frame index of the
    sampled window, inclusive."""

    sampling: str
    times: list[float]
    frame_indices: list[int] | None
    sample_fps: float
    size: tuple[int, int]
    span: tuple[int, int]


# ---------------------------------------------------------------------------------------------
# Metadata and the sampling plan


def probe_video(path: str | os.PathLike) -> dict:
    """Read a video's metadata without decoding frames.

    Returns {"path", "duration" (s), "total_frames", "source_fps", "size" (H, W),
    "codec", "frame_count_from"}. The frame count comes from the container header when it
    records one ("header"), else from duration x rate ("duration*rate"), else from counting
    the demuxed packets ("packets", reads the file but decodes nothing); the duration likewise
    falls back to the container's, then to the packet timestamps.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        source_fps = float(rate) if rate else None
        duration = None
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        total_frames, frame_count_from = stream.frames, "header"
        if not total_frames and duration and source_fps:
            total_frames, frame_count_from = round(duration * source_fps), "duration*rate"
        if not total_frames or not duration or not source_fps:
            total_frames, packet_duration = _count_packets(container, stream, path)
            frame_count_from = "packets"
            if total_frames and not (duration or packet_duration or source_fps):
                raise VideoError(f"video records neither a frame rate nor timestamps: {path}")
            if total_frames:
                duration = duration or packet_duration or total_frames / source_fps
                source_fps = source_fps or total_frames / duration
        if total_frames == 0:
            raise VideoError(f"video has 0 decodable frames: {path}")
        if not stream.codec_context.height or not stream.codec_context.width:
            raise VideoError(f"video stream does not record its frame size: {path}")
        return {
            "path": os.fspath(path),
            "duration": duration,
            "total_frames": total_frames,
            "source_fps": source_fps,
            "size": (stream.codec_context.height, stream.codec_context.width),
            "codec": stream.codec_context.name,
            "frame_count_from": frame_count_from,
        }


def _count_packets(container, stream, path) -> tuple[int, float | None]:
    """Frames and duration (s, None without timestamps) from the demuxed packets, undecoded."""
    count, first, last = 0, None, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            count += 1
            if packet.pts is not None:
                end = packet.pts + (packet.duration or 0)
                first = packet.pts if first is None else min(first, packet.pts)
                last = end if last is None else max(last, end)
    except av.error.FFmpegError as error:
        raise VideoError(f"video is truncated or corrupt ({error}): {path}") from error
    if first is None or last <= first:
        return count, None
    return count, float((last - first) * stream.time_base)


def sampling_plan(
    info: Mapping,
    *,
    sampling: str = DEFAULT_SAMPLING,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
) -> SamplingPlan:
    """Plan which frames of a video to decode and the size to return them at.

    info: `probe_video`'s result (duration, total_frames, source_fps, size). Arguments as in
    `load_video`; "qwen" sampling follows `qwen_sampling.plan_sampling` (fps defaults to 2,
    start/end are qwen-vl-utils' video_start/video_end), "timestamps" follows `sample_times`
    and `fit_to_max_pixels`. Raises ValueError for bad arguments.
    """
    _check_arguments(
        sampling, fps, num_frames, min_frames, max_frames, start, end, min_pixels, total_pixels
    )
    _check_max_pixels(max_pixels)
    if sampling == "timestamps":
        times, rate, span = _timestamp_times(info, fps, num_frames, max_frames, start, end)
        size = fit_to_max_pixels(*info["size"], max_pixels)
        return SamplingPlan(sampling, times, None, rate, size, span)
    if info["total_frames"] < qwen_sampling.FRAME_FACTOR:
        # A property of the file, not of the arguments: qwen-vl-utils cannot sample it either.
        raise VideoError(
            f"video has {info['total_frames']} frame; Qwen sampling needs at least "
            f"{qwen_sampling.FRAME_FACTOR} (sampling='timestamps' reads it): {info['path']}"
        )
    try:
        plan = qwen_sampling.plan_sampling(
            info["total_frames"],
            info["source_fps"],
            *info["size"],
            fps=fps,
            num_frames=num_frames,
            min_frames=min_frames,
            max_frames=max_frames,
            start=start,
            end=end,
            min_pixels=qwen_sampling.VIDEO_MIN_PIXELS if min_pixels is None else min_pixels,
            max_pixels=max_pixels,
            total_pixels=(
                qwen_sampling.VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
            ),
        )
    except ValueError as error:
        raise ValueError(f"{error} (sampling='qwen', video {info['path']})") from error
    times = [index / info["source_fps"] for index in plan.frame_indices]
    return SamplingPlan(
        sampling, times, plan.frame_indices, plan.sample_fps, plan.size, (plan.first, plan.last)
    )


def sample_times(
    info: Mapping,
    *,
    sampling: str = DEFAULT_SAMPLING,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
) -> tuple[list[float], float]:
    """Plan which moments of a video to sample.

    info: `probe_video`'s result (duration, total_frames, source_fps, size).
    sampling="qwen" (default): qwen-vl-utils' frames (see `load_video`); the times are those
    frames' nominal times (index / source_fps) and the rate is qwen's sample fps.
    sampling="timestamps": the decoder keeps, for each planned time, the decoded frame nearest
    to it. The span is [start, end) in seconds (default: the whole video; an end past the
    video is clipped).
    - fps: one sample every 1/fps s from start (fps above the source rate is capped at it);
    - num_frames: exactly that many, spread uniformly over the span's frames (first and last
      included; frames repeat if the span holds fewer);
    - neither: every frame of the span.
    If more than max_frames result, max_frames of them are kept, uniformly spread.
    Returns (times in seconds, sorted; sampling fps): the sampling fps is the requested
    rate for an uncapped fps plan, else samples per second of the span.
    """
    plan = sampling_plan(
        info,
        sampling=sampling,
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
        start=start,
        end=end,
    )
    return plan.times, plan.sample_fps


def _timestamp_times(info, fps, num_frames, max_frames, start, end):
    """The "timestamps" plan: (times, sampling fps, (first, last) frame of the span)."""
    duration, source_fps = info["duration"], info["source_fps"]
    start = 0.0 if start is None else float(start)
    if start >= duration:
        raise ValueError(
            f"start must be before the end of the video ({duration:.3f} s), got {start!r} "
            f"for {info['path']}"
        )
    end = duration if end is None else min(float(end), duration)
    # The source frames in the span: frame i shows at i / source_fps (constant rate).
    first = math.ceil(start * source_fps - 1e-6)
    last = min(info["total_frames"] - 1, math.ceil(end * source_fps - 1e-6) - 1)
    if last < first:
        raise ValueError(
            f"start={start!r} and end={end!r} hold no frame of {info['path']} ({source_fps:g} fps)"
        )
    if fps is not None:
        rate = min(float(fps), source_fps)
        count = max(1, math.ceil((end - start) * rate - 1e-9))
        span_first, span_last = first / source_fps, last / source_fps
        times = [min(max(start + k / rate, span_first), span_last) for k in range(count)]
    else:
        if num_frames is None:
            indices = list(range(first, last + 1))
        else:
            indices = [first + _spread(k, num_frames, last - first) for k in range(num_frames)]
        times = [index / source_fps for index in indices]
    capped = max_frames is not None and len(times) > max_frames
    if capped:
        times = [times[_spread(k, max_frames, len(times) - 1)] for k in range(max_frames)]
    sampling_fps = rate if fps is not None and not capped else len(times) / (end - start)
    return times, sampling_fps, (first, last)


def _spread(k: int, count: int, span: int) -> int:
    """k-th of `count` integers spread uniformly over [0, span] (0 and span included)."""
    return 0 if count == 1 else math.floor(k * span / (count - 1) + 0.5)


def fit_to_max_pixels(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """Output (height, width) for a (height, width) frame: unchanged if height * width <=
    max_pixels (or max_pixels is None), else scaled down keeping the aspect ratio, each side
    a multiple of 2, so that the product is at most max_pixels."""
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    new_height = max(2, math.floor(height * scale / 2) * 2)
    new_width = max(2, math.floor(width * scale / 2) * 2)
    while new_height * new_width > max_pixels:  # a side raised to 2 above (very thin frames)
        if new_height >= new_width:
            new_height -= 2
        else:
            new_width -= 2
    return new_height, new_width


def _check_arguments(
    sampling, fps, num_frames, min_frames, max_frames, start, end, min_pixels, total_pixels
) -> None:
    """ValueError naming the argument for anything `sampling_plan` cannot use."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    _check_sampling_arguments(fps, num_frames, max_frames, start, end)
    if sampling != "qwen":
        given = {"min_frames": min_frames, "total_pixels": total_pixels}
        for name in QWEN_ONLY_ARGUMENTS:
            if (value := given[name]) is not None:
                raise ValueError(
                    f"{name} is a sampling='qwen' argument (qwen-vl-utils' per-video key); "
                    f"got {name}={value!r} with sampling={sampling!r}"
                )
    if min_frames is not None and (
        isinstance(min_frames, bool) or not isinstance(min_frames, int) or min_frames < 1
    ):
        raise ValueError(f"min_frames must be an int >= 1, got {min_frames!r}")
    if min_pixels is not None and (
        isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0
    ):
        raise ValueError(f"min_pixels must be an int >= 0, got {min_pixels!r}")
    if total_pixels is not None and not (_is_real(total_pixels) and total_pixels > 0):
        raise ValueError(f"total_pixels must be a finite number > 0, got {total_pixels!r}")


def _check_sampling_arguments(fps, num_frames, max_frames, start, end) -> None:
    if fps is not None and num_frames is not None:
        raise ValueError(
            f"give fps or num_frames, not both; got fps={fps!r} and num_frames={num_frames!r}"
        )
    if fps is not None and not (_is_real(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0 (samples per second), got {fps!r}")
    for name, value in (("num_frames", num_frames), ("max_frames", max_frames)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if value is not None and value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if start is not None and not (_is_real(start) and start >= 0):
        raise ValueError(f"start must be a finite number of seconds >= 0, got {start!r}")
    if end is not None and not _is_real(end):
        raise ValueError(f"end must be a finite number of seconds, got {end!r}")
    if end is not None and end <= (start or 0.0):
        raise ValueError(f"end must be after start, got start={start!r} and end={end!r}")


def _check_max_pixels(max_pixels) -> None:
    if max_pixels is not None and (
        isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 4
    ):
        raise ValueError(f"max_pixels must be an int >= 4 (2 x 2), got {max_pixels!r}")


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def plan_video(
    path: str | os.PathLike,
    *,
    sampling: str = DEFAULT_SAMPLING,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
) -> dict:
    """What `load_video` with the same arguments will return, from the container's metadata
    alone (nothing is decoded): {"sampling", "frame_indices" (the planned source frames;
    "timestamps": the frame nearest each planned time at the source rate, approximate for
    variable-frame-rate videos), "timestamps" (planned times, s), "fps" and "sample_fps",
    "second_per_grid", "frame_range", "video_metadata", "size" (H, W of the frames),
    "source_size", "duration", "total_frames", "source_fps", "path"}. Raises as `load_video`.
    """
    _check_arguments(
        sampling, fps, num_frames, min_frames, max_frames, start, end, min_pixels, total_pixels
    )
    _check_max_pixels(max_pixels)
    info = probe_video(path)
    plan = sampling_plan(
        info,
        sampling=sampling,
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
        start=start,
        end=end,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
    )
    indices = plan.frame_indices
    if indices is None:
        last = info["total_frames"] - 1
        indices = [min(round(time * info["source_fps"]), last) for time in plan.times]
    return _meta(info, plan, indices, list(plan.times), backend=None)


def _meta(info, plan: SamplingPlan, indices, timestamps, backend) -> dict:
    """`load_video`'s meta for the frames at `indices` shown at `timestamps` (s)."""
    first, last = plan.span
    return {
        "sampling": plan.sampling,
        "fps": plan.sample_fps,
        "sample_fps": plan.sample_fps,
        "second_per_grid": qwen_sampling.second_per_grid(plan.sample_fps),
        "frame_indices": indices,
        "timestamps": timestamps,
        "duration": info["duration"],
        "total_frames": info["total_frames"],
        "frame_range": plan.span,
        "video_metadata": {
            "fps": info["source_fps"],
            "total_num_frames": last - first + 1,
            "frames_indices": list(indices),
            "video_backend": backend,
        },
        "backend": backend,
        "source_fps": info["source_fps"],
        "size": plan.size,
        "source_size": info["size"],
        "path": info["path"],
    }


# ---------------------------------------------------------------------------------------------
# Decoding


def iter_video_frames(
    path: str | os.PathLike,
    *,
    sampling: str = DEFAULT_SAMPLING,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
    backend: str = "pyav",
) -> Iterator[SampledFrame]:
    """Yield the sampled frames of a video one at a time, in time order (arguments as in
    `load_video`). Each is a `SampledFrame` with pixels (3, H, W) uint8 at the plan's size;
    a source frame that serves several planned times ("timestamps" sampling) is yielded once
    per time (the same tensor)."""
    _check_arguments(
        sampling, fps, num_frames, min_frames, max_frames, start, end, min_pixels, total_pixels
    )
    _check_decoding_arguments(backend, max_pixels)
    info = probe_video(path)
    plan = sampling_plan(
        info,
        sampling=sampling,
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
        start=start,
        end=end,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
    )
    return _decode(path, info, plan, backend)


def load_video(
    path: str | os.PathLike,
    *,
    sampling: str = DEFAULT_SAMPLING,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
    backend: str = "pyav",
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Decode a video and return its sampled frames.

    sampling="qwen" (default): Qwen2.5-VL's pipeline, as qwen-vl-utils' `fetch_video` with a
    decord or torchcodec reader (`linvid.video.qwen_sampling`): the window [start, end]
    seconds (its video_start / video_end: first frame ceil(start * fps), last floor(end *
    fps)); `num_frames` rounded to even, or `fps` (default 2.0) frames per second clamped to
    [min_frames (default 4), max_frames (default 768)] and rounded down to even; frames at
    decode indices round(linspace(first, last, count)). Each frame is resized as it is
    decoded to the pipeline's size (sides multiples of 28, area within [min_pixels (default
    128 * 28 * 28), the per-frame share of total_pixels (default 128000 * 28 * 28 * 0.9),
    at most 768 * 28 * 28 and at most max_pixels]) with torchvision's bicubic antialiased
    uint8 result. The frames are then what HF's Qwen2.5-VL processor expects: pass
    `meta["video_metadata"]` as its video_metadata (with do_sample_frames=False), or
    `meta["second_per_grid"]` as second_per_grid_ts, to give the model the sampled time axis.
    Raises ValueError (VideoError) when the video has fewer frames than this needs (a
    1-frame video).

    sampling="timestamps": linvid's plan (see `sample_times`): `fps` samples per second, or
    `num_frames` spread uniformly, or every frame (neither given); at most `max_frames` in any
    case; within [start, end) seconds; each planned time takes the nearest decoded frame.
    `max_pixels` shrinks each frame by area (aspect kept, even sides) so that H * W <=
    max_pixels; min_pixels is accepted and not used (frames are only shrunk here; the
    resize in `video_to_patches` applies it); min_frames and total_pixels are "qwen" only.

    backend: "pyav" (default) or "decord" (needs the decord package).
    Returns frames (T, 3, H, W) uint8 RGB and meta {"sampling", "fps" and "sample_fps" (the
    sampled rate: qwen's sample fps, or the timestamps plan's rate), "second_per_grid"
    (seconds per temporal patch of 2 frames: 2 / sample fps), "frame_indices",
    "timestamps" (s), "duration" (s), "total_frames", "frame_range" ((first, last) source
    frame of the sampled window), "video_metadata" (for HF's processor: {"fps" (source),
    "total_num_frames" (frames in the window), "frames_indices", "video_backend"}),
    "backend", "source_fps", "size" (H, W of the returned frames), "source_size" (H, W),
    "path"}. Raises VideoError for unreadable files and ValueError for bad arguments.
    """
    _check_arguments(
        sampling, fps, num_frames, min_frames, max_frames, start, end, min_pixels, total_pixels
    )
    _check_decoding_arguments(backend, max_pixels)
    info = probe_video(path)
    plan = sampling_plan(
        info,
        sampling=sampling,
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
        start=start,
        end=end,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
    )
    height, width = plan.size
    frames = torch.empty(len(plan.times), 3, height, width, dtype=torch.uint8)
    indices, timestamps = [], []
    sampled = _decode(path, info, plan, backend)
    if progress:
        from tqdm import tqdm

        sampled = tqdm(sampled, total=len(plan.times), desc="decoding", unit="frame")
    for slot, frame in enumerate(sampled):
        frames[slot] = frame.pixels
        indices.append(frame.index)
        timestamps.append(frame.timestamp)
    assert len(indices) == len(plan.times), "the decoders serve every planned frame or raise"
    meta = _meta(info, plan, indices, timestamps, backend)
    return frames, meta


def _check_decoding_arguments(backend, max_pixels) -> None:
    _check_max_pixels(max_pixels)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "decord" and importlib.util.find_spec("decord") is None:
        raise ValueError(
            "backend='decord' needs the decord package, which is not installed "
            "(pip install decord), or use backend='pyav'"
        )


def _decode(path, info, plan: SamplingPlan, backend) -> Iterator[SampledFrame]:
    if plan.sampling == "qwen":
        if backend == "decord":
            return _decode_decord_indices(path, plan.frame_indices, plan.size)
        return _decode_pyav_indices(path, info, plan.frame_indices, plan.size)
    if backend == "decord":
        return _decode_decord(path, info, plan.times, plan.size)
    return _decode_pyav(path, info, plan.times, plan.size)


def _to_pixels(frame, size: tuple[int, int]) -> torch.Tensor:
    """A decoded av.VideoFrame as (3, H, W) uint8 RGB at `size` (H, W); area-averaged when
    shrinking, which keeps thin details visible better than bilinear."""
    height, width = size
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _decode_pyav(path, info, times, size) -> Iterator[SampledFrame]:
    """Decode in order and, for each planned time, keep the decoded frame nearest to it
    (ties go to the earlier frame). Only the previous frame is held undecided; frames nobody
    asked for are never converted."""
    source_fps = info["source_fps"]
    pending = 0  # times[pending] is the next planned time to serve
    previous = previous_time = previous_pixels = None
    for frame, time in _timed_frames(path, source_fps, times[0]):
        while (
            previous is not None
            and pending < len(times)
            and times[pending] - previous_time <= time - times[pending]
        ):
            if previous_pixels is None:
                previous_pixels = _to_pixels(previous, size)
            yield _sampled(previous_pixels, previous_time, source_fps)
            pending += 1
        if pending == len(times):
            return
        previous, previous_time, previous_pixels = frame, time, None
    if previous is None:
        raise VideoError(f"video has 0 decodable frames: {path}")
    # Times past the last decoded frame: it is their nearest frame, unless the file ends well
    # before its header says (then the video was cut short).
    if times[-1] - previous_time > 2.0 / source_fps:
        raise VideoError(
            f"video is truncated: its frames end at {previous_time:.3f} s but it should last "
            f"{info['duration']:.3f} s: {path}"
        )
    previous_pixels = _to_pixels(previous, size)
    for _ in range(pending, len(times)):
        yield _sampled(previous_pixels, previous_time, source_fps)


def _timed_frames(path, source_fps: float, first_time: float, seek: bool = True):
    """Yield (av.VideoFrame, time in s from the first frame) in display order, with increasing
    times, starting at or before `first_time`.

    Times come from the frames' timestamps, except where those are not presentation times:
    AVI stores decode-order timestamps (and is constant-rate by design) and raw streams have
    none; such frames are timed by counting at source_fps. Seeking jumps to the keyframe
    before first_time; when a container cannot seek (raw streams) or seeks inexactly (MPEG-TS
    seeks by byte estimate and can land past first_time, or on frames that never decode),
    decoding starts over from the beginning.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        counted = container.format.name == "avi"
        seek = seek and not counted and first_time > 1.0 / source_fps
        origin = stream.start_time or 0
        if seek:  # one frame to spare: the nearest frame may lie just before first_time
            offset = origin + int((first_time - 1.0 / source_fps) / stream.time_base)
            try:
                container.seek(offset, stream=stream, backward=True)
                frames = container.decode(stream)
            except av.error.FFmpegError:  # raw streams cannot seek: start over without seeking
                frames = ()
        else:
            frames = container.decode(stream)
        time = None
        landed_well = False  # after a seek: the first frame is at or before first_time
        try:
            for frame in frames:
                if counted or frame.pts is None:
                    time = 0.0 if time is None else time + 1.0 / source_fps
                else:
                    stamp = float((frame.pts - origin) * stream.time_base)
                    time = stamp if time is None or stamp > time else time + 1.0 / source_fps
                if seek and not landed_well:
                    if frame.pts is None or time > first_time:
                        break
                    landed_well = True
                yield frame, time
        except av.error.FFmpegError as error:
            reached = f"after {time:.3f} s" if time is not None else "at its start"
            raise VideoError(
                f"video is truncated or corrupt: decoding failed {reached} ({error}): {path}"
            ) from error
    if seek and not landed_well:
        yield from _timed_frames(path, source_fps, first_time, seek=False)


def _sampled(pixels, time, source_fps) -> SampledFrame:
    return SampledFrame(pixels, round(time * source_fps), time)


def _decode_decord(path, info, times, size) -> Iterator[SampledFrame]:
    """decord reads frames by index: each planned time maps to its nearest frame index at
    decord's average rate; unique indices are read DECORD_BATCH at a time."""
    import decord

    height, width = (-1, -1) if size == tuple(info["size"]) else size  # -1: decord keeps it
    reader = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0), width=width, height=height)
    rate, count = reader.get_avg_fps(), len(reader)
    if count == 0:
        raise VideoError(f"video has 0 decodable frames: {path}")
    indices = [min(max(round(time * rate), 0), count - 1) for time in times]
    unique = sorted(set(indices))
    pixels, starts = {}, {}
    position = 0
    for index in indices:
        if index not in pixels:
            pixels.clear()  # indices only grow: earlier batches are done with
            starts.clear()
            batch = unique[position : position + DECORD_BATCH]
            position += len(batch)
            rgb = reader.get_batch(batch).asnumpy()  # (N, H, W, 3)
            stamps = reader.get_frame_timestamp(batch)[:, 0]  # (N, 2): start, end seconds
            for item, frame, stamp in zip(batch, rgb, stamps, strict=True):
                pixels[item] = torch.from_numpy(frame).permute(2, 0, 1)
                starts[item] = float(stamp)
        yield SampledFrame(pixels[index], index, starts[index])


def _to_rgb(frame) -> torch.Tensor:
    """A decoded av.VideoFrame as (3, H, W) uint8 RGB at its stored size."""
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def _decode_pyav_indices(path, info, indices, size) -> Iterator[SampledFrame]:
    """Decode in order, numbering frames as decord and torchcodec do (by position in the
    stream), and keep those at the planned decode indices ("qwen" sampling): only they are
    converted to RGB and resized (`qwen_sampling.resize_frames`). A seek to the keyframe before
    the first planned frame numbers the first decoded frame from its timestamp, the following
    ones by counting."""
    source_fps = info["source_fps"]
    pending = 0  # indices[pending] is the next planned index to serve
    index = time = previous = None
    for frame, time in _timed_frames(path, source_fps, indices[0] / source_fps):
        index = round(time * source_fps) if index is None else index + 1
        previous = frame
        if index < indices[pending]:
            continue
        pixels = qwen_sampling.resize_frames(_to_rgb(frame), size)
        while pending < len(indices) and indices[pending] <= index:
            yield SampledFrame(pixels, index, time)
            pending += 1
        if pending == len(indices):
            return
    if previous is None:
        raise VideoError(f"video has 0 decodable frames: {path}")
    # A frame count from the header or from duration x rate can overstate the frames that
    # decode by one or two: the last frame serves those, as decord's last index would. More
    # missing frames mean the file was cut short.
    if indices[-1] - index > 2:
        raise VideoError(
            f"video is truncated: it decodes to frame {index} ({time:.3f} s) but should hold "
            f"{info['total_frames']} frames ({info['duration']:.3f} s): {path}"
        )
    pixels = qwen_sampling.resize_frames(_to_rgb(previous), size)
    for _ in range(pending, len(indices)):
        yield SampledFrame(pixels, index, time)


def _decode_decord_indices(path, indices, size) -> Iterator[SampledFrame]:
    """decord reads the planned decode indices directly ("qwen" sampling), DECORD_BATCH at a
    time; each frame is resized as qwen-vl-utils does (`qwen_sampling.resize_frames`)."""
    import decord

    reader = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0))
    count = len(reader)
    if count == 0:
        raise VideoError(f"video has 0 decodable frames: {path}")
    if indices[-1] >= count:
        raise VideoError(
            f"video is truncated: decord reads {count} frames but frame {indices[-1]} is "
            f"planned from its header: {path}"
        )
    for position in range(0, len(indices), DECORD_BATCH):
        batch = indices[position : position + DECORD_BATCH]
        rgb = reader.get_batch(batch).asnumpy()  # (N, H, W, 3)
        stamps = reader.get_frame_timestamp(batch)[:, 0]  # (N, 2): start, end seconds
        for index, frame, stamp in zip(batch, rgb, stamps, strict=True):
            pixels = qwen_sampling.resize_frames(torch.from_numpy(frame).permute(2, 0, 1), size)
            yield SampledFrame(pixels, index, float(stamp))


def _open(path):
    """av.open with the file problems turned into VideoError naming the file."""
    if not os.path.exists(path):
        raise VideoError(f"video file not found: {path}")
    if os.path.isdir(path):
        raise VideoError(f"expected a video file, got a directory: {path}")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video file is empty (0 bytes): {path}")
    try:
        container = av.open(os.fspath(path))
    except av.error.FFmpegError as error:
        raise VideoError(
            f"cannot read as a video ({error.strerror}); not a video file, or a truncated or "
            f"corrupt one: {path}"
        ) from error
    if container.format.name == "tty":  # FFmpeg renders any text file as ANSI art "video"
        container.close()
        raise VideoError(f"cannot read as a video: a text file, not a video file: {path}")
    if not container.streams.video:
        container.close()
        raise VideoError(f"file has no video stream: {path}")
    return container


# ---------------------------------------------------------------------------------------------
# Writing


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray | Iterable,
    fps: float,
    *,
    codec: str = "libx264",
    crf: int | None = None,
    options: Mapping[str, str] | None = None,
) -> str:
    """Encode uint8 RGB frames into a video file (yuv420p); returns the codec used.

    frames: (T, 3, H, W) or (T, H, W, 3) uint8 tensor/array, or any iterable of (3, H, W) or
    (H, W, 3) frames (streamed: a generator writes a long video in constant memory). A frame
    with 3 in both places is read as (3, H, W). H and W must be even. fps: frames per second.
    codec falls back to "mpeg4" when libx264 is not available in this PyAV build. crf is the
    quality (x264's constant rate factor: 0 lossless .. 51 worst; for mpeg4 it maps linearly
    onto qscale 1..31). options: extra encoder options, e.g. {"preset": "ultrafast"}.
    MP4/MOV files get their index at the front (faststart) so they can be read while incomplete.
    """
    if not (_is_real(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    if codec == "libx264" and codec not in av.codecs_available:
        codec = "mpeg4"
    rate = Fraction(fps).limit_denominator(1001)
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"frames must hold at least one frame, got none for {path}")
    first = _as_hwc(first, "frames[0]")
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {(height, width)}")
    container_options = {}
    if os.fspath(path).lower().endswith((".mp4", ".mov", ".m4v")):
        container_options["movflags"] = "+faststart"
    with av.open(os.fspath(path), "w", options=container_options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        encoder_options = dict(options or {})
        if crf is not None and codec == "libx264":
            encoder_options["crf"] = str(crf)
        elif crf is not None:
            quality = min(31, max(1, round(1 + crf * 30 / 51)))
            if hasattr(stream.codec_context, "global_quality"):
                stream.codec_context.qscale = True
                stream.codec_context.global_quality = quality
            else:  # PyAV < 16 (lmms-eval needs av<16): the same fields as codec options
                encoder_options.update(flags="+qscale", global_quality=str(quality))
        stream.options = encoder_options
        for index, frame in enumerate(_chain(first, iterator)):
            frame = _as_hwc(frame, f"frames[{index}]")
            if frame.shape != first.shape:
                raise ValueError(
                    f"every frame must have the first one's (H, W, 3) shape {first.shape}, "
                    f"got {frame.shape} at frame {index}"
                )
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = index
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return codec


def _chain(first, rest):
    yield first
    yield from rest


def _as_hwc(frame, name: str) -> np.ndarray:
    """One frame as a contiguous (H, W, 3) uint8 numpy array."""
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or 3 not in (frame.shape[0], frame.shape[-1]):
        raise ValueError(
            f"{name} must be a uint8 (3, H, W) or (H, W, 3) frame, "
            f"got shape {frame.shape} dtype {frame.dtype}"
        )
    if frame.shape[0] == 3:
        frame = frame.transpose(1, 2, 0)
    return np.ascontiguousarray(frame)
