"""The demo's report: RUN_DIR/report.json (everything measured), report.md (tables, goals) and
PNGs (accuracy against frames, needle heatmaps, prefill and decode speed against frames).

Every number is computed here from the run's records: accuracy per task and length from the
per-question records, retention = student accuracy / teacher accuracy, speed ratios from the
same run's measurements.

Every file is rendered in memory first and then written atomically (linvid.outputs: a
temporary file renamed into place), report.md last, so an interrupt while the report is made
leaves the previous report's files as they were and never a half-written one.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

from linvid.demo.diagnose import markdown as diagnosis_markdown
from linvid.outputs import atomic_write, atomic_write_text

# Retention goals at the training length (issue: >= 95% for the hybrids, >= 90% all-linear).
RETENTION_GOALS = {
    "qwen-rwkv-vl-25": 0.95,
    "mamba2-hybrid-25": 0.95,
    "linmu": 0.90,
    "rwkv6-all": 0.90,
}
TASK_ORDER = ("retrieval", "ordering", "counting")


def accuracy_table(records: list[dict]) -> dict:
    """{frames: {task: accuracy, "all": accuracy, "count": n}} from per-question records."""
    totals, hits = defaultdict(int), defaultdict(int)
    for record in records:
        for task in (record["task"], "all"):
            totals[record["frames"], task] += 1
            hits[record["frames"], task] += bool(record["correct"])
    table: dict = defaultdict(dict)
    for (frames, task), count in totals.items():
        table[frames][task] = hits[frames, task] / count
        if task == "all":
            table[frames]["count"] = count
    return {frames: table[frames] for frames in sorted(table)}


def heatmap(records: list[dict], bins: int) -> dict:
    """{frames: [accuracy or None per depth bin]} over every task."""
    totals, hits = defaultdict(int), defaultdict(int)
    for record in records:
        totals[record["frames"], record["depth_bin"]] += 1
        hits[record["frames"], record["depth_bin"]] += bool(record["correct"])
    frames = sorted({record["frames"] for record in records})
    return {
        count: [
            hits[count, b] / totals[count, b] if totals[count, b] else None for b in range(bins)
        ]
        for count in frames
    }


def retention(student: dict, teacher: dict) -> dict:
    """{frames: {task: student / teacher}} (None where the teacher scored 0)."""
    result = {}
    for frames, row in student.items():
        result[frames] = {
            task: (value / teacher[frames][task] if teacher[frames][task] else None)
            for task, value in row.items()
            if task != "count"
        }
    return result


def speed_ratios(teacher_rows: list[dict], student_rows: list[dict]) -> list[dict]:
    """Per length: teacher TTFT / student TTFT (> 1: the student is faster), student decode
    tokens/s / teacher's, and the cache bytes of both."""
    by_frames = {row["frames"]: row for row in teacher_rows}
    ratios = []
    for row in student_rows:
        base = by_frames[row["frames"]]
        ratios.append(
            {
                "frames": row["frames"],
                "prefill_speedup": base["ttft_seconds"] / row["ttft_seconds"],
                "prefill_with_vision_speedup": base["ttft_vision_seconds"]
                / row["ttft_vision_seconds"],
                "decode_speedup": row["decode_tokens_per_second"]
                / base["decode_tokens_per_second"],
                "cache_bytes": row["cache_bytes"],
                "teacher_cache_bytes": base["cache_bytes"],
            }
        )
    return ratios


