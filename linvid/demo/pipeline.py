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
is started again with the same settings (each writes its result file last, atomically, and
the log says which steps it reuses), so after a Ctrl-C the same command goes on from the
finished steps. A step's key hashes only its settings and the keys of the steps it reads,
never the spelling of the run directory: `--out demo` and `--out /abs/path/demo` share them.
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
from linvid.outputs import atomic_write_text

TASKS = ("retrieval", "ordering", "counting")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run. `full()` is `make demo`; `quick()` is `linvid demo --quick`."""

    name: str
    seed: int = 0
    train_frames: int = 16
    eval_frames: tuple[int, ...] = (16, 64, 256)  # 1x, 4x, 16x the training length
    eval_per_task: tuple[int, ...] = (48, 24, 12)  # held-out questions per task, per length
    distill_per_task: int = 1000  # distillation conversations per task, over distill_frames
    # The students distill on the teacher's own training lengths (16, then 16 / 32 / 64
    # frames: linvid.niah.teacher's phases), a third of the conversations at each.
    distill_frames: tuple[int, ...] = (16, 32, 64)
    # The teacher's schedule runs by steps (repeatable); the seconds only cap it on a slow
    # machine, and it stops at the first check every goal passes. The cosine spans 8000 steps
    # of 8 samples: the README's earlier run met every check at step 2000 with its lr a
    # quarter into a time-based cosine (296 s of 1200), i.e. this schedule; a cosine over 2000
    # steps (issue 15's first try) decays 4x sooner and failed ordering at 32 / 64 frames
    # (0.60 / 0.28 at step 2000).
    teacher_seconds: float = 1200.0
    teacher_max_steps: int | None = 8000
    teacher_check_every: int = 500
    stage_steps: int | None = None  # None: the recipes' own steps
    stage_batch_size: int | None = None
    students: tuple[str, ...] = tuple(STUDENTS)
    speed_frames: tuple[int, ...] = (16, 64, 256, 1024, 4096)
    decode_tokens: int = 32
    depth_bins: int = 4
    diagnosis_per_task: int = 4  # held-out questions per task and length for the diagnosis
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
            distill_frames=(16, 32),
            teacher_seconds=60.0,
            teacher_max_steps=8,
            teacher_check_every=1000,
            stage_steps=1,
            stage_batch_size=2,
            speed_frames=(16, 32),
            decode_tokens=4,
            diagnosis_per_task=1,
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
        if self.diagnosis_per_task < 1:
            raise ValueError(f"diagnosis_per_task must be >= 1, got {self.diagnosis_per_task}")
        if not self.distill_frames or min(self.distill_frames) < 2:
            raise ValueError(f"distill_frames must be frame counts >= 2, got {self.distill_frames}")


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
    """Write JSON atomically (linvid.outputs.atomic_write_text: a temporary file renamed into
    place)."""
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _settings_hash(**settings) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Steps


def make_data(config: DemoConfig, out: Path, log=None) -> dict:
    """Distillation conversations at the lengths of config.distill_frames, an equal share of
    config.distill_per_task at each (seed config.seed + 1; the teacher
    trains on its own fresh samples and the evaluation uses held-out seeds), in
    RUN_DIR/data/train-KEY. Returns {"directory", "samples", "vnbench", "conversations",
    "videos"}, paths under `out` as spelled (done.json stores no path, so a run directory
    read through another spelling, or moved, still finds its data)."""
    from linvid.niah.dataset import CONVERSATIONS_FILE, VIDEO_DIR, VNBENCH_FILE, write_dataset

    log = log or _log
    seed = config.seed + 1
    frames = tuple(config.distill_frames)
    per_length = max(1, config.distill_per_task // len(frames))
    key = _settings_hash(per_task=per_length, frames=frames, seed=seed)
    directory = out / "data" / f"train-{key}"
    done = directory / "done.json"
    if done.is_file():
        samples = json.loads(done.read_text())["samples"]
        log(f"[demo] data: reusing {directory} (finished earlier with the same settings)")
    else:
        # write_dataset builds the directory whole (a partial one beside it, renamed at the
        # end); one that exists without done.json is an older version's unfinished run.
        written = write_dataset(
            directory,
            tasks=TASKS,
            frames=frames,
            n=per_length,
            seed=seed,
            overwrite=directory.exists(),
        )
        samples = written["samples"]
        _write_json(done, {"samples": samples})
    return {
        "directory": str(directory),
        "samples": samples,
        "vnbench": str(directory / VNBENCH_FILE),
        "conversations": str(directory / CONVERSATIONS_FILE),
        "videos": str(directory / VIDEO_DIR),
    }


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


def distill_student(
    config: DemoConfig, out: Path, teacher: Path, data: dict, preset: str, log=None
):
    """Convert and distill one preset into RUN_DIR/students/PRESET-KEY; returns (student
    directory, summary). KEY hashes the recipe and the keyed names of the teacher and data
    directories (which hash their own settings), not their paths."""
    from linvid.distill.trainer import RunOptions, distill
    from linvid.niah.generate import FRAMES_PER_SECOND

    log = log or _log
    recipe = scaled_recipe(config, preset)
    # A changed recipe (or teacher, or data) distills anew instead of reusing an older student.
    key = _settings_hash(
        recipe=dataclasses.asdict(recipe),
        teacher=Path(teacher).name,
        data=Path(data["directory"]).name,
    )
    run = out / "students" / f"{preset}-{key}"
    summary_path = run / "summary.json"
    if summary_path.is_file() and (run / "student").is_dir():
        log(f"[demo] distill {preset}: reusing {run} (finished earlier with the same settings)")
        return run / "student", json.loads(summary_path.read_text())
    # An unfinished run (interrupted) goes on: from its newest checkpoint, or from step 0 when
    # it stopped before the first. One that saved its student but not the demo's summary is
    # distilled again, replacing that student (the only case the trainer needs overwrite for).
    resume = run.is_dir() and any(run.iterdir())
    again = resume and not (run / "checkpoints").is_dir() and (run / "student").exists()
    size = 56 * 56
    settings = dict(
        teacher=str(teacher),
        data=data["conversations"],
        out=str(run),
        plan=preset,
        resume=resume,
        checkpoint_every=50,
        seed=config.seed,
        fps=FRAMES_PER_SECOND,  # every frame of each video, whatever its length
        min_pixels=size,
        max_pixels=size,
        feature_cache_dir=str(out / "vision_features"),
    )
    if again and "overwrite" in {field.name for field in dataclasses.fields(RunOptions)}:
        settings["overwrite"] = True
    if again:
        log(f"[demo] distill {preset}: {run} saved a student but no summary; distilling again")
    options = RunOptions(**settings)
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
    """The sample under each rotation of its options, shift 0 (the sample itself) first."""
    from linvid.niah.scoring import rotate_options

    return [rotate_options(sample, shift) for shift in range(len(sample.options))]


def evaluate_model(model, tokenizer, settings: InferenceSettings, config: DemoConfig, log):
    """Held-out records at every evaluation length: one per question, correct under VNBench's
    circular rule (`linvid.niah.scoring.circular_correct`: the right option picked in all 4
    rotations of the options). The 4 rotations are scored in one `evaluate` call; the rule
    then looks up each rotation's pick by its options. Each record keeps its rotations'
    picks, {"shift", "choice", "answer_index", "correct"} by shift, so its accuracy can be
    recomputed from them."""
    from linvid.eval.options import AnswerEncoder, evaluate
    from linvid.niah.generate import FRAMES_PER_SECOND, prompt_text
    from linvid.niah.scoring import circular_correct, depth_bin, rotate_options
    from linvid.niah.teacher import held_out_samples

    def rotation_key(question) -> tuple:
        """What tells one rotation of a question from another: its options in order and where
        the right one is."""
        return tuple(question.options), int(question.answer_index)

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
            shifts = {
                rotation_key(rotate_options(sample, shift)): shift
                for shift in range(len(sample.options))
            }
            picks, scored = {}, []
            for question, record in zip(rotated, result["records"], strict=True):
                key = rotation_key(question)
                if key not in shifts:
                    raise ValueError(f"{key} is no rotation of a held-out question's options")
                picks[key] = record["choice"]
                scored.append(
                    {
                        "shift": shifts[key],
                        "choice": record["choice"],
                        "answer_index": record["answer_index"],
                        "correct": record["correct"],
                    }
                )

            def choose(question, picks=picks):
                key = rotation_key(question)
                if key not in picks:
                    raise ValueError(f"rotation {key} of a held-out question was not scored")
                return picks[key]

            records.append(
                {
                    "task": sample.task,
                    "frames": frames,
                    "depth": sample.depth,
                    "depth_bin": depth_bin(sample.depth, config.depth_bins),
                    "correct": circular_correct(choose, sample),
                    "single_try_correct": picks[rotation_key(sample)] == sample.answer_index,
                    "rotations": sorted(scored, key=lambda rotation: rotation["shift"]),
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


def load_model(name: str, directory: str | os.PathLike):
    """(model in eval mode, tokenizer) from a local directory: the teacher as Qwen2.5-VL, a
    student through linvid.load. Local files only: a missing directory is named as missing
    (FileNotFoundError), never looked up on a model hub."""
    from transformers import AutoTokenizer

    import linvid
    from linvid.niah.teacher import local_model_directory

    directory = local_model_directory(directory, name)
    if name == "teacher":
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, local_files_only=True)
    else:
        model = linvid.load(directory, local_files_only=True)
    model.eval()
    return model, AutoTokenizer.from_pretrained(directory, local_files_only=True)


def evaluate_and_time(name: str, directory: Path, settings: InferenceSettings, config, log):
    model, tokenizer = load_model(name, directory)
    log(f"[demo] evaluate {name} ({settings.describe()})")
    records = evaluate_model(model, tokenizer, settings, config, log)
    speed = measure_speed(model, tokenizer, config, settings)
    return {"records": records, "speed": speed}


def weights_digest(directory: Path) -> str:
    """A digest of a model directory's weights (every *.safetensors file, by name and bytes):
    an evaluation is reused only for the very weights it measured."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def cached_evaluation(
    name: str, directory: Path, settings: InferenceSettings, config: DemoConfig, out: Path, log
) -> dict:
    """`evaluate_and_time`, kept in RUN_DIR/evaluations/NAME-KEY.json (KEY: the weights, the
    inference settings and the evaluation and speed sizes) so that a rerun after an interrupt
    does not evaluate again the models it already finished."""
    from linvid.niah.teacher import local_model_directory

    directory = local_model_directory(directory, name)
    key = _settings_hash(
        weights=weights_digest(directory),
        settings=dataclasses.asdict(settings),
        eval_frames=config.eval_frames,
        eval_per_task=config.eval_per_task,
        depth_bins=config.depth_bins,
        speed_frames=config.speed_frames,
        decode_tokens=config.decode_tokens,
        threads=config.threads,
    )
    path = out / "evaluations" / f"{name}-{key}.json"
    if path.is_file():
        log(f"[demo] evaluate {name}: reusing {path} (finished earlier with the same weights)")
        return json.loads(path.read_text())
    result = evaluate_and_time(name, directory, settings, config, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, result)
    return result


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

    log = log or _log
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    timer = StepTimer(log)
    data = timer.run("data", lambda: make_data(config, out, log))
    teacher = timer.run("teacher", lambda: train_teacher(config, out, log))
    students = {}
    for preset in config.students:
        students[preset] = timer.run(
            f"distill {preset}",
            lambda preset=preset: distill_student(config, out, teacher, data, preset, log),
        )
    results = {}
    results["teacher"] = timer.run(
        "evaluate teacher",
        lambda: cached_evaluation("teacher", teacher, InferenceSettings(), config, out, log),
    )
    for preset, (directory, summary) in students.items():
        settings = InferenceSettings(**summary["inference"])
        results[preset] = timer.run(
            f"evaluate {preset}",
            lambda preset=preset, directory=directory, settings=settings: cached_evaluation(
                preset, directory, settings, config, out, log
            ),
        )
    from linvid.demo.diagnose import cached_diagnosis

    diagnosis = {}
    for preset, (directory, summary) in students.items():
        settings = InferenceSettings(**summary["inference"])
        diagnosis[preset] = timer.run(
            f"diagnose {preset}",
            lambda preset=preset, directory=directory, settings=settings: cached_diagnosis(
                preset, directory, teacher, settings, config, out, log
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
        diagnosis=diagnosis,
    )


def _teacher_summary(directory: Path) -> dict:
    summary = {"directory": str(directory)}
    training = directory / "training.json"
    if training.is_file():
        summary["training"] = json.loads(training.read_text())
    return summary


__all__ = ["DemoConfig", "run_demo"]
