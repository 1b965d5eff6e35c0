"""`linvid demo`: the papers' experiment at a size that runs on 2 CPU cores, end to end.

  1. data      needle-in-a-haystack conversations for distillation (`linvid niah generate`)
  2. teacher   a small Qwen2.5-VL trained from scratch on fresh needle videos, cached
               (`linvid.niah.teacher`; reused when its config, data and settings match)
  3. students  each preset converted from the teacher and distilled with its paper's demo
               recipe (`linvid distill`), all four sharing one vision feature cache
  4. evaluate  held-out accuracy per task at the training length and at 4x and 16x as many
               frames, VNBench's circular rule (right under all 4 option rotations),
               options scored by likelihood (`linvid.eval.options`)
  5. speed     prefill time (TTFT with and without the vision tower), decode tokens/s and
               cache bytes against the number of frames (`linvid.bench.models` protocol)
  6. report    RUN_DIR/report.md, report.json and PNGs (`linvid.demo.report`)

Every number in the report comes from this run (or the cached teacher's own training log);
`--quick` runs the same steps at tiny sizes. A step that finished is not redone when the run
is started again with the same settings (each writes its result file last, atomically).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from linvid.demo.students import STUDENTS, InferenceSettings, StudentView, inference_settings

TASKS = ("retrieval", "ordering", "counting")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run. `full()` is `make demo`; `quick()` is `linvid demo --quick`."""

    name: str
    seed: int = 0
    train_frames: int = 16
    eval_frames: tuple[int, ...] = (16, 64, 256)  # 1x, 4x, 16x the training length
    eval_per_task: tuple[int, ...] = (48, 24, 12)  # held-out questions per task, per length
    distill_per_task: int = 1000  # distillation conversations per task
    teacher_seconds: float = 600.0
    teacher_max_steps: int | None = None
    teacher_check_every: int = 500
    stage_steps: int | None = None  # None: the recipes' own steps
    stage_batch_size: int | None = None
    students: tuple[str, ...] = tuple(STUDENTS)
    speed_frames: tuple[int, ...] = (16, 64, 256, 1024, 4096)
    decode_tokens: int = 32
    depth_bins: int = 4
    threads: int = 2

    @staticmethod
    def full(**changes) -> DemoConfig:
        return dataclasses.replace(DemoConfig(name="full"), **changes)

    @staticmethod
    def quick(**changes) -> DemoConfig:
        quick = DemoConfig(
            name="quick",
            eval_frames=(16, 32),
            eval_per_task=(2, 1),
            distill_per_task=2,
            teacher_seconds=60.0,
            teacher_max_steps=8,
            teacher_check_every=1000,
            stage_steps=1,
            stage_batch_size=2,
            speed_frames=(16, 32),
            decode_tokens=4,
        )
        return dataclasses.replace(quick, **changes)

    def __post_init__(self):
        if len(self.eval_frames) != len(self.eval_per_task):
            raise ValueError(
                f"eval_frames {self.eval_frames} and eval_per_task {self.eval_per_task} must "
                "have one entry each"
            )
        unknown = [name for name in self.students if name not in STUDENTS]
        if unknown:
            raise ValueError(f"unknown students {unknown}; expected some of {list(STUDENTS)}")
        if self.train_frames not in self.eval_frames:
            raise ValueError(f"eval_frames {self.eval_frames} must include train_frames")


class StepTimer:
    """Wall time of every step, logged as it ends."""

    def __init__(self, log):
        self.seconds: dict[str, float] = {}
        self.log = log

    def run(self, name: str, work):
        started = time.perf_counter()
        self.log(f"[demo] {name} ...")
        result = work()
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.log(f"[demo] {name} done in {self.seconds[name]:.1f} s")
        return result


def _write_json(path: Path, value) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _settings_hash(**settings) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Steps


def make_data(config: DemoConfig, out: Path) -> dict:
    """Distillation conversations at the training length (seed config.seed + 1; the teacher
    trains on its own fresh samples and the evaluation uses held-out seeds)."""
    from linvid.niah.dataset import write_dataset

    key = _settings_hash(per_task=config.distill_per_task, frames=config.train_frames)
    directory = out / "data" / f"train-{key}"
    done = directory / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    written = write_dataset(
        directory,
        tasks=TASKS,
        frames=(config.train_frames,),
        n=config.distill_per_task,
        seed=config.seed + 1,
    )
    _write_json(done, written)
    return written


