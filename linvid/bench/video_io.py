"""Memory of loading a long video: does `load_video` keep only the sampled frames?

`linvid bench video-io` (or `python -m linvid.bench.video_io`) writes a synthetic video once
(default 10 minutes of 1280x720 at 24 fps, cached in --work-dir; `--duration 3600` gives an
hour), then loads it with `load_video(fps=1)` in a fresh subprocess and reports, from that one
run, the loading process's peak RSS against the bytes of the sampled frames (T * 3 * H * W)
and against the bytes the whole decoded video would take. Streaming decoding keeps the first
ratio near 1 (plus the interpreter and decoder buffers) and the second far below 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

SCENE_SECONDS = 30  # the synthetic video changes scene this often
BLOCK = 160  # side (px) of the moving square that keeps consecutive frames different


def synthetic_frames(duration: float, width: int, height: int, fps: float):
    """Yield (height, width, 3) uint8 frames: one colour gradient per SCENE_SECONDS-long
    scene and an inverted square moving across it. Cheap to make and to encode."""
    frame_count = round(duration * fps)
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    columns = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    block = min(BLOCK, height // 2, width // 2)
    scene, base = None, None
    for index in range(frame_count):
        seconds = index / fps
        if int(seconds // SCENE_SECONDS) != scene:
            scene = int(seconds // SCENE_SECONDS)
            generator = np.random.default_rng(scene)
            colour = generator.integers(0, 256, 3)
            tilt_rows, tilt_columns = generator.random(3), generator.random(3)
            base = (0.5 * colour + 0.25 * rows * tilt_rows + 0.25 * columns * tilt_columns).astype(
                np.uint8
            )
        frame = base.copy()
        x = int(seconds * 80) % (width - block)
        y = int(seconds * 45) % (height - block)
        frame[y : y + block, x : x + block] = 255 - frame[y : y + block, x : x + block]
        yield frame


def cached_video(work_dir: str, duration: float, width: int, height: int, fps: float) -> dict:
    """The synthetic video for these settings, written on first use (to a temporary name,
    renamed when complete, so an interrupted run never leaves a cut file behind)."""
    from tqdm import tqdm

    from linvid.video.io import write_video

    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, f"synthetic_{duration:g}s_{width}x{height}_{fps:g}fps.mp4")
    if os.path.exists(path):
        return {"path": path, "generated": False, "encode_seconds": None}
    partial = path + ".partial.mp4"
    start = time.perf_counter()
    frames = tqdm(
        synthetic_frames(duration, width, height, fps),
        total=round(duration * fps),
        desc="writing synthetic video",
        unit="frame",
    )
    write_video(partial, frames, fps, crf=30, options={"preset": "ultrafast"})
    os.replace(partial, path)
    return {"path": path, "generated": True, "encode_seconds": time.perf_counter() - start}


def measure_load(path: str, fps: float, max_pixels: int | None) -> dict:
    """Run in a fresh process: resident memory after the imports, then the peak over
    `load_video`."""
    import resource

    from linvid.video.io import load_video

    def peak_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    baseline = _resident_bytes() or peak_bytes()
    start = time.perf_counter()
    # linvid's time-based plan: one frame per 1/fps s for the whole hour (Qwen's sampling would
    # cap the count at 768), which is the harder case for memory.
    frames, meta = load_video(path, sampling="timestamps", fps=fps, max_pixels=max_pixels)
    seconds = time.perf_counter() - start
    return {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_bytes(),
        "load_seconds": seconds,
        "sampled_shape": list(frames.shape),
        "sampled_bytes": frames.numel(),
        "sampling_fps": meta["fps"],
        "total_frames": meta["total_frames"],
        "source_fps": meta["source_fps"],
        "duration": meta["duration"],
        "source_size": list(meta["source_size"]),
    }


def _resident_bytes() -> int | None:
    """Current resident set size (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def run(
    duration: float = 600.0,
    size: tuple[int, int] = (1280, 720),
    source_fps: float = 24.0,
    fps: float = 1.0,
    max_pixels: int | None = None,
    work_dir: str | None = None,
) -> dict:
    """Generate (or reuse) the video, load it in a subprocess, and return the report."""
    work_dir = work_dir or os.path.join(tempfile.gettempdir(), "linvid-bench-video-io")
    width, height = size
    video = cached_video(work_dir, duration, width, height, source_fps)
    code = (
        "import json, sys\n"
        "from linvid.bench.video_io import measure_load\n"
        "print(json.dumps(measure_load(sys.argv[1], float(sys.argv[2]), "
        "None if sys.argv[3] == 'None' else int(sys.argv[3]))))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, video["path"], str(fps), str(max_pixels)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the loading subprocess failed:\n{completed.stderr}")
    load = json.loads(completed.stdout.strip().splitlines()[-1])
    source_height, source_width = load["source_size"]
    whole_video_bytes = load["total_frames"] * 3 * source_height * source_width
    load_bytes = load["peak_rss_bytes"] - load["baseline_rss_bytes"]
    ratios = {
        "peak_rss_over_sampled": load["peak_rss_bytes"] / load["sampled_bytes"],
        "load_rss_over_sampled": load_bytes / load["sampled_bytes"],
        "peak_rss_over_whole_video": load["peak_rss_bytes"] / whole_video_bytes,
        "sampled_over_whole_video": load["sampled_bytes"] / whole_video_bytes,
    }
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "av": _av_version(),
        },
        "video": {
            **video,
            "file_bytes": os.path.getsize(video["path"]),
            "duration": load["duration"],
            "size": [source_height, source_width],
            "source_fps": load["source_fps"],
            "total_frames": load["total_frames"],
        },
        "load": {
            **load,
            "fps": fps,
            "max_pixels": max_pixels,
            "whole_video_bytes": whole_video_bytes,
            "load_rss_bytes": load_bytes,
            "decoded_frames_per_second": load["total_frames"] / load["load_seconds"],
        },
        "ratios": ratios,
    }


