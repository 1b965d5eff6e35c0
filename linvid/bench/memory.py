"""Peak memory of `linvid ask` as the video grows: a Transformer teacher against an all-linear
(RWKV-6) student that prefills the video chunk by chunk, tiny configs, each run in a fresh
process so its peak resident memory is its own.

`linvid bench memory` (or `python -m linvid.bench.memory`) writes the models and the videos
once into --work-dir, then runs `linvid ask` for every (model, frames) pair and prints the
peaks and their growth from the shortest video, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

QUESTION = "what color is the circle ?"
FRAME_SIZE = 56  # one 2-frame temporal patch of 56x56 is 4 LLM tokens
VIDEO_FPS = 8


def prepare(work_dir: Path, frame_counts) -> tuple[dict[str, Path], dict[int, Path]]:
    """Tiny teacher and rwkv6-all student with a tokenizer, and one video per frame count,
    written once into work_dir (reused when present)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    import linvid
    from linvid.models.tiny import tiny_qwen2_5_vl_config
    from linvid.models.tokenizer import build_word_tokenizer, token_ids
    from linvid.video.io import write_video

    work_dir.mkdir(parents=True, exist_ok=True)
    models = {"teacher": work_dir / "teacher", "rwkv6-all": work_dir / "rwkv6-all"}
    if not all((path / "config.json").is_file() for path in models.values()):
        tokenizer = build_word_tokenizer([QUESTION, "red green blue"])
        torch.manual_seed(0)
        config = tiny_qwen2_5_vl_config(token_ids=token_ids(tokenizer))
        teacher = Qwen2_5_VLForConditionalGeneration(config).eval()
        teacher.save_pretrained(models["teacher"])
        linvid.convert(teacher, "rwkv6-all").save_pretrained(models["rwkv6-all"])
        for path in models.values():
            tokenizer.save_pretrained(path)
    videos = {}
    for count in frame_counts:
        path = work_dir / f"video_{count}.mp4"
        if not path.is_file():
            write_video(path, _moving_frames(count), fps=VIDEO_FPS)
        videos[count] = path
    return models, videos


def _moving_frames(count: int):
    """A smooth moving gradient, one (3, H, W) uint8 frame at a time (encodes fast)."""
    line = torch.linspace(0, 1, FRAME_SIZE)
    for index in range(count):
        phase = 2 * math.pi * index / 64
        red = (line[None, :] + 0.5 * math.sin(phase)).clamp(0, 1).expand(FRAME_SIZE, -1)
        green = (line[:, None] + 0.5 * math.cos(phase)).clamp(0, 1).expand(-1, FRAME_SIZE)
        blue = torch.full((FRAME_SIZE, FRAME_SIZE), 0.5 + 0.4 * math.sin(phase / 3))
        yield (torch.stack([red, green, blue]) * 255).to(torch.uint8)


def measure(model_dir: Path, video: Path, frames: int, chunk_frames: int) -> dict:
    """One `linvid ask` in a fresh process: its JSON result, its own peak resident set size
    (os.wait4's ru_maxrss, KiB on Linux) and its wall time."""
    read_end, write_end = os.pipe()
    command = [
        sys.executable, "-m", "linvid.cli", "ask", str(video), QUESTION,
        "--model", str(model_dir), "--num-frames", str(frames), "--json",
        "--min-pixels", str(FRAME_SIZE * FRAME_SIZE), "--max-pixels", str(FRAME_SIZE * FRAME_SIZE),
        "--max-new-tokens", "4", "--chunk-frames", str(chunk_frames),
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        output = reader.read()
    errors = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"linvid ask failed on {video}: {errors.strip()[-2000:]}")
    result = json.loads(output)
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    result["wall_seconds"] = wall
    return result


def run(work_dir: Path, frame_counts, chunk_frames: int = 32) -> dict:
    """Measure every (model, frames) pair; returns rows and the growth of each model's peak."""
    models, videos = prepare(work_dir, frame_counts)
    rows = []
    for name, model_dir in models.items():
        for count in frame_counts:
            result = measure(model_dir, videos[count], count, chunk_frames)
            rows.append(
                {
                    "model": name,
                    "frames": count,
                    "video_tokens": result["counts"]["video_tokens"],
                    "streamed": result["streamed"],
                    "peak_rss_mib": result["peak_rss_bytes"] / 2**20,
                    "wall_seconds": result["wall_seconds"],
                }
            )
    shortest, longest = min(frame_counts), max(frame_counts)
    growth = {}
    for name in models:
        peaks = {row["frames"]: row["peak_rss_mib"] for row in rows if row["model"] == name}
        growth[name] = peaks[longest] / peaks[shortest]
    return {"rows": rows, "growth": growth, "shortest": shortest, "longest": longest}


def markdown_table(result: dict) -> str:
    lines = [
        "| model | frames | video tokens | streamed | peak RSS (MiB) | peak / peak at "
        f"{result['shortest']} frames | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {
        row["model"]: row["peak_rss_mib"]
        for row in result["rows"]
        if row["frames"] == result["shortest"]
    }
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['frames']} | {row['video_tokens']} | "
            f"{'yes' if row['streamed'] else 'no'} | {row['peak_rss_mib']:.0f} | "
            f"{row['peak_rss_mib'] / base[row['model']]:.2f}x | {row['wall_seconds']:.1f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", default="256,1024,4096", help="comma-separated frame counts")
    parser.add_argument(
        "--work-dir",
        default=str(Path.home() / ".cache" / "linvid-bench-memory"),
        help="where models and videos are written once (default: %(default)s)",
    )
    parser.add_argument("--chunk-frames", type=int, default=32, help="streamed chunk size")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def main_from_arguments(arguments: argparse.Namespace) -> int:
    try:
        counts = sorted({int(part) for part in arguments.frames.split(",")})
    except ValueError:
        raise ValueError(
            f"--frames must be comma-separated integers, got {arguments.frames!r}"
        ) from None
    if counts[0] < 2:
        raise ValueError("--frames entries must be >= 2 (one temporal patch)")
    result = run(Path(arguments.work_dir), counts, arguments.chunk_frames)
    print(markdown_table(result))
    student = result["growth"]["rwkv6-all"]
    verdict = "met" if student <= 1.25 else "NOT met"
    print(
        f"\nrwkv6-all peak at {result['longest']} frames / at {result['shortest']}: "
        f"{student:.2f}x (goal <= 1.25x: {verdict}); teacher: {result['growth']['teacher']:.2f}x"
    )
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linvid.bench.memory", description=__doc__)
    add_arguments(parser)
    return main_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
