"""`linvid demo [--quick] [--out DIR] [--seed S]`: the whole linvid job on generated data.

Generates needle-in-a-haystack videos, trains (or reuses) a small Qwen2.5-VL teacher, converts
and distills the four papers' students, evaluates everything at 1x, 4x and 16x the training
length, times prefill and decoding, and writes RUN_DIR/report.md, report.json and PNGs.
The full run takes about 30 minutes on 2 CPU cores (`make demo`); --quick runs the same
pipeline at tiny sizes in a few minutes (its accuracies mean nothing).

RUN_DIR keeps every finished step (data, teacher, students, evaluations) under a key of its
settings, however RUN_DIR is spelled: after a Ctrl-C, or with more students, the same command
goes on from them and the log says which it reuses.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed")
    parser.add_argument(
        "--students",
        help="comma-separated presets to distill (default: all four)",
    )
    parser.add_argument(
        "--teacher-steps",
        type=int,
        help="the length of the teacher's lr schedule in steps (default 8000; it stops at "
        "the first check that meets every goal): a schedule by steps, so runs repeat",
    )
    parser.add_argument(
        "--teacher-seconds",
        type=float,
        help="wall-time cap on the teacher's training (default 1200; a run stopped by it is "
        "not repeatable, and the log says so)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")


def main_from_arguments(arguments: argparse.Namespace) -> int:
    from linvid.demo.pipeline import DemoConfig, run_demo
    from linvid.demo.report import summary_table

    changes = {"seed": arguments.seed, "threads": arguments.threads}
    if arguments.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {arguments.seed}")
    if arguments.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {arguments.threads}")
    if arguments.students:
        changes["students"] = tuple(name.strip() for name in arguments.students.split(","))
    if arguments.teacher_seconds is not None:
        if arguments.teacher_seconds <= 0:
            raise ValueError(f"--teacher-seconds must be > 0, got {arguments.teacher_seconds}")
        changes["teacher_seconds"] = arguments.teacher_seconds
    if arguments.teacher_steps is not None:
        if arguments.teacher_steps < 1:
            raise ValueError(f"--teacher-steps must be >= 1, got {arguments.teacher_steps}")
        changes["teacher_max_steps"] = arguments.teacher_steps
    config = (DemoConfig.quick if arguments.quick else DemoConfig.full)(**changes)
    try:
        report = run_demo(config, arguments.out)
    except KeyboardInterrupt:
        _forget_interrupted_exec()
        raise  # cli.main prints one line and exits 130
    print(
        summary_table(
            json.loads((report.parent / "report.json").read_text(), object_hook=_int_keys)
        )
    )
    print(f"report: {report}")
    return 0


def _forget_interrupted_exec() -> None:
    """Let cli.main's exit status 130 stand after a Ctrl-C. CPython remembers a
    KeyboardInterrupt that escaped an exec() of source text (dataclass and namedtuple
    creation use one, so a Ctrl-C during the demo's lazy imports can land there) and, at exit,
    kills the process with SIGINT instead of returning the status it was given (a parent sees
    -2, not 130), even though the interrupt was caught. Every such exec starts by clearing
    that record, so a trivial one forgets it."""
    exec("pass")


def _int_keys(mapping: dict) -> dict:
    return {int(key) if key.isdigit() else key: value for key, value in mapping.items()}
