"""The offline demo's teacher: a small Qwen2.5-VL trained from scratch on generated needle
videos (linvid.niah.generate), so the whole convert -> distill -> evaluate pipeline runs
without a model hub. Settings and their reasons: /work/shared/DEMO_TEACHER.md.

The teacher answers with the option's content (the colour word, the colours in order, the
count), and a multiple-choice question is scored by the option it finds likeliest
(`linvid.eval.options`). Training is time-boxed, stops early once a held-out check meets the
goals, and is cached: the output directory holds a fingerprint of the config, data and
training settings, and a later call with the same fingerprint reuses it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from linvid.eval.options import AnswerEncoder, evaluate
from linvid.eval.prompts import DEFAULT_CHAT_TEMPLATE
from linvid.models.qwen_video import PIXEL_STATISTICS_KEY, SYMMETRIC_MEAN, SYMMETRIC_STD
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids
from linvid.niah import generate

FINGERPRINT = "fingerprint.json"
METRICS = "metrics.jsonl"
# Held-out samples use seeds from here up; training seeds stay below (see training_seed).
HELD_OUT_SEED_BASE = 1_000_000_000
TRAINING_SEEDS_PER_RUN = 10_000_000
# Training's periodic checks use held-out seeds from HELD_OUT_SEED_BASE + CHECK_SEED_OFFSET,
# so reports (held_out_samples from offset 0) are not on the samples that chose when to stop.
CHECK_SEED_OFFSET = 100_000
# Held-out accuracy the teacher must reach (chance is 25%).
GOALS = {"retrieval": 0.9, "ordering": 0.7, "counting": 0.7}
# Training draws counting twice as often as each other task. Measured (one seed each, 200
# held-out questions per task): at 16 frames equal shares met the goals too (750 steps), but
# after the same 1,500 steps with the longer-video phase, 64-frame accuracy (retrieval /
# ordering / counting) was 100 / 86 / 90% with these shares against 100 / 70 / 78% with equal
# ones. (DEMO_TEACHER.md's 48% counting came from another generator.)
DEFAULT_TASK_WEIGHTS = {"retrieval": 1.0, "ordering": 1.0, "counting": 2.0}
# After the goals are met at 16 frames, training goes on with 16-, 32- and 64-frame batches in
# turn until they are met at every length. Measured: without this phase 64-frame accuracy was
# 100 / 26 / 32% (chance on ordering and counting); with it (500 more steps) 100 / 86 / 90%,
# and 100 / 79 / 66% at 256 frames, a length never trained.
DEFAULT_LONG_FRAMES = (32, 64)
# The architecture of DEMO_TEACHER.md.
TEACHER_ARCHITECTURE = {
    "num_layers": 4,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "mrope_section": (4, 6, 6),
    "vision_depth": 2,
    "vision_hidden_size": 64,
    "window_size": 112,
    "fullatt_block_indexes": (1,),
}


def build_tokenizer():
    """The word-level tokenizer of the task vocabulary, with Qwen2.5-VL's chat template."""
    tokenizer = build_word_tokenizer(generate.vocabulary())
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def teacher_config(tokenizer):
    """The teacher's Qwen2_5_VLConfig (DEMO_TEACHER.md's sizes) for `tokenizer`'s ids; video
    pixels are scaled to [-1, 1] (recorded in the config, see `pixel_statistics`)."""
    config = tiny_qwen2_5_vl_config(**TEACHER_ARCHITECTURE, token_ids=token_ids(tokenizer))
    setattr(
        config,
        PIXEL_STATISTICS_KEY,
        {"mean": list(SYMMETRIC_MEAN), "std": list(SYMMETRIC_STD)},
    )
    return config


