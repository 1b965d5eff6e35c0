"""`linvid eval run`: evaluate several models on the same lmms-eval tasks with the `linvid`
model (linvid.eval.lmms_model) and write one table with each model's retention against a
named teacher.

    linvid eval run --model teacher=runs/demo/teacher --model linmu=runs/demo/students/linmu \\
        --teacher teacher --tasks linvid_niah --niah runs/demo/data --out runs/eval

--niah DATA writes the linvid_niah tasks for a `linvid niah generate` directory into
OUT/tasks; --include-path adds folders of task YAMLs (e.g. written by `linvid eval tasks`, or
your own); any task lmms-eval knows (videomme, mlvu, longvideobench, lvbench, ...) can be
named. --model-args are passed to every model (fps=1,max_pixels=50176,...; see
linvid.eval.lmms_model).

Writes, in OUT:
  results/NAME.json  each model's lmms-eval results, written as soon as the model is done; a
                     rerun with the same settings reuses it (an interrupted run loses at most
                     the model it was on);
  table.json         {"teacher", "tasks", "rows": [{"model", "task", "metric", "value",
                     "retention"}]} (retention: value / the teacher's value);
  table.md           the same as a markdown table; table.png: a bar chart of the main metric
                     of each task (per model).
A non-empty OUT that is not an earlier `linvid eval run` is refused without --overwrite.
Needs lmms-eval: pip install 'linvid[eval]'.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

from linvid.outputs import atomic_write, atomic_write_text, check_output

RUN_FILE = "eval.json"  # marks OUT as a linvid eval run (and records its settings)
MAIN_METRICS = ("circular", "acc", "exact_match")  # the metric plotted, first one present


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a model to evaluate (repeat): a name and a local model directory",
    )
    parser.add_argument("--teacher", help="the NAME retention is measured against")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    parser.add_argument("--niah", help="a `linvid niah generate` directory: writes linvid_niah")
    parser.add_argument(
        "--include-path", action="append", default=[], help="a folder of task YAMLs (repeat)"
    )
    parser.add_argument("--model-args", default="", help="key=value,... for every model")
    parser.add_argument("--batch-size", type=int, default=1, help="questions per forward")
    parser.add_argument("--limit", type=int, help="only the first N documents of each task")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def parse_models(values) -> dict[str, str]:
    """["name=dir", ...] -> {name: dir}; names are unique words."""
    models = {}
    for value in values:
        name, separator, directory = value.partition("=")
        if not separator or not name or not directory:
            raise ValueError(f"--model expects NAME=DIR, got {value!r}")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"--model name {name!r} must be letters, digits, - _ or .")
        if name in models:
            raise ValueError(f"--model {name} is given twice")
        models[name] = directory
    return models


def fingerprint(directory: str, settings: dict) -> str:
    """What a model's saved results depend on: its weights (file sizes and times) and the
    run's settings."""
    files = sorted(Path(directory).glob("*.safetensors"))
    stamp = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    text = json.dumps({"weights": stamp, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def numeric_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lmms-eval's results (filters dropped, stderr left out)."""
    table = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            metric = key.split(",")[0]
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if "_stderr" in metric or not numeric:
                continue
            metrics[metric] = float(value)
        table[task] = metrics
    return table


def build_table(per_model: dict[str, dict], teacher: str | None) -> dict:
    """Rows {"model", "task", "metric", "value", "retention"} for every model, task, metric."""
    rows = []
    reference = numeric_metrics(per_model[teacher]) if teacher else {}
    for name, results in per_model.items():
        for task, metrics in numeric_metrics(results).items():
            for metric, value in metrics.items():
                base = reference.get(task, {}).get(metric)
                usable = base is not None and base > 0 and not math.isnan(value)
                rows.append(
                    {
                        "model": name,
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "retention": value / base if usable else None,
                    }
                )
    return {"teacher": teacher, "tasks": sorted({row["task"] for row in rows}), "rows": rows}


def markdown(table: dict) -> str:
    def number(value):
        return "-" if value is None or math.isnan(value) else f"{value:.3f}"

    lines = [
        f"Retention against {table['teacher']}." if table["teacher"] else "No teacher named.",
        "",
        "| model | task | metric | value | retention |",
        "|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        retention = "-" if row["retention"] is None else f"{row['retention']:.0%}"
        lines.append(
            f"| {row['model']} | {row['task']} | {row['metric']} | {number(row['value'])} "
            f"| {retention} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in table["rows"]))
    tasks = table["tasks"]
    figure, axis = plt.subplots(figsize=(max(4, 1.5 * len(tasks) * len(models) / 2), 3.5))
    width = 0.8 / max(1, len(models))
    for number, model in enumerate(models):
        heights = []
        for task in tasks:
            metrics = {
                row["metric"]: row["value"]
                for row in table["rows"]
                if row["model"] == model and row["task"] == task
            }
            main = next((metrics[name] for name in MAIN_METRICS if name in metrics), math.nan)
            heights.append(0 if math.isnan(main) else main)
        axis.bar([i + number * width for i in range(len(tasks))], heights, width, label=model)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    axis.set(ylabel="accuracy (main metric)", ylim=(0, 1.02))
    axis.legend(fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def evaluate_model(directory: str, tasks: list[str], include: list[str], arguments) -> dict:
    """lmms-eval's results for one model directory (the linvid model)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    model_args = f"pretrained={directory}"
    if arguments.model_args:
        model_args += f",{arguments.model_args}"
    output = simple_evaluate(
        model="linvid",
        model_args=model_args,
        tasks=tasks,
        batch_size=arguments.batch_size,
        limit=arguments.limit,
        log_samples=False,
        task_manager=TaskManager(include_path=include or None),
    )
    if not output or "results" not in output:
        raise ValueError(f"lmms-eval returned no results for {directory}")
    return output["results"]


def main_from_arguments(arguments: argparse.Namespace) -> int:
    from linvid.eval.ask import check_model_directory_for_ask

    models = parse_models(arguments.model)
    if arguments.teacher is not None and arguments.teacher not in models:
        raise ValueError(
            f"--teacher {arguments.teacher} is none of the --model names {list(models)}"
        )
    tasks = [task.strip() for task in arguments.tasks.split(",") if task.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    for name, directory in models.items():
        check_model_directory_for_ask(directory, f"--model {name}=")
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        raise ValueError("linvid eval run needs lmms-eval: pip install 'linvid[eval]'") from None
    out = Path(arguments.out)
    resuming = (out / RUN_FILE).is_file()
    if not resuming:
        check_output(out, overwrite=arguments.overwrite, inputs=list(models.values()))
        if arguments.overwrite and out.exists():
            shutil.rmtree(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    include = [str(Path(path).resolve()) for path in arguments.include_path]
    if arguments.niah:
        from linvid.eval.lmms_tasks import write_niah_tasks

        include.append(str(write_niah_tasks(arguments.niah, out / "tasks")))
    settings = {
        "tasks": tasks,
        "model_args": arguments.model_args,
        "limit": arguments.limit,
        "include": include,
    }
    atomic_write_text(out / RUN_FILE, json.dumps({"models": models, **settings}, indent=2))
    per_model = {}
    for name, directory in models.items():
        path = out / "results" / f"{name}.json"
        key = fingerprint(directory, settings)
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == key:
                print(f"{name}: results from an earlier run (same weights and settings)")
                per_model[name] = saved["results"]
                continue
        print(f"{name}: evaluating {directory} on {', '.join(tasks)}", file=sys.stderr)
        results = evaluate_model(directory, tasks, include, arguments)
        atomic_write_text(
            path, json.dumps({"fingerprint": key, "results": results}, indent=2, default=str)
        )
        per_model[name] = results
    table = build_table(per_model, arguments.teacher)
    atomic_write_text(out / "table.json", json.dumps(table, indent=2))
    text = markdown(table)
    atomic_write_text(out / "table.md", text)
    plot(table, out / "table.png")
    print(text)
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'table.png'}")
    return 0


def tasks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--niah", help="a `linvid niah generate` directory")
    parser.add_argument("--vnbench", help="a VNBench question file (JSON list or JSONL)")
    parser.add_argument("--videos", help="the folder of the VNBench videos")
    parser.add_argument("--out", required=True, help="folder for the task files")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def tasks_from_arguments(arguments: argparse.Namespace) -> int:
    from linvid.eval.lmms_tasks import write_niah_tasks, write_vnbench_tasks

    if not arguments.niah and not arguments.vnbench:
        raise ValueError("give --niah DIR and/or --vnbench FILE --videos DIR")
    if arguments.vnbench and not arguments.videos:
        raise ValueError("--vnbench needs --videos, the folder its video paths are relative to")
    inputs = [arguments.niah, arguments.vnbench, arguments.videos]
    out = check_output(arguments.out, overwrite=arguments.overwrite, inputs=inputs)
    if arguments.overwrite and out.exists():
        shutil.rmtree(out)
    names = []
    if arguments.niah:
        write_niah_tasks(arguments.niah, out)
        names += ["linvid_niah", "linvid_niah_gen"]
    if arguments.vnbench:
        write_vnbench_tasks(arguments.vnbench, arguments.videos, out)
        names += ["vnbench", "vnbench_choice"]
    print(f"wrote tasks {', '.join(names)} in {out}")
    print(
        f"run: lmms-eval --model linvid --model_args pretrained=MODEL_DIR --tasks {names[0]} "
        f"--include_path {out} --output_path OUTPUT_DIR"
    )
    return 0
