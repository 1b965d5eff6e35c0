"""`linvid demo --quick` end to end: every step runs, and the report is complete and agrees
with its own records (not the accuracy goals: the quick run's models are barely trained)."""

import json

import pytest

from linvid.cli import main
from linvid.demo.report import RETENTION_GOALS, accuracy_table

TASKS = ("retrieval", "ordering", "counting")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_files(report):
    out, data = report
    text = (out / "report.md").read_text()
    for name in ("accuracy.png", "heatmap.png", "speed.png"):
        assert (out / name).stat().st_size > 0 and f"({name})" in text
    assert set(data["accuracy"]) == {"teacher", *RETENTION_GOALS}
    for step in ("data", "teacher", "evaluate teacher", *(f"distill {s}" for s in RETENTION_GOALS)):
        assert data["steps_seconds"][step] > 0
    assert data["machine"]["torch"] and data["config"]["name"] == "quick"


def test_the_diagnosis_measures_every_student_at_every_length(report):
    out, data = report
    lengths = {str(frames) for frames in data["config"]["eval_frames"]}
    assert set(data["diagnosis"]) == set(RETENTION_GOALS)
    for name, result in data["diagnosis"].items():
        assert set(result["memory"]) == lengths, name
        for rows in result["memory"].values():
            assert rows and all(0.0 <= row["remembering"] <= 1.0 for row in rows)
            assert all(row["median_half_life"] > 0 and row["span"] > 0 for row in rows)
        if name in ("qwen-rwkv-vl-25", "linmu"):  # they read the teacher's tokens
            for rows in result["layer_errors"].values():
                assert [row["layer"] for row in rows] and all(
                    row["relative_error"] >= 0 for row in rows
                )
        else:  # frame merging: the teacher never sees their tokens
            assert result["layer_errors"] is None
        assert data["steps_seconds"][f"diagnose {name}"] > 0
    text = (out / "report.md").read_text()
    assert "## Diagnosis" in text and text.count("| linmu | ") >= len(lengths)


def test_accuracy_and_retention_agree_with_the_records(report):
    _, data = report
    config = data["config"]
    for name, records in data["records"].items():
        expected = {str(k): v for k, v in accuracy_table(records).items()}
        assert data["accuracy"][name] == expected
        per_length = {
            frames: per_task * len(TASKS)
            for frames, per_task in zip(config["eval_frames"], config["eval_per_task"], strict=True)
        }
        counts = {}
        for record in records:
            counts[record["frames"]] = counts.get(record["frames"], 0) + 1
            assert record["correct"] <= record["single_try_correct"]  # circular is stricter
        assert counts == per_length
    teacher = data["accuracy"]["teacher"]
    for name, table in data["retention"].items():
        for frames, row in table.items():
            for task, value in row.items():
                base = teacher[frames][task]
                if base:
                    assert value == pytest.approx(data["accuracy"][name][frames][task] / base)
                else:
                    assert value is None


def test_speed_rows_follow_the_protocol(report):
    _, data = report
    for rows in data["speed"].values():
        assert [row["frames"] for row in rows] == data["config"]["speed_frames"]
        for row in rows:
            times = row["token_times"]
            assert len(times) == row["decode_tokens"]
            assert row["decode_tokens_per_second"] == pytest.approx(
                (len(times) - 1) / (times[-1] - times[0])
            )
            assert row["ttft_vision_seconds"] >= row["ttft_seconds"] > 0
            assert row["cache_bytes"] > 0
    for name, ratios in data["speed_ratios"].items():
        teacher = {row["frames"]: row for row in data["speed"]["teacher"]}
        for ratio, row in zip(ratios, data["speed"][name], strict=True):
            base = teacher[row["frames"]]
            assert ratio["decode_speedup"] == pytest.approx(
                row["decode_tokens_per_second"] / base["decode_tokens_per_second"]
            )
    # The all-linear student's state does not grow with the video; the teacher's cache does.
    linear = [row["cache_bytes"] for row in data["speed"]["rwkv6-all"]]
    teacher = [row["cache_bytes"] for row in data["speed"]["teacher"]]
    assert len(set(linear)) == 1 and teacher[-1] > teacher[0]


def test_goals_are_reported_for_every_student(report):
    _, data = report
    goals = " ".join(goal["goal"] for goal in data["goals"])
    for name in RETENTION_GOALS:
        assert f"{name} retention" in goals and f"{name} prefill and decode" in goals
    assert all(isinstance(goal["met"], bool) for goal in data["goals"])
