"""The demo's diagnosis step (issue 15): why students lose accuracy with the video's length.

For each student and each evaluation length, on `DemoConfig.diagnosis_per_task` held-out
questions per task (the question with its right answer, prepared as the student is
evaluated), `linvid.eval.diagnosis` measures

- memory of the video in every RWKV-6 / forward Mamba-2 part: the share of channels that still
  hold more than 1% of the first video token when the model reads the token before the answer,
  and the median per-token half-life;
- for students that read the teacher's tokens (no frame merging): each converted layer's
  teacher-forced relative error, overall and by position quarter.

Values are averaged over the questions. Results are kept in RUN_DIR/diagnosis/NAME-KEY.json
(KEY: the student's and the teacher's weights and the sizes) and rendered by `markdown`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict

import torch

__all__ = ["cached_diagnosis", "diagnose_student", "markdown", "summary"]


def _questions(config, frames: int) -> list:
    from linvid.niah.teacher import held_out_samples

    return held_out_samples(frames, config.diagnosis_per_task)


def _batch(model, encoder, prepare, sample) -> dict:
    from linvid.niah.generate import prompt_text

    answer = sample.options[sample.answer_index]
    video = encoder.video(sample.frames)
    item = encoder.item(prompt_text(sample), answer, video, end_of_turn=False)
    return prepare(model, encoder.batch([item]))


def _mean_rows(groups: list[list[dict]], key: str) -> list[dict]:
    """Average rows with the same `key` over groups (one group per question); lists (by
    position) are averaged entry by entry, None entries skipped."""
    collected: dict = defaultdict(list)
    order = []
    for rows in groups:
        for row in rows:
            if row[key] not in collected:
                order.append(row[key])
            collected[row[key]].append(row)
    averaged = []
    for name in order:
        rows = collected[name]
        merged = {}
        for field, value in rows[0].items():
            values = [row[field] for row in rows]
            if field in (key, "layer", "module", "kind"):
                merged[field] = value
            elif isinstance(value, list):
                merged[field] = [_mean_of(column) for column in zip(*values, strict=True)]
            else:
                merged[field] = _mean_of(values)
        averaged.append(merged)
    return averaged


def _mean_of(values) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


@torch.no_grad()
def diagnose_student(name, directory, teacher, settings, config, log) -> dict:
    """{"memory": {frames: rows}, "layer_errors": {frames: rows} or None} for one student
    (`linvid.eval.diagnosis`'s rows averaged over the questions)."""
    from linvid.demo.pipeline import load_model
    from linvid.eval.diagnosis import decay_memory, layer_errors
    from linvid.eval.options import AnswerEncoder
    from linvid.eval.student_view import StudentView
    from linvid.niah.generate import FRAMES_PER_SECOND

    model, tokenizer = load_model(name, directory)
    encoder = AnswerEncoder(
        tokenizer, model.config, style=settings.prompt_style, sample_fps=FRAMES_PER_SECOND
    )
    prepare = StudentView(settings)
    same_tokens = not settings.merges_frames and not settings.transv
    memory, errors = {}, {} if same_tokens else None
    for frames in config.eval_frames:
        started = time.perf_counter()
        memory_rows, error_rows = [], []
        for sample in _questions(config, frames):
            batch = _batch(model, encoder, prepare, sample)
            memory_rows.append(decay_memory(model, batch))
            if same_tokens:
                error_rows.append(layer_errors(model, teacher, batch))
        memory[frames] = _mean_rows(memory_rows, "module")
        if same_tokens:
            errors[frames] = _mean_rows(error_rows, "layer")
        log(f"  diagnosis at {frames} frames in {time.perf_counter() - started:.1f} s")
    return {"memory": memory, "layer_errors": errors}


def cached_diagnosis(name, directory, teacher_directory, settings, config, out, log) -> dict:
    """`diagnose_student`, kept in RUN_DIR/diagnosis/NAME-KEY.json."""
    from linvid.demo.pipeline import _settings_hash, _write_json, load_model, weights_digest
    from linvid.niah.teacher import local_model_directory

    directory = local_model_directory(directory, name)
    key = _settings_hash(
        weights=weights_digest(directory),
        teacher=weights_digest(local_model_directory(teacher_directory, "teacher")),
        settings=dataclasses.asdict(settings),
        eval_frames=config.eval_frames,
        per_task=config.diagnosis_per_task,
    )
    path = out / "diagnosis" / f"{name}-{key}.json"
    if path.is_file():
        log(f"[demo] diagnose {name}: reusing {path}")
        return _int_keys(json.loads(path.read_text()))
    log(f"[demo] diagnose {name}")
    teacher, _ = load_model("teacher", teacher_directory)
    result = diagnose_student(name, directory, teacher, settings, config, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, result)
    return result


def _int_keys(result: dict) -> dict:
    return {
        part: None if value is None else {int(frames): rows for frames, rows in value.items()}
        for part, value in result.items()
    }


def summary(diagnosis: dict) -> dict:
    """{student: {frames: {"remembering", "half_life", "relative_error", "by_position"}}}:
    the memory share averaged over the recurrent parts, the median half-life's median over
    them, and the teacher-forced error averaged over the converted layers (None without)."""
    table: dict = {}
    for name, result in diagnosis.items():
        table[name] = {}
        for frames, rows in result["memory"].items():
            half_lives = sorted(row["median_half_life"] for row in rows)
            entry = {
                "remembering": _mean_of([row["remembering"] for row in rows]),
                "half_life": half_lives[len(half_lives) // 2],
                "span": _mean_of([row["span"] for row in rows]),
                "relative_error": None,
                "by_position": None,
            }
            errors = (result["layer_errors"] or {}).get(frames)
            if errors:
                entry["relative_error"] = _mean_of([row["relative_error"] for row in errors])
                quarters = zip(*(row["by_position"] for row in errors), strict=True)
                entry["by_position"] = [_mean_of(column) for column in quarters]
            table[name][frames] = entry
    return table


def markdown(diagnosis: dict) -> list[str]:
    """The report's "Diagnosis" section (lines)."""
    if not diagnosis:
        return []
    table = summary(diagnosis)
    lines = [
        "## Diagnosis",
        "",
        "Memory: share of RWKV-6 / Mamba-2 channels that still hold > 1% of the first video "
        "token at the token before the answer (mean over layers), the median per-token "
        "half-life in tokens, and the tokens in between. Layer error: each converted layer "
        "fed the teacher's input, relative squared error against the teacher's attention "
        "(mean over layers; by position quarter of the sequence). `linvid.eval.diagnosis`.",
        "",
        "| model | frames | tokens in span | remembering | half-life | layer error | by quarter |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in table.items():
        for frames, entry in sorted(rows.items()):
            error = entry["relative_error"]
            quarters = entry["by_position"]
            lines.append(
                f"| {name} | {frames} | {entry['span']:.0f} | {entry['remembering']:.0%} | "
                f"{entry['half_life']:.1f} | "
                f"{'n/a (merged tokens)' if error is None else f'{error:.3f}'} | "
                f"{'' if quarters is None else ' / '.join(_short(q) for q in quarters)} |"
            )
    return lines + [""]


def _short(value) -> str:
    return "-" if value is None else f"{value:.3f}"
