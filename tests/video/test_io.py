"""Video decoding and sampling: each sampling mode picks the frames it promises (frame i of the
test videos is a solid grey of level 5 * i, so a decoded frame tells its own number despite
compression), decoding streams, and every broken input fails with a VideoError naming it."""

import importlib.machinery
import math
import sys
import types

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from linvid.video import io
from linvid.video.io import (
    SampledFrame,
    VideoError,
    fit_to_max_pixels,
    iter_video_frames,
    load_video,
    probe_video,
    write_video,
)

FRAMES, FPS, HEIGHT, WIDTH = 48, 24, 48, 64


def counter_frames(count=FRAMES, height=HEIGHT, width=WIDTH):
    """(count, 3, H, W) uint8; frame i is solid grey 5 * i."""
    levels = torch.arange(count, dtype=torch.uint8) * 5
    return levels.view(count, 1, 1, 1).expand(count, 3, height, width).contiguous()


def frame_numbers(frames):
    return (frames.float().mean(dim=(1, 2, 3)) / 5).round().int().tolist()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "counter.mp4"
    write_video(path, counter_frames(), FPS, crf=0)
    return str(path)


def test_timestamps_without_fps_or_num_frames_loads_every_frame_with_its_metadata(video):
    frames, meta = load_video(video, sampling="timestamps")
    assert frames.dtype == torch.uint8 and frames.shape == (FRAMES, 3, HEIGHT, WIDTH)
    assert frame_numbers(frames) == list(range(FRAMES))
    assert meta["frame_indices"] == list(range(FRAMES))
    assert meta["timestamps"] == pytest.approx([i / FPS for i in range(FRAMES)])
    assert meta["fps"] == pytest.approx(FPS) and meta["source_fps"] == pytest.approx(FPS)
    assert meta["duration"] == pytest.approx(FRAMES / FPS)
    assert meta["total_frames"] == FRAMES
    assert meta["size"] == (HEIGHT, WIDTH) and meta["backend"] == "pyav"
    assert meta["sampling"] == "timestamps" and meta["sample_fps"] == meta["fps"]
    assert meta["second_per_grid"] == pytest.approx(2 / FPS)


def test_fps_samples_at_that_rate(video):
    frames, meta = load_video(video, sampling="timestamps", fps=2)
    assert frame_numbers(frames) == meta["frame_indices"] == [0, 12, 24, 36]
    assert meta["timestamps"] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert meta["fps"] == 2


def test_fps_above_the_source_rate_takes_each_frame_once(video):
    frames, meta = load_video(video, sampling="timestamps", fps=100)
    assert frame_numbers(frames) == list(range(FRAMES))
    assert meta["fps"] == pytest.approx(FPS)


def test_num_frames_spreads_uniformly_including_both_ends(video):
    frames, meta = load_video(video, sampling="timestamps", num_frames=5)
    assert frame_numbers(frames) == meta["frame_indices"] == [0, 12, 24, 35, 47]
    assert meta["timestamps"] == pytest.approx([i / FPS for i in (0, 12, 24, 35, 47)])
    assert frame_numbers(load_video(video, sampling="timestamps", num_frames=1)[0]) == [0]