def build_report(config, machine, steps, teacher, students, results, diagnosis=None) -> dict:
    train_frames = config["train_frames"]
    accuracy = {name: accuracy_table(result["records"]) for name, result in results.items()}
    report = {
        "config": config,
        "machine": machine,
        "steps_seconds": steps,
        "total_seconds": round(sum(steps.values()), 2),
        "teacher": teacher,
        "students": students,
        "accuracy": accuracy,
        "single_try_accuracy": {
            name: accuracy_table(
                [{**r, "correct": r["single_try_correct"]} for r in result["records"]]
            )
            for name, result in results.items()
        },
        "retention": {},
        "heatmap": {
            name: heatmap(result["records"], config["depth_bins"])
            for name, result in results.items()
        },
        "speed": {name: result["speed"] for name, result in results.items()},
        "speed_ratios": {},
        "goals": [],
        "records": {name: result["records"] for name, result in results.items()},
        "diagnosis": diagnosis or {},
    }
    for name in results:
        if name == "teacher":
            continue
        report["retention"][name] = retention(accuracy[name], accuracy["teacher"])
        report["speed_ratios"][name] = speed_ratios(
            results["teacher"]["speed"], results[name]["speed"]
        )
        kept = report["retention"][name][train_frames]["all"]
        goal = RETENTION_GOALS.get(name)
        if goal is not None:
            report["goals"].append(
                {
                    "goal": f"{name} retention at {train_frames} frames >= {goal:.0%}",
                    "value": kept,
                    "met": kept is not None and kept >= goal,
                }
            )
        ratios = report["speed_ratios"][name]
        slowest = min(min(r["prefill_speedup"], r["decode_speedup"]) for r in ratios)
        report["goals"].append(
            {
                "goal": f"{name} prefill and decode at least as fast as the teacher at every "
                "length",
                "value": slowest,
                "met": slowest >= 1.0,
            }
        )
    return report


def _fmt(value, percent=True) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0%}" if percent else f"{value:.2f}"