def build_teacher(tokenizer, *, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A freshly initialised teacher (deterministic in `seed`)."""
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(teacher_config(tokenizer))


# ---------------------------------------------------------------------------------------------
# Samples and batches


def training_seed(run_seed: int, index: int) -> int:
    """The data seed of the index-th training sample of run `run_seed`; never a held-out
    seed (those start at HELD_OUT_SEED_BASE)."""
    if not 0 <= index < TRAINING_SEEDS_PER_RUN:
        raise ValueError(f"training sample index {index} out of range")
    seed = run_seed * TRAINING_SEEDS_PER_RUN + index
    if not 0 <= seed < HELD_OUT_SEED_BASE:
        raise ValueError(f"run seed {run_seed} gives training seeds outside [0, held-out)")
    return seed


def held_out_samples(
    num_frames: int,
    per_task: int,
    *,
    tasks: Sequence[str] = generate.TASKS,
    size: int = 56,
    offset: int = 0,
) -> list:
    """`per_task` held-out samples of each task (seeds HELD_OUT_SEED_BASE + offset + i), in
    task order. Training checks use offset CHECK_SEED_OFFSET; reports the default 0."""
    if per_task > CHECK_SEED_OFFSET and offset < CHECK_SEED_OFFSET:
        raise ValueError(f"at most {CHECK_SEED_OFFSET} report samples per task")
    return [
        generate.make_sample(task, num_frames, HELD_OUT_SEED_BASE + offset + index, size=size)
        for task in tasks
        for index in range(per_task)
    ]


def sample_batch(encoder: AnswerEncoder, samples: Sequence) -> dict:
    """Model inputs for training on NeedleSamples: the chat prompt (generate.prompt_text) with
    the video, then the answer's text and <|im_end|>, the only labelled tokens."""
    items = [
        encoder.item(generate.prompt_text(s), s.answer, encoder.video(s.frames), index=i)
        for i, s in enumerate(samples)
    ]
    return encoder.batch(items)


def evaluate_niah(model, tokenizer, samples, **kwargs) -> dict:
    """`linvid.eval.options.evaluate` on NeedleSamples (prompt: generate.prompt_text)."""
    return evaluate(model, tokenizer, samples, prompt=generate.prompt_text, **kwargs)


def local_model_directory(directory: str | os.PathLike, what: str = "model") -> Path:
    """`directory` as a Path once it is a local model directory (it holds config.json).
    Raises FileNotFoundError naming it otherwise, so that a missing or mistyped path is
    reported as such; the loaders below read it with local_files_only, never from a hub."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{what} directory {directory} is a file: expected a local directory saved with "
            "save_pretrained"
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} directory {directory} does not exist (expected a local directory saved "
            "with save_pretrained; linvid never looks model paths up on a model hub)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} directory {directory} holds no config.json: expected a directory saved "
            "with save_pretrained"
        )
    return path


def load_teacher(directory: str | os.PathLike):
    """(model, tokenizer) saved by `train_teacher`, the model in eval mode; local files only
    (`local_model_directory`)."""
    directory = local_model_directory(directory, "teacher")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, local_files_only=True)
    model.eval()
    return model, AutoTokenizer.from_pretrained(directory, local_files_only=True)


def held_out_accuracy(
    model, tokenizer, num_frames: int, per_task: int, *, size: int = 56, batch_questions: int = 4
) -> dict:
    """`evaluate_niah` on `per_task` held-out samples per task at `num_frames` frames."""
    samples = held_out_samples(num_frames, per_task, size=size)
    return evaluate_niah(model, tokenizer, samples, batch_questions=batch_questions)


class TaskSampler:
    """Training samples drawn fresh, seed by seed: each sample's task by `weights` (a seeded
    choice), its data from make_sample with `training_seed` (indices from `start`)."""

    def __init__(self, run_seed: int, weights: Mapping[str, float], size: int, *, start: int = 0):
        unknown = set(weights) - set(generate.TASKS)
        if unknown or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(f"task weights must be >= 0 over {generate.TASKS}, got {weights}")
        self.tasks = list(weights)
        total = sum(weights.values())
        self.probabilities = np.array([weights[task] / total for task in self.tasks])
        self.rng = np.random.default_rng((run_seed, 7, start))
        self.run_seed, self.size = run_seed, size
        self.index = start

    def take(self, count: int, num_frames: int) -> list:
        samples = []
        for _ in range(count):
            task = self.tasks[self.rng.choice(len(self.tasks), p=self.probabilities)]
            seed = training_seed(self.run_seed, self.index)
            samples.append(generate.make_sample(task, num_frames, seed, size=self.size))
            self.index += 1
        return samples


class TrainingBatches(torch.utils.data.IterableDataset):
    """An endless stream of training batches (`sample_batch` of `TaskSampler` draws), to make
    in a DataLoader worker while the model trains (one worker: the order is the seed's).
    Batch k has frame_counts[k % len(frame_counts)] frames (one length per batch: no padding
    between videos of different lengths)."""

    def __init__(self, tokenizer, config, run_seed, weights, frame_counts, size, batch_size, start):
        self.encoder = AnswerEncoder(tokenizer, config, sample_fps=generate.FRAMES_PER_SECOND)
        self.sampler_arguments = (run_seed, weights, size)
        self.frame_counts, self.batch_size, self.start = tuple(frame_counts), batch_size, start

    def __iter__(self):
        sampler = TaskSampler(*self.sampler_arguments, start=self.start)
        for number in itertools.count():
            frames = self.frame_counts[number % len(self.frame_counts)]
            yield sample_batch(self.encoder, sampler.take(self.batch_size, frames))


# ---------------------------------------------------------------------------------------------
# Training


def learning_rate_factor(
    step: int, progress: float, warmup_steps: int, final_fraction: float
) -> float:
    """Linear warmup over `warmup_steps`, then cosine from 1 to `final_fraction` as `progress`
    (the fraction of the budget used) goes from 0 to 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def training_settings(**settings) -> dict:
    """The settings that define a training run, JSON-normalised (tuples become lists)."""
    return json.loads(json.dumps(settings, sort_keys=True))


def fingerprint(tokenizer, seed: int, settings: Mapping) -> dict:
    """What a cached teacher was made from: the config, the data (vocabulary and a digest of
    one sample per task, so a changed generator shows) and the training settings."""
    config = teacher_config(tokenizer).to_dict()
    config.pop("transformers_version", None)
    digest = hashlib.sha256()
    for task in generate.TASKS:
        sample = generate.make_sample(task, settings["num_frames"], 0, size=settings["size"])
        digest.update(sample.frames.tobytes())
        digest.update(json.dumps([generate.prompt_text(sample), sample.answer]).encode())
    return json.loads(
        json.dumps(
            {
                "config": config,
                "data": {
                    "vocabulary": generate.vocabulary(),
                    "samples": digest.hexdigest(),
                    "frames_per_second": generate.FRAMES_PER_SECOND,
                },
                "seed": seed,
                "training": dict(settings),
            },
            sort_keys=True,
        )
    )


def cached_teacher(out_dir: str | os.PathLike, expected: Mapping) -> bool:
    """True if `out_dir` holds a finished teacher with fingerprint `expected`; False if it does
    not exist. Raises FileExistsError if it exists but was made otherwise (or never finished)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return False
    path = out_dir / FINGERPRINT
    if not path.is_file():
        raise FileExistsError(
            f"{out_dir} exists but holds no {FINGERPRINT} (not a finished teacher); remove it or "
            "choose another directory"
        )
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored != expected:
        changed = sorted(key for key in expected if stored.get(key) != expected[key])
        raise FileExistsError(
            f"{out_dir} holds a teacher made with other {', '.join(changed) or 'settings'}; "
            "remove it or choose another directory"
        )
    return True


def train_teacher(
    out_dir: str | os.PathLike,
    *,
    seconds: float = 600,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.98),
    weight_decay: float = 0.01,
    warmup_steps: int = 50,
    final_lr_fraction: float = 0.02,
    grad_clip: float = 1.0,
    num_frames: int = 16,
    long_frames: Sequence[int] = DEFAULT_LONG_FRAMES,
    size: int = 56,
    task_weights: Mapping[str, float] | None = None,
    check_every: int = 500,
    check_per_task: int = 50,
    goals: Mapping[str, float] | None = None,
    max_steps: int | None = None,
    threads: int | None = 1,
    data_worker: bool = True,
    log_every: int = 50,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the demo teacher into `out_dir` (or reuse it: see `cached_teacher`) and return it.

    AdamW(lr, betas, weight_decay), `warmup_steps` linear warmup then cosine to
    final_lr_fraction * lr over `max_steps` steps (repeatable: the same seed and settings
    train the same teacher), `seconds` then only caps the wall time; without max_steps the
    cosine runs over the `seconds` budget (depends on the machine's speed),
    gradient clipping at `grad_clip`, batches of `batch_size` fresh samples at `num_frames`
    frames of size x size, tasks drawn by `task_weights` (default DEFAULT_TASK_WEIGHTS).
    Every `check_every` steps `check_per_task` held-out samples per task are scored; training
    stops once every task meets `goals` (default GOALS). long_frames: a second phase for
    longer videos: once the goals are met at num_frames, batches cycle through
    (num_frames, *long_frames) frames and the checks cover every length, until the goals are
    met at all of them or the budget ends. Writes the model, tokenizer,
    metrics.jsonl (one line per log and check) and, last, fingerprint.json, in a temporary
    directory renamed to out_dir when done, so an interrupted run leaves no finished-looking
    directory.

    threads: torch threads for the model. data_worker: make batches in a DataLoader worker
    process. On 2 cores shared with other work, 1 thread + 1 worker was several times faster
    than 2 threads making batches in line (measured: 2 threads were 7x slower per step under
    load). Neither changes the samples, so neither is in the fingerprint.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    goals = dict(GOALS if goals is None else goals)
    weights = dict(task_weights or DEFAULT_TASK_WEIGHTS)
    settings = training_settings(
        seconds=seconds,
        batch_size=batch_size,
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        final_lr_fraction=final_lr_fraction,
        grad_clip=grad_clip,
        num_frames=num_frames,
        long_frames=[f for f in dict.fromkeys(long_frames) if f != num_frames],
        size=size,
        task_weights=weights,
        check_every=check_every,
        check_per_task=check_per_task,
        goals=goals,
        max_steps=max_steps,
    )
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    expected = fingerprint(tokenizer, seed, settings)
    if cached_teacher(out_dir, expected):
        log(f"teacher: reusing {out_dir} (same config, data and training settings)")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    caller_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = build_teacher(tokenizer, seed=seed)
        summary = _train(
            model, tokenizer, work / METRICS, seed, settings, goals, log, log_every, data_worker
        )
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
        (work / FINGERPRINT).write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(work, out_dir)
        except OSError:
            if not cached_teacher(out_dir, expected):  # another run finished first
                raise
            shutil.rmtree(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(caller_threads)
    log(f"teacher: saved to {out_dir}")
    return out_dir


def _train(model, tokenizer, metrics_path, seed, settings, goals, log, log_every, data_worker):
    """The training loop; phase 1 at num_frames, then (with long_frames, once phase 1's check
    passes) phase 2 on batches cycling through (num_frames, *long_frames)."""
    encoder = AnswerEncoder(tokenizer, model.config, sample_fps=generate.FRAMES_PER_SECOND)
    size, base = settings["size"], settings["num_frames"]

    def batches_of(frame_counts, start):
        stream = TrainingBatches(
            tokenizer,
            model.config,
            seed,
            settings["task_weights"],
            frame_counts,
            size,
            settings["batch_size"],
            start,
        )
        if not data_worker:
            return iter(stream)
        return iter(
            torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=8)
        )

    def check_set(frames):
        return held_out_samples(
            frames, settings["check_per_task"], size=size, offset=CHECK_SEED_OFFSET
        )

    batches = batches_of((base,), 0)
    checks = {base: check_set(base)}
    phase, phase_two_step = 1, None
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings["lr"],
        betas=tuple(settings["betas"]),
        weight_decay=settings["weight_decay"],
    )
    budget, max_steps = settings["seconds"], settings["max_steps"]
    model.train()
    start = time.perf_counter()
    checking = 0.0  # seconds spent on held-out checks (not training throughput)
    window_loss, window_steps, window_start = 0.0, 0, start
    step, passed, last_check = 0, False, None
    with open(metrics_path, "w", encoding="utf-8") as metrics:

        def record(entry):
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

        while True:
            elapsed = time.perf_counter() - start
            # With max_steps the schedule runs by steps, so that two runs train the same
            # teacher; the time budget only caps the run (and says so: the cap makes it
            # depend on the machine's speed). Without max_steps the budget is the schedule.
            progress = step / max_steps if max_steps else elapsed / budget
            if passed or progress >= 1:
                break
            if elapsed >= budget:
                if max_steps:
                    log(
                        f"time budget of {budget:g} s reached at step {step} of {max_steps}: "
                        "stopped early (a run that stops on time is not repeatable)"
                    )
                break
            factor = learning_rate_factor(
                step, progress, settings["warmup_steps"], settings["final_lr_fraction"]
            )
            for group in optimizer.param_groups:
                group["lr"] = settings["lr"] * factor
            batch = next(batches)
            loss = model(**batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
            optimizer.step()
            step += 1
            window_loss += loss.item()
            window_steps += 1
            if step % log_every == 0:
                now = time.perf_counter()
                rate = window_steps * settings["batch_size"] / (now - window_start)
                entry = {
                    "step": step,
                    "phase": phase,
                    "loss": round(window_loss / window_steps, 5),
                    "lr": settings["lr"] * factor,
                    "samples_per_second": round(rate, 2),
                    "elapsed": round(now - start, 2),
                }
                record(entry)
                log(
                    f"step {step:6d}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                    f"{rate:6.1f} samples/s  {entry['elapsed']:.0f}s"
                )
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if step % settings["check_every"] == 0:
                began = time.perf_counter()
                last_check = {}
                for frames, samples in checks.items():
                    accuracy = evaluate_niah(model, tokenizer, samples, encoder=encoder)
                    last_check[frames] = {t: accuracy["accuracy"][t] for t in generate.TASKS}
                model.train()
                checking += time.perf_counter() - began
                passed = all(
                    scores[task] >= goal
                    for scores in last_check.values()
                    for task, goal in goals.items()
                )
                record({"step": step, "check": last_check, "passed": passed})
                for frames, scores in last_check.items():
                    shown = "  ".join(f"{task} {value:.2f}" for task, value in scores.items())
                    log(f"check at step {step}, {frames} frames: {shown}")
                if passed and phase == 1 and settings["long_frames"]:
                    phase, phase_two_step, passed = 2, step, False
                    counts = (base, *settings["long_frames"])
                    del batches  # stops its worker
                    batches = batches_of(counts, TRAINING_SEEDS_PER_RUN // 2)
                    checks.update({frames: check_set(frames) for frames in counts})
                    record({"step": step, "phase": 2, "frame_counts": list(counts)})
                    log(f"goals met at {base} frames; phase 2 on {counts} frames")
                elif passed:
                    log("goals met")
                window_start += time.perf_counter() - began
    wall = time.perf_counter() - start
    return {
        "steps": step,
        "samples": step * settings["batch_size"],
        "seconds": round(wall, 1),
        "seconds_checking": round(checking, 1),
        "samples_per_second": round(step * settings["batch_size"] / max(wall - checking, 1e-9), 2),
        "phase_two_from_step": phase_two_step,
        "last_check": last_check,
        "goals_met": passed,
        "threads": torch.get_num_threads(),
    }