def test_num_frames_beyond_the_frame_count_repeats_frames(video):
    frames, _ = load_video(video, sampling="timestamps", num_frames=2 * FRAMES)
    assert frames.shape[0] == 2 * FRAMES
    assert frame_numbers(frames) == [i // 2 for i in range(2 * FRAMES)]


def test_max_frames_subsamples_uniformly(video):
    frames, meta = load_video(video, sampling="timestamps", max_frames=4)
    assert frame_numbers(frames) == [0, 16, 31, 47]
    assert meta["fps"] == pytest.approx(4 / 2.0)  # samples per second of the span
    # 8 planned: 0, 6, ..., 42
    frames, meta = load_video(video, sampling="timestamps", fps=4, max_frames=3)
    assert frame_numbers(frames) == [0, 24, 42]


def test_start_and_end_bound_the_samples(video):
    frames, meta = load_video(video, sampling="timestamps", fps=2, start=0.5, end=1.5)
    assert frame_numbers(frames) == [12, 24]
    assert meta["timestamps"] == pytest.approx([0.5, 1.0])  # from the video's start
    frames, _ = load_video(video, sampling="timestamps", start=1.0)  # seeks
    assert frame_numbers(frames) == list(range(24, FRAMES))
    # frames 12..23
    frames, _ = load_video(video, sampling="timestamps", num_frames=3, start=0.5, end=1.0)
    assert frame_numbers(frames) == [12, 18, 23]
    frames, _ = load_video(video, sampling="timestamps", end=100.0)  # past the end: clipped
    assert frames.shape[0] == FRAMES


def test_max_pixels_shrinks_keeping_aspect_and_even_sides(video):
    frames, meta = load_video(video, sampling="timestamps", fps=2, max_pixels=1000)
    height, width = frames.shape[-2:]
    assert height * width <= 1000 and height % 2 == 0 and width % 2 == 0
    assert width / height == pytest.approx(WIDTH / HEIGHT, rel=0.1)
    assert meta["size"] == (height, width) and meta["source_size"] == (HEIGHT, WIDTH)
    assert frame_numbers(frames) == [0, 12, 24, 36]
    frames, _ = load_video(video, sampling="timestamps", fps=2, max_pixels=HEIGHT * WIDTH)
    assert frames.shape[-2:] == (HEIGHT, WIDTH)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(2, 4000),
    width=st.integers(2, 4000),
    max_pixels=st.integers(4, 10**7),
)
def test_fit_to_max_pixels_bounds_area_with_even_sides(height, width, max_pixels):
    new_height, new_width = fit_to_max_pixels(height, width, max_pixels)
    if height * width <= max_pixels:
        assert (new_height, new_width) == (height, width)
        return
    assert new_height * new_width <= max_pixels
    assert new_height % 2 == 0 and new_width % 2 == 0
    assert new_height <= height and new_width <= width
    if min(new_height, new_width) >= 20:  # rounding to even sides barely moves the aspect
        assert new_width / new_height == pytest.approx(width / height, rel=0.15)


def test_iter_video_frames_yields_the_same_frames_one_by_one(video):
    frames, meta = load_video(video, sampling="timestamps", fps=3, start=0.2)
    streamed = list(iter_video_frames(video, sampling="timestamps", fps=3, start=0.2))
    assert all(isinstance(frame, SampledFrame) for frame in streamed)
    assert torch.equal(torch.stack([frame.pixels for frame in streamed]), frames)
    assert [frame.index for frame in streamed] == meta["frame_indices"]
    assert [frame.timestamp for frame in streamed] == meta["timestamps"]


def test_only_sampled_frames_are_converted_and_decoding_stops_after_the_last(video, monkeypatch):
    converted, decoded = [], []
    to_pixels, timed_frames = io._to_pixels, io._timed_frames

    def counting_to_pixels(frame, size):
        converted.append(frame)
        return to_pixels(frame, size)

    def counting_timed_frames(*arguments, **keywords):
        for item in timed_frames(*arguments, **keywords):
            decoded.append(item)
            yield item

    monkeypatch.setattr(io, "_to_pixels", counting_to_pixels)
    monkeypatch.setattr(io, "_timed_frames", counting_timed_frames)
    load_video(video, sampling="timestamps", fps=2)
    assert len(converted) == 4
    converted.clear()
    # each frame serves two times, converted once
    load_video(video, sampling="timestamps", num_frames=2 * FRAMES)
    assert len(converted) == FRAMES
    converted.clear()
    decoded.clear()
    # frames 0..11: the 13th tells frame 11 is the nearest
    load_video(video, sampling="timestamps", end=0.5)
    assert len(converted) == 12 and len(decoded) == 13


@pytest.mark.parametrize("extension", ["mkv", "ts", "avi"])
def test_containers_with_other_timing_metadata_sample_the_same_frames(tmp_path, extension):
    # mkv has no frame count in its header, MPEG-TS starts at a non-zero timestamp, AVI keeps
    # decode-order timestamps (wrong for B-frames).
    path = tmp_path / f"counter.{extension}"
    write_video(path, counter_frames(), FPS, crf=0)
    info = probe_video(path)
    assert info["total_frames"] == FRAMES and info["duration"] == pytest.approx(2.0)
    frames, meta = load_video(path, sampling="timestamps", fps=2)
    assert frame_numbers(frames) == [0, 12, 24, 36]
    assert meta["timestamps"] == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=2e-3)
    frames, _ = load_video(path, sampling="timestamps", start=1.0, num_frames=3)
    assert frame_numbers(frames) == [24, 36, 47]