def markdown(report: dict, images: list[str]) -> str:
    config = report["config"]
    names = list(report["accuracy"])
    frames = sorted(report["accuracy"]["teacher"])
    lines = [
        "# linvid demo report",
        "",
        f"Run `{config['name']}` (seeds {config['seeds']}), {report['total_seconds']:.0f} s in "
        f"all, on {report['machine']['processor']} ({report['machine']['cpu_count']} cores), "
        f"torch {report['machine']['torch']}, transformers {report['machine']['transformers']}.",
        f"Trained at {config['train_frames']} frames; evaluated at {', '.join(map(str, frames))} "
        "frames on held-out seeds. A question counts as right only if the model picks the "
        "right option under all 4 rotations of its options (VNBench's circular rule); options "
        "are scored by likelihood. Chance is 25% for one try, 0.4% under the circular rule.",
        "",
        "## Accuracy (circular) and retention",
        "",
    ]
    header = ["model"] + [f"{task[:4]}@{f}" for f in frames for task in (*TASK_ORDER, "all")]
    lines.append("| " + " | ".join(header) + " | retention@" + str(config["train_frames"]) + " |")
    lines.append("|" + "---|" * (len(header) + 1))
    for name in names:
        cells = [name]
        for f in frames:
            row = report["accuracy"][name].get(f, {})
            cells += [_fmt(row.get(task)) for task in (*TASK_ORDER, "all")]
        kept = report["retention"].get(name, {}).get(config["train_frames"], {}).get("all")
        cells.append("-" if name == "teacher" else _fmt(kept))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Goals", ""]
    for goal in report["goals"]:
        mark = "met" if goal["met"] else "NOT met"
        lines.append(f"- {goal['goal']}: {_fmt(goal['value'], percent=False)} ({mark})")
    lines += [""] + diagnosis_markdown(report.get("diagnosis") or {})
    lines += ["## Speed (same run, CPU)", ""]
    lines.append(
        "| model | frames | LLM tokens | TTFT s | TTFT+vision s | decode tok/s | cache KiB |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for name in names:
        for row in report["speed"][name]:
            lines.append(
                f"| {name} | {row['frames']} | {row['llm_tokens']} | {row['ttft_seconds']:.4f} | "
                f"{row['ttft_vision_seconds']:.4f} | {row['decode_tokens_per_second']:.1f} | "
                f"{row['cache_bytes'] / 1024:.1f} |"
            )
    lines += ["", "## Steps", ""]
    lines.append("| step | seconds |")
    lines.append("|---|---|")
    lines += [
        f"| {step} | {seconds:.1f}{' (reused from an earlier run)' if seconds < 0.5 else ''} |"
        for step, seconds in report["steps_seconds"].items()
    ]
    training = report["teacher"].get("training")
    lines += ["", "## Teacher", ""]
    if training:
        lines.append(
            f"- `{report['teacher']['directory']}`: {training.get('steps')} steps, "
            f"{training.get('samples')} samples in {training.get('seconds')} s "
            f"({training.get('samples_per_second')} samples/s); goals met in training: "
            f"{training.get('goals_met')}; last held-out check: {training.get('last_check')}"
        )
    else:
        lines.append(f"- `{report['teacher']['directory']}` (no training log found)")
    lines += ["", "## Students", ""]
    for name, summary in report["students"].items():
        stages = ", ".join(
            f"{s['name']} ({s['steps']} steps x {s['batch_size']}, lr {s['learning_rate']:g}, "
            f"{'+'.join(s['losses'])})"
            for s in summary["stages"]
        )
        lines.append(f"- {name}: paper {summary['paper']}; recipe `{summary['recipe']}`: {stages}")
    lines += [""] + [f"![{Path(image).stem}]({Path(image).name})" for image in images] + [""]
    return "\n".join(lines)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plots(report: dict) -> dict[str, bytes]:
    """The report's figures as PNG bytes by file name (accuracy.png, heatmap.png, speed.png),
    rendered in memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["accuracy"])
    images = {}

    figure, axis = plt.subplots(figsize=(6, 4))
    for name in names:
        table = report["accuracy"][name]
        xs = sorted(table)
        axis.plot(xs, [table[x]["all"] for x in xs], marker="o", label=name)
    axis.set(xscale="log", xlabel="frames", ylabel="accuracy (circular)", ylim=(0, 1.02))
    axis.set_title("held-out accuracy against video length")
    axis.legend(fontsize=8)
    figure.tight_layout()
    images["accuracy.png"] = _png(figure)
    plt.close(figure)

    figure, axes = plt.subplots(
        1, len(names), figsize=(2.8 * len(names), 3.2), squeeze=False, constrained_layout=True
    )
    for axis, name in zip(axes[0], names, strict=True):
        grid = report["heatmap"][name]
        rows = sorted(grid)
        values = [[(v if v is not None else float("nan")) for v in grid[r]] for r in rows]
        image = axis.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_yticks(range(len(rows)), [str(r) for r in rows])
        bins = len(values[0])
        axis.set_xticks(range(bins), [f"{b / bins:.2f}" for b in range(bins)], fontsize=7)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("needle depth", fontsize=8)
    axes[0][0].set_ylabel("frames")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy (circular)")
    images["heatmap.png"] = _png(figure)
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        rows = report["speed"][name]
        xs = [row["frames"] for row in rows]
        left.plot(xs, [row["ttft_seconds"] for row in rows], marker="o", label=name)
        right.plot(xs, [row["decode_tokens_per_second"] for row in rows], marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="frames", ylabel="prefill (TTFT) seconds")
    right.set(xscale="log", xlabel="frames", ylabel="decode tokens/s")
    left.legend(fontsize=8)
    figure.tight_layout()
    images["speed.png"] = _png(figure)
    plt.close(figure)
    return images


def write_report(out: Path, **parts) -> Path:
    """Write the PNGs, report.json and report.md into `out`; returns report.md's path. All
    are rendered before the first is written, and each is written atomically, report.md last
    (see the module's doc)."""
    out = Path(out)
    report = build_report(**parts)
    images = plots(report)
    text = json.dumps(report, indent=1, sort_keys=False, default=str) + "\n"
    page = markdown(report, [str(out / name) for name in images])
    for name, data in images.items():
        atomic_write(out / name, lambda temporary, data=data: temporary.write_bytes(data))
    atomic_write_text(out / "report.json", text)
    return atomic_write_text(out / "report.md", page)


def summary_table(report: dict) -> str:
    """The short terminal table: accuracy at each length and retention at the training one."""
    config = report["config"]
    frames = sorted(report["accuracy"]["teacher"])
    lines = ["model              " + "".join(f"{f:>8}" for f in frames) + "  retention"]
    for name, table in report["accuracy"].items():
        kept = report["retention"].get(name, {}).get(config["train_frames"], {}).get("all")
        cells = "".join(f"{_fmt(table[f]['all']):>8}" for f in frames)
        lines.append(f"{name:<19}{cells}  {'-' if name == 'teacher' else _fmt(kept)}")
    return "\n".join(lines)
