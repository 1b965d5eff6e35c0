"""Write needle-in-a-video-haystack data to disk: one mp4 per sample, `vnbench.jsonl` (the
questions, VNBench-style, for evaluation) and `conversations.jsonl` (the same questions with
their answers as LLaVA-Video-style conversations, for training: linvid.distill.data reads it).

`linvid niah generate --out DIR --tasks retrieval,ordering,counting --frames 16:256 --n N`
writes N samples for every (task, frame count). --frames takes a count (32), a list (16,64)
or a range A:B, which means A, 2A, 4A, ... up to B (16:256 is 16, 32, 64, 128, 256).

Videos: DIR/videos/<task>_<frames>_<index>.mp4, H.264 at crf 0 (x264 lossless on the YUV
planes) in yuv420p, one frame per second by default, so that readers sampling at 1 fps (the
distillation dataset's default) get every frame and a needle's time in seconds is its frame
index. The 4:2:0 chroma subsampling only blurs a needle's outline by a pixel or two; its
inside keeps its colour within a few levels (tests/niah check this through load_video).

The output follows linvid's rule (linvid/outputs.py): the whole directory is built as
`.DIR.partial-*` beside DIR and renamed into place when every video and both JSONLs are
written, so DIR holds one complete run or stays as it was (an interrupted run removes the
partial directory); a non-empty DIR is replaced only with --overwrite, and then wholly (no
videos of the earlier run are left behind).
"""

from __future__ import annotations

import argparse
import json
import os
import string
from collections.abc import Sequence

from linvid.bench.models import parse_counts
from linvid.distill.data import VIDEO_MARKER
from linvid.niah.generate import (
    FRAMES_PER_SECOND,
    TASKS,
    NeedleSample,
    make_sample,
    minimum_frames,
    prompt_text,
)
from linvid.outputs import atomic_directory, atomic_write_text
from linvid.video.io import write_video

SEED_STRIDE = 1_000_000  # sample i of a run with --seed S has seed S * SEED_STRIDE + i
VIDEO_DIR = "videos"
VNBENCH_FILE = "vnbench.jsonl"
CONVERSATIONS_FILE = "conversations.jsonl"


def parse_tasks(text: str) -> tuple[str, ...]:
    """ "retrieval,ordering" -> ("retrieval", "ordering"); "all" -> TASKS."""
    if text.strip() == "all":
        return TASKS
    tasks = tuple(part.strip() for part in text.split(","))
    bad = [task for task in tasks if task not in TASKS]
    if bad or not tasks:
        raise ValueError(
            f"--tasks must be a comma-separated subset of {','.join(TASKS)} (or all), "
            f"got {text!r}" + (f": unknown {', '.join(map(repr, bad))}" if bad else "")
        )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks names a task twice: {text!r}")
    return tasks


def parse_frames(text: str) -> tuple[int, ...]:
    """Frame counts: "32" -> (32,); "16,48" -> (16, 48); "A:B" -> A, 2A, 4A, ... <= B."""
    return tuple(parse_counts(text, "--frames"))


def vnbench_record(sample: NeedleSample, video: str, seed: int, fps: float) -> dict:
    """A VNBench-style annotation: gt is the answer text, gt_option its letter among
    options, needle_time each needle event's start in seconds."""
    return {
        "video": video,
        "type": sample.task,
        "question": sample.question,
        "options": list(sample.options),
        "gt": sample.answer,
        "gt_option": string.ascii_uppercase[sample.answer_index],
        "answer_index": sample.answer_index,
        "needle_time": [start / fps for start in sample.events],
        "needle_frames": list(sample.needle_frames),
        "num_frames": sample.num_frames,
        "depth": sample.depth,
        "style": sample.style,
        "seed": seed,
        "size": sample.frames.shape[1],
        "fps": fps,
    }


def conversation_record(sample: NeedleSample, video: str) -> dict:
    """The sample as a one-turn conversation in linvid.distill.data's format."""
    return {
        "video": video,
        "conversations": [
            {"from": "human", "value": f"{VIDEO_MARKER}\n{prompt_text(sample)}"},
            {"from": "gpt", "value": sample.answer},
        ],
    }