def test_probe_reads_metadata_without_decoding(video, monkeypatch):
    monkeypatch.setattr(io, "_timed_frames", None)  # any decoding would fail
    info = probe_video(video)
    assert info["total_frames"] == FRAMES and info["source_fps"] == pytest.approx(FPS)
    assert info["duration"] == pytest.approx(2.0) and info["size"] == (HEIGHT, WIDTH)
    assert info["codec"] == "h264" and info["frame_count_from"] == "header"


def test_write_video_accepts_channels_last_and_streamed_frames(tmp_path):
    frames = counter_frames(8)
    write_video(tmp_path / "last.mp4", frames.permute(0, 2, 3, 1).numpy(), 8, crf=0)
    write_video(tmp_path / "stream.mkv", (frame for frame in frames), 8, crf=0)
    for name in ("last.mp4", "stream.mkv"):
        loaded, _ = load_video(tmp_path / name, sampling="timestamps")
        assert frame_numbers(loaded) == list(range(8))


def test_write_video_falls_back_to_mpeg4_without_libx264(tmp_path, monkeypatch):
    monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libx264"})
    assert write_video(tmp_path / "fallback.mp4", counter_frames(8), 8, crf=0) == "mpeg4"
    assert probe_video(tmp_path / "fallback.mp4")["codec"] == "mpeg4"
    frames, _ = load_video(tmp_path / "fallback.mp4", sampling="timestamps")
    assert frame_numbers(frames) == list(range(8))


