"""The demo's held-out scoring: every question is scored under all 4 rotations of its options
and counts as right only under VNBench's circular rule (right under every rotation); each
record keeps its 4 rotations' picks, and the report's accuracy is recomputed here from them.

A tiny untrained teacher tends to pick the same option text under every rotation (all right or
all wrong), which cannot tell "all 4 rotations" from "the first" or "3 of 4"; the scripted test
feeds `evaluate_model` picks with known per-rotation outcomes for that."""

import dataclasses
from collections import defaultdict

import pytest
import torch

import linvid.eval.options
import linvid.niah.teacher
from linvid.demo.pipeline import DemoConfig, evaluate_model
from linvid.demo.report import TASK_ORDER, build_report, markdown, summary_table
from linvid.demo.students import InferenceSettings
from linvid.eval.options import AnswerEncoder, choose_option
from linvid.niah.generate import FRAMES_PER_SECOND, prompt_text
from linvid.niah.scoring import depth_bin, rotate_options
from linvid.niah.teacher import build_teacher, build_tokenizer, held_out_samples

# 2 questions per task at 16 frames, 1 per task at 32: nine questions, two lengths.
CONFIG = DemoConfig.quick(eval_frames=(16, 32), eval_per_task=(2, 1))
SHIFTS = [0, 1, 2, 3]
# Scripted runs: the rotations (shifts) at which the pick is wrong, one pattern per question
# in turn. Only the first is right under the circular rule; (3,) is right under shifts 0-2 and
# (1, 2, 3) under shift 0 alone.
WRONG_AT = [(), (3,), (1, 2, 3), (0,), (2,), (), (), (), (0, 1, 2, 3)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the models are tiny and the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return build_teacher(tokenizer, seed=0).eval()


def held_out_questions(config=CONFIG):
    """The held-out questions in the order evaluate_model records them."""
    return [
        sample
        for frames, per_task in zip(config.eval_frames, config.eval_per_task, strict=True)
        for sample in held_out_samples(frames, per_task)
    ]


def circular_from_rotations(record) -> bool:
    """The circular rule recomputed from a record's rotations: all 4 shifts present, the
    right option picked under each."""
    rotations = record["rotations"]
    assert [rotation["shift"] for rotation in rotations] == SHIFTS
    return all(rotation["choice"] == rotation["answer_index"] for rotation in rotations)


def expected_tables(records):
    """Circular accuracy, single-try accuracy and the depth heatmap per length, counted here
    from the rotation records with explicit loops."""
    circular, single, counts = defaultdict(int), defaultdict(int), defaultdict(int)
    depth_hits, depth_counts = defaultdict(int), defaultdict(int)
    for record in records:
        right = circular_from_rotations(record)
        first = record["rotations"][0]
        for task in (record["task"], "all"):
            counts[record["frames"], task] += 1
            circular[record["frames"], task] += right
            single[record["frames"], task] += first["choice"] == first["answer_index"]
        depth_counts[record["frames"], record["depth_bin"]] += 1
        depth_hits[record["frames"], record["depth_bin"]] += right
    accuracy = {key: circular[key] / count for key, count in counts.items()}
    single_try = {key: single[key] / count for key, count in counts.items()}
    heatmap = {key: depth_hits[key] / count for key, count in depth_counts.items() if count > 0}
    return accuracy, single_try, heatmap, counts


def check_report(records):
    """build_report's tables and the markdown / terminal tables it prints agree with the
    accuracy recomputed from the rotation records."""
    accuracy, single_try, heatmap, counts = expected_tables(records)
    report = build_report(
        config={**dataclasses.asdict(CONFIG), "seeds": {}},
        machine={"processor": "cpu", "cpu_count": 2, "torch": "t", "transformers": "t"},
        steps={"evaluate teacher": 1.0},
        teacher={"directory": "teacher"},
        students={},
        results={"teacher": {"records": records, "speed": []}},
    )
    table = report["accuracy"]["teacher"]
    assert sorted(table) == list(CONFIG.eval_frames)
    for (frames, task), value in accuracy.items():
        assert table[frames][task] == pytest.approx(value, abs=1e-12)
        assert report["single_try_accuracy"]["teacher"][frames][task] == pytest.approx(
            single_try[frames, task], abs=1e-12
        )
    for frames in CONFIG.eval_frames:
        assert table[frames]["count"] == counts[frames, "all"]
        assert set(table[frames]) == {*TASK_ORDER, "all", "count"}
        bins = report["heatmap"]["teacher"][frames]
        for depth in range(CONFIG.depth_bins):
            expected = heatmap.get((frames, depth))
            assert bins[depth] == (None if expected is None else pytest.approx(expected))
    # The printed tables: one cell per (length, task), then "all".
    cells = [
        f"{accuracy[frames, task]:.0%}"
        for frames in CONFIG.eval_frames
        for task in (*TASK_ORDER, "all")
    ]
    assert "| teacher | " + " | ".join(cells) + " | - |" in markdown(report, []).splitlines()
    totals = "".join(f"{accuracy[frames, 'all']:.0%}".rjust(8) for frames in CONFIG.eval_frames)
    assert f"{'teacher':<19}{totals}  -" in summary_table(report).splitlines()
    return accuracy


def test_records_hold_all_four_rotations_scored_by_the_model(teacher, tokenizer):
    """A tiny teacher through evaluate_model: every record has the 4 rotations (shifts 0..3),
    each rotation's pick equals the option chosen for that rotation alone (choose_option, one
    rotation per call) and its answer index follows the right option (rotate_options); the
    record is right exactly when all 4 picks are, single-try right when shift 0's is; the
    report's accuracy is the mean of those."""
    records = evaluate_model(teacher, tokenizer, InferenceSettings(), CONFIG, lambda line: None)
    samples = held_out_questions()
    assert len(records) == len(samples)
    encoder = AnswerEncoder(tokenizer, teacher.config, sample_fps=FRAMES_PER_SECOND)
    for record, sample in zip(records, samples, strict=True):
        assert (record["task"], record["frames"]) == (sample.task, sample.frames.shape[0])
        assert record["depth_bin"] == depth_bin(sample.depth, CONFIG.depth_bins)
        assert [rotation["shift"] for rotation in record["rotations"]] == SHIFTS
        for rotation in record["rotations"]:
            rotated = rotate_options(sample, rotation["shift"])
            alone = choose_option(teacher, tokenizer, rotated, prompt=prompt_text, encoder=encoder)
            assert rotation["choice"] == alone
            assert rotation["answer_index"] == rotated.answer_index
            assert rotation["correct"] == (alone == rotated.answer_index)
        assert record["correct"] == circular_from_rotations(record)
        first = record["rotations"][0]
        assert record["single_try_correct"] == (first["choice"] == first["answer_index"])
    check_report(records)


def scripted_evaluate(samples, calls):
    """A stand-in for linvid.eval.options.evaluate whose pick for each rotation follows
    WRONG_AT: the right option, or the next one where the pattern says wrong. The question
    and its shift are found from the frames' identity and the rotated options."""

    def evaluate(model, tokenizer, questions, **keywords):
        calls.append((len(questions), keywords["batch_questions"]))
        records = []
        for question in questions:
            number = next(i for i, sample in enumerate(samples) if sample.frames is question.frames)
            sample = samples[number]
            shift = next(k for k in SHIFTS if rotate_options(sample, k).options == question.options)
            wrong = shift in WRONG_AT[number % len(WRONG_AT)]
            choice = (question.answer_index + wrong) % len(question.options)
            records.append(
                {
                    "choice": choice,
                    "answer_index": question.answer_index,
                    "correct": choice == question.answer_index,
                }
            )
        return {"records": records}

    return evaluate


def test_circular_rule_needs_every_rotation(teacher, tokenizer, monkeypatch):
    """Scripted picks with known outcomes per rotation: a question counts as right only when
    it is right under all 4 rotations (wrong only at shift 3, or right only at shift 0, is
    wrong); its 4 rotations are scored in one evaluate call; the report's accuracy per length
    and task is the fraction of questions right under all 4."""
    samples, calls = [], []
    real_samples = linvid.niah.teacher.held_out_samples

    def spy(frames, per_task, **keywords):
        drawn = real_samples(frames, per_task, **keywords)
        samples.extend(drawn)
        return drawn

    monkeypatch.setattr(linvid.niah.teacher, "held_out_samples", spy)
    monkeypatch.setattr(linvid.eval.options, "evaluate", scripted_evaluate(samples, calls))
    records = evaluate_model(teacher, tokenizer, InferenceSettings(), CONFIG, lambda line: None)
    assert calls == [(4, 4)] * len(samples)  # one batched call per question
    assert len(records) == len(samples) == len(held_out_questions())
    for number, record in enumerate(records):
        wrong_at = WRONG_AT[number % len(WRONG_AT)]
        assert [rotation["shift"] for rotation in record["rotations"]] == SHIFTS
        assert [not rotation["correct"] for rotation in record["rotations"]] == [
            shift in wrong_at for shift in SHIFTS
        ]
        assert record["correct"] == (wrong_at == ())
        assert record["single_try_correct"] == (0 not in wrong_at)
        assert record["correct"] == circular_from_rotations(record)
    accuracy = check_report(records)
    # By hand from WRONG_AT: 2 of the 6 questions at 16 frames, 2 of the 3 at 32.
    assert (accuracy[16, "all"], accuracy[32, "all"]) == (
        pytest.approx(2 / 6),
        pytest.approx(2 / 3),
    )