def teacher_settings(config: DemoConfig) -> dict:
    return {
        "seconds": config.teacher_seconds,
        "seed": config.seed,
        "num_frames": config.train_frames,
        "max_steps": config.teacher_max_steps,
        "check_every": config.teacher_check_every,
    }


def train_teacher(config: DemoConfig, out: Path, log) -> Path:
    from linvid.niah.teacher import train_teacher as train

    settings = teacher_settings(config)
    directory = out / f"teacher-{_settings_hash(**settings)}"
    # One torch thread with batches made in a worker process: measured several times faster
    # than 2 threads on 2 shared cores (linvid.niah.teacher.train_teacher).
    return train(directory, threads=1, log=log, **settings)


def scaled_recipe(config: DemoConfig, preset: str):
    """The student's demo recipe with the run's stage length and batch, when it sets them."""
    from linvid.demo.students import student_recipe

    recipe = student_recipe(preset)
    changes = {}
    if config.stage_steps is not None:
        changes.update(steps=config.stage_steps, epochs=None)
    if config.stage_batch_size is not None:
        changes.update(batch_size=config.stage_batch_size, gradient_accumulation=1)
    if changes:
        stages = []
        for stage in recipe.stages:
            stage = dataclasses.replace(stage, **changes)
            if recipe.transv is not None and stage.transv is not False:
                # TransV takes one prompt length per call: one sample per micro-batch.
                stage = dataclasses.replace(stage, gradient_accumulation=stage.batch_size)
            stages.append(stage)
        recipe = dataclasses.replace(recipe, stages=tuple(stages))
    return recipe


def distill_student(config: DemoConfig, out: Path, teacher: Path, data: dict, preset: str):
    """Convert and distill one preset; returns (student directory, summary)."""
    from linvid.distill.trainer import RunOptions, distill

    recipe = scaled_recipe(config, preset)
    # A changed recipe (or teacher) distills anew instead of reusing an older student.
    key = _settings_hash(recipe=dataclasses.asdict(recipe), teacher=str(teacher), data=data)
    run = out / "students" / f"{preset}-{key}"
    summary_path = run / "summary.json"
    if summary_path.is_file() and (run / "student").is_dir():
        return run / "student", json.loads(summary_path.read_text())
    resume = (run / "checkpoints").is_dir()  # an unfinished run: continue it
    size = 56 * 56
    options = RunOptions(
        teacher=str(teacher),
        data=data["conversations"],
        out=str(run),
        plan=preset,
        resume=resume,
        checkpoint_every=50,
        seed=config.seed,
        num_frames=config.train_frames,
        min_pixels=size,
        max_pixels=size,
        feature_cache_dir=str(out / "vision_features"),
    )
    started = time.perf_counter()
    destination = distill(recipe, options)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "preset": preset,
        "recipe": recipe.name,
        "paper": STUDENTS[preset][1],
        "stages": [
            {
                "name": stage.name,
                "steps": stage.steps,
                "batch_size": stage.batch_size,
                "learning_rate": stage.learning_rate,
                "losses": {k: v for k, v in stage.losses.items() if v > 0},
                "final": {
                    k: v
                    for k, v in ([r for r in rows if r["stage"] == stage.name] or [{}])[-1].items()
                    if k in ("kl", "ce", "hidden", "sequence")
                },
            }
            for stage in recipe.stages
        ],
        "steps": len(rows),
        "seconds": round(time.perf_counter() - started, 2),
        "inference": dataclasses.asdict(inference_settings(recipe)),
    }
    _write_json(summary_path, summary)
    return destination, summary


def rotations(sample) -> list:
    from linvid.niah.scoring import rotate_options

    return [rotate_options(sample, shift) for shift in range(len(sample.options))]