def test_write_video_rejects_frames_it_cannot_encode(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", counter_frames(2, 5, 8), 8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", counter_frames(2).float(), 8)
    with pytest.raises(ValueError, match="at least one frame"):
        write_video(tmp_path / "none.mp4", [], 8)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "rate.mp4", counter_frames(2), 0)


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory):
    """name -> path of files that are not readable videos, each in its own way."""
    folder = tmp_path_factory.mktemp("broken")
    noisy = torch.randint(0, 256, (48, 3, 48, 64), dtype=torch.uint8)
    write_video(folder / "whole.mp4", noisy, FPS)
    data = (folder / "whole.mp4").read_bytes()
    (folder / "first_half.mp4").write_bytes(data[: len(data) // 2])
    (folder / "second_half.mp4").write_bytes(data[len(data) // 2 :])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.txt").write_text("these are not the frames you are looking for\n" * 20)
    with av.open(str(folder / "no_frames.avi"), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    return {
        name: str(folder / file)
        for name, file in [
            ("missing", "missing.mp4"),
            ("empty", "empty.mp4"),
            ("text", "notes.txt"),
            ("truncated", "first_half.mp4"),
            ("headless", "second_half.mp4"),
            ("no frames", "no_frames.avi"),
            ("directory", "."),
        ]
    }


@pytest.mark.parametrize(
    "name, problem",
    [
        ("missing", "not found"),
        ("empty", "empty"),
        ("text", "not a video"),
        ("truncated", "truncated"),
        ("headless", "truncated"),
        ("no frames", "0 decodable frames"),
        ("directory", "directory"),
    ],
)
@pytest.mark.parametrize("sampling", io.SAMPLING_MODES)
def test_unreadable_files_raise_video_error_naming_file_and_problem(
    broken_files, name, problem, sampling
):
    path = broken_files[name]
    with pytest.raises(VideoError, match=problem) as caught:
        load_video(path, sampling=sampling)
    assert path in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"fps": 0}, "fps"),
        ({"fps": -1.0}, "fps"),
        ({"fps": math.nan}, "fps"),
        ({"fps": 1, "num_frames": 4}, "num_frames"),
        ({"num_frames": 0}, "num_frames"),
        ({"max_frames": 0}, "max_frames"),
        ({"start": 1.0, "end": 1.0}, "end"),
        ({"start": -1.0}, "start"),
        ({"start": 5.0}, "start"),
        ({"start": 1.01, "end": 1.03}, "start"),
        ({"max_pixels": 3}, "max_pixels"),
        ({"backend": "opencv"}, "backend"),
    ],
)
@pytest.mark.parametrize("sampling", io.SAMPLING_MODES)
def test_bad_arguments_raise_value_error_naming_the_argument(video, arguments, name, sampling):
    with pytest.raises(ValueError, match=name) as caught:
        load_video(video, sampling=sampling, **arguments)
    assert not isinstance(caught.value, VideoError)


def test_decord_backend_says_when_decord_is_missing(video, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import and find_spec both fail
    monkeypatch.setattr(io.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="decord.*not installed"):
        load_video(video, backend="decord")


class FakeDecordReader:
    """decord.VideoReader's documented surface (len, get_avg_fps, get_batch(...).asnumpy(),
    get_frame_timestamp, width/height resize), backed by PyAV, so the adapter's index mapping
    and batching can be checked without decord."""

    def __init__(self, uri, ctx=None, width=-1, height=-1):
        with av.open(uri) as container:
            arrays = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        if width > 0:
            frames = F.interpolate(frames.float(), size=(height, width), mode="area").byte()
        self.frames = frames.permute(0, 2, 3, 1)  # (N, H, W, 3)
        self.batches = []

    def __len__(self):
        return len(self.frames)

    def get_avg_fps(self):
        return float(FPS)

    def get_batch(self, indices):
        self.batches.append(list(indices))
        return types.SimpleNamespace(asnumpy=lambda: self.frames[list(indices)].numpy())

    def get_frame_timestamp(self, indices):
        starts = np.asarray(indices, dtype=np.float64)[:, None] / FPS
        return np.concatenate([starts, starts + 1 / FPS], axis=1)


def test_decord_backend_maps_times_to_frames_through_decords_api(video, monkeypatch):
    readers = []
    fake = types.ModuleType("decord")
    fake.__spec__ = importlib.machinery.ModuleSpec("decord", None)
    fake.cpu = lambda device: device
    fake.VideoReader = lambda *a, **k: readers.append(FakeDecordReader(*a, **k)) or readers[-1]
    monkeypatch.setitem(sys.modules, "decord", fake)
    frames, meta = load_video(
        video, sampling="timestamps", fps=2, backend="decord", max_pixels=1000
    )
    pyav_frames, pyav_meta = load_video(video, sampling="timestamps", fps=2, max_pixels=1000)
    assert frame_numbers(frames) == [0, 12, 24, 36] and meta["backend"] == "decord"
    assert frames.shape == pyav_frames.shape
    assert meta["timestamps"] == pytest.approx(pyav_meta["timestamps"])
    frames, _ = load_video(video, sampling="timestamps", num_frames=2 * FRAMES, backend="decord")
    assert frame_numbers(frames) == [i // 2 for i in range(2 * FRAMES)]
    batches = readers[-1].batches
    assert sum(batches, []) == list(range(FRAMES))  # each frame read once, in order
    assert max(len(batch) for batch in batches) <= io.DECORD_BATCH


def test_decord_backend_reads_qwen_indices_as_pyav_does(video, monkeypatch):
    readers = []
    fake = types.ModuleType("decord")
    fake.__spec__ = importlib.machinery.ModuleSpec("decord", None)
    fake.cpu = lambda device: device
    fake.VideoReader = lambda *a, **k: readers.append(FakeDecordReader(*a, **k)) or readers[-1]
    monkeypatch.setitem(sys.modules, "decord", fake)
    frames, meta = load_video(video, fps=12, backend="decord")  # 24 frames: two batches
    pyav_frames, pyav_meta = load_video(video, fps=12)
    assert (
        meta["frame_indices"]
        == pyav_meta["frame_indices"]
        == [round(i * 47 / 23) for i in range(24)]
    )
    assert frame_numbers(frames) == meta["frame_indices"]
    assert torch.equal(frames, pyav_frames) and meta["size"] == pyav_meta["size"]
    assert meta["timestamps"] == pytest.approx(pyav_meta["timestamps"])
    indices = meta["frame_indices"]
    assert readers[-1].batches == [indices[: io.DECORD_BATCH], indices[io.DECORD_BATCH :]]