def write_dataset(
    out: str | os.PathLike,
    *,
    tasks: Sequence[str] = TASKS,
    frames: Sequence[int] = (16,),
    n: int = 1,
    seed: int = 0,
    size: int = 56,
    fps: float = FRAMES_PER_SECOND,
    crf: int = 0,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Generate n samples for every (frame count, task) into `out` (see the module's doc);
    deterministic in the arguments. Returns {"samples", "vnbench", "conversations", "videos"}
    (the count and the paths written).

    `out` must be missing or empty unless `overwrite` (linvid.outputs.OutputExistsError
    otherwise); it is built whole in a partial directory beside it and renamed into place at
    the end, so an error or interrupt leaves an earlier `out` exactly as it was."""
    tasks, frames = tuple(tasks), tuple(frames)
    _check_arguments(tasks, frames, n, seed, size, fps, crf)
    out = os.fspath(out)
    jobs = [(count, task, index) for count in frames for task in tasks for index in range(n)]
    vnbench, conversations = [], []
    width = max(4, len(str(max(frames))))
    with atomic_directory(out, overwrite=overwrite) as work:
        (work / VIDEO_DIR).mkdir()
        if progress:
            from tqdm import tqdm

            jobs = tqdm(jobs, desc="niah", unit="video")
        for count, task, index in jobs:
            sample_seed = seed * SEED_STRIDE + index
            sample = make_sample(task, count, sample_seed, size=size)
            video = f"{VIDEO_DIR}/{task}_{count:0{width}d}_{index:06d}.mp4"
            write_video(work / video, sample.frames, fps, crf=crf, options={"preset": "veryfast"})
            vnbench.append(vnbench_record(sample, video, sample_seed, fps))
            conversations.append(conversation_record(sample, video))
        for name, records in ((VNBENCH_FILE, vnbench), (CONVERSATIONS_FILE, conversations)):
            atomic_write_text(work / name, "".join(json.dumps(r) + "\n" for r in records))
    return {
        "samples": len(vnbench),
        "vnbench": os.path.join(out, VNBENCH_FILE),
        "conversations": os.path.join(out, CONVERSATIONS_FILE),
        "videos": os.path.join(out, VIDEO_DIR),
    }


def _check_arguments(tasks, frames, n, seed, size, fps, crf) -> None:
    if not tasks:
        raise ValueError("tasks must name at least one task")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
        if not frames or min(frames) < minimum_frames(task):
            raise ValueError(
                f"task {task!r} needs at least {minimum_frames(task)} frames, "
                f"got frame counts {list(frames)}"
            )
    if not 1 <= n <= SEED_STRIDE:
        raise ValueError(f"n (samples per task and frame count) must be in 1..{SEED_STRIDE}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 16 or size % 2:
        raise ValueError(
            f"size must be even and >= 16 (video encoders need even sides), got {size}"
        )
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in 0..51 (x264's quality; 0 is lossless), got {crf}")


# ---------------------------------------------------------------------------------------------
# `linvid niah generate`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        help="output directory: missing or empty, or replaced whole with --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out (its old videos and JSONLs go)",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="comma-separated tasks, or all (default: %(default)s)",
    )
    parser.add_argument(
        "--frames",
        default="16",
        help="frame counts: 32, a list 16,64, or a doubling range A:B (16:256 = 16,32,64,128,256;"
        " default: %(default)s)",
    )
    parser.add_argument(
        "--n", type=int, default=100, help="samples per task and frame count (default: 100)"
    )
    parser.add_argument("--seed", type=int, default=0, help="run seed (default: 0)")
    parser.add_argument("--size", type=int, default=56, help="frame side in pixels (default: 56)")
    parser.add_argument(
        "--fps",
        type=float,
        default=FRAMES_PER_SECOND,
        help="frame rate written to the videos (default: 1)",
    )
    parser.add_argument(
        "--crf", type=int, default=0, help="x264 quality, 0 (lossless, default) .. 51"
    )


def main_from_arguments(arguments: argparse.Namespace) -> int:
    summary = write_dataset(
        arguments.out,
        tasks=parse_tasks(arguments.tasks),
        frames=parse_frames(arguments.frames),
        n=arguments.n,
        seed=arguments.seed,
        size=arguments.size,
        fps=arguments.fps,
        crf=arguments.crf,
        progress=True,
        overwrite=arguments.overwrite,
    )
    print(
        f"wrote {summary['samples']} videos to {summary['videos']}, "
        f"{summary['vnbench']} and {summary['conversations']}"
    )
    return 0