def evaluate_model(model, tokenizer, settings: InferenceSettings, config: DemoConfig, log):
    """Held-out records at every evaluation length: one per question, correct under VNBench's
    circular rule (the options scored in all 4 rotations)."""
    from linvid.eval.options import AnswerEncoder, evaluate
    from linvid.niah.generate import FRAMES_PER_SECOND, prompt_text
    from linvid.niah.scoring import depth_bin
    from linvid.niah.teacher import held_out_samples

    encoder = AnswerEncoder(
        tokenizer, model.config, style=settings.prompt_style, sample_fps=FRAMES_PER_SECOND
    )
    prepare = StudentView(settings)
    records = []
    for frames, per_task in zip(config.eval_frames, config.eval_per_task, strict=True):
        started = time.perf_counter()
        for sample in held_out_samples(frames, per_task):
            rotated = rotations(sample)
            result = evaluate(
                model,
                tokenizer,
                rotated,
                prompt=prompt_text,
                encoder=encoder,
                batch_questions=len(rotated),  # rows are grouped by prompt length anyway
                prepare=prepare,
            )
            picks = [record["correct"] for record in result["records"]]
            records.append(
                {
                    "task": sample.task,
                    "frames": frames,
                    "depth": sample.depth,
                    "depth_bin": depth_bin(sample.depth, config.depth_bins),
                    "correct": all(picks),
                    "single_try_correct": picks[0],
                }
            )
        log(f"  {frames} frames: {per_task} per task in {time.perf_counter() - started:.1f} s")
    return records


def measure_speed(model, tokenizer, config: DemoConfig, settings: InferenceSettings) -> list:
    """`linvid bench models`' protocol on a trained model: random video patches of each
    length (56x56 frames), TTFT with and without the vision tower, decode tokens/s over
    config.decode_tokens greedy tokens, cache bytes after the prefill."""
    from linvid.bench.models import PeakMemory, measure_point

    vision = model.config.vision_config
    tokens = (56 // (vision.patch_size * vision.spatial_merge_size)) ** 2
    variant = "tome" if settings.merges_frames else "base"
    kept = settings.tokens_per_frame or max(1, round((settings.keep_ratio or 1.0) * tokens))
    memory = PeakMemory(torch.device("cpu"))
    rows = []
    for frames in config.speed_frames:
        temporal = frames // vision.temporal_patch_size
        row = measure_point(
            model,
            tokenizer,
            model.config,
            variant,
            temporal,
            tokens,
            config.decode_tokens,
            torch.device("cpu"),
            memory,
            tome_tokens_per_frame=kept,
        )
        rows.append({**row, "temporal_patches": row["frames"], "frames": frames})
    return rows


def evaluate_and_time(name: str, directory: Path, settings: InferenceSettings, config, log):
    from transformers import AutoTokenizer

    import linvid

    if name == "teacher":
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory)
    else:
        model = linvid.load(directory)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    log(f"[demo] evaluate {name} ({settings.describe()})")
    records = evaluate_model(model, tokenizer, settings, config, log)
    speed = measure_speed(model, tokenizer, config, settings)
    return {"records": records, "speed": speed}


def machine() -> dict:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run_demo(config: DemoConfig, out: str | os.PathLike, log=None) -> Path:
    """Run every step into `out`; returns the report's path (report.md)."""
    from linvid.demo.report import write_report

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    timer = StepTimer(log)
    data = timer.run("data", lambda: make_data(config, out))
    teacher = timer.run("teacher", lambda: train_teacher(config, out, log))
    students = {}
    for preset in config.students:
        students[preset] = timer.run(
            f"distill {preset}",
            lambda preset=preset: distill_student(config, out, teacher, data, preset),
        )
    results = {}
    results["teacher"] = timer.run(
        "evaluate teacher",
        lambda: evaluate_and_time("teacher", teacher, InferenceSettings(), config, log),
    )
    for preset, (directory, summary) in students.items():
        settings = InferenceSettings(**summary["inference"])
        results[preset] = timer.run(
            f"evaluate {preset}",
            lambda preset=preset, directory=directory, settings=settings: evaluate_and_time(
                preset, directory, settings, config, log
            ),
        )
    teacher_log = _teacher_summary(teacher)
    from linvid.niah.teacher import HELD_OUT_SEED_BASE

    seeds = {
        "teacher_model_and_training_data": config.seed,
        "distillation_data": config.seed + 1,
        "distillation_runs": config.seed,
        "held_out_questions_from": HELD_OUT_SEED_BASE,
    }
    return write_report(
        out,
        config={**dataclasses.asdict(config), "seeds": seeds},
        machine=machine(),
        steps=timer.seconds,
        teacher=teacher_log,
        students={preset: summary for preset, (_, summary) in students.items()},
        results=results,
    )


def _teacher_summary(directory: Path) -> dict:
    summary = {"directory": str(directory)}
    training = directory / "training.json"
    if training.is_file():
        summary["training"] = json.loads(training.read_text())
    return summary


__all__ = ["DemoConfig", "run_demo"]