def _av_version() -> str:
    import av

    return av.__version__


def markdown_table(report: dict) -> str:
    video, load, ratios = report["video"], report["load"], report["ratios"]
    height, width = video["size"]
    sampled = "x".join(str(side) for side in load["sampled_shape"])
    rows = [
        (
            "video",
            f"{video['duration']:.0f} s, {width}x{height}, {video['source_fps']:g} fps, "
            f"{video['total_frames']} frames, {video['file_bytes'] / 1e6:.1f} MB file",
        ),
        ("load_video", f"fps={load['fps']:g}, max_pixels={load['max_pixels']}"),
        ("sampled frames (T, 3, H, W)", f"{sampled} = {_gib(load['sampled_bytes'])}"),
        ("whole video decoded at source size (N * 3 * H * W)", _gib(load["whole_video_bytes"])),
        ("RSS after imports", _gib(load["baseline_rss_bytes"])),
        ("peak RSS of the loading process", _gib(load["peak_rss_bytes"])),
        ("peak RSS / sampled frames", f"{ratios['peak_rss_over_sampled']:.2f}x"),
        ("(peak - imports) RSS / sampled frames", f"{ratios['load_rss_over_sampled']:.2f}x"),
        ("peak RSS / whole decoded video", f"{ratios['peak_rss_over_whole_video']:.4f}x"),
        (
            "load time",
            f"{load['load_seconds']:.1f} s "
            f"({load['decoded_frames_per_second']:.0f} source frames decoded / s)",
        ),
    ]
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _gib(count: int) -> str:
    return f"{count / 2**30:.3f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=600.0, help="video length in s (default: %(default)s)"
    )
    parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT (default: %(default)s)")
    parser.add_argument(
        "--source-fps", type=float, default=24.0, help="the video's frame rate (default: 24)"
    )
    parser.add_argument(
        "--fps", type=float, default=1.0, help="load_video sampling rate (default: 1)"
    )
    parser.add_argument("--max-pixels", type=int, help="load_video max_pixels (default: none)")
    parser.add_argument(
        "--work-dir", help="where the synthetic video is cached (default: a temp directory)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def main_from_arguments(arguments: argparse.Namespace) -> int:
    try:
        width, height = (int(side) for side in arguments.size.lower().split("x"))
    except ValueError:
        message = f"--size must be WIDTHxHEIGHT, e.g. 1280x720, got {arguments.size!r}"
        raise ValueError(message) from None
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise ValueError(f"--size sides must be even and >= 2, got {arguments.size!r}")
    if arguments.duration <= 0 or arguments.source_fps <= 0 or arguments.fps <= 0:
        raise ValueError("--duration, --source-fps and --fps must be > 0")
    report = run(
        duration=arguments.duration,
        size=(width, height),
        source_fps=arguments.source_fps,
        fps=arguments.fps,
        max_pixels=arguments.max_pixels,
        work_dir=arguments.work_dir,
    )
    video = report["video"]
    if video["generated"]:
        print(f"wrote {video['path']} in {video['encode_seconds']:.0f} s")
    else:
        print(f"reused {video['path']}")
    print(markdown_table(report))
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linvid.bench.video_io", description=__doc__)
    add_arguments(parser)
    return main_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
