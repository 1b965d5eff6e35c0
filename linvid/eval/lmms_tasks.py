"""lmms-eval tasks shipped with linvid: `linvid_niah` over `linvid niah generate` output, and
`vnbench` over a local copy of VNBench (VideoNIAH's question file and videos), both scored with
VideoNIAH's circular rule (`linvid.eval.vnbench`).

lmms-eval reads a task from a YAML file found through `--include_path`; its data files must be
named by path in the YAML. So a task is written for one data set: `write_niah_tasks(DATA, OUT)`
(also run by `linvid niah generate`, into DATA/lmms_eval) and `write_vnbench_tasks(ANNOTATION,
VIDEOS, OUT)` (`linvid eval tasks`) write OUT/<task>.yaml and OUT/<task>.jsonl, the questions
as lmms-eval documents (every try of every question, video paths absolute). The YAML names this
module's functions (`!function linvid.eval.lmms_tasks....`), so no code is copied.

Tasks written:
- linvid_niah       options scored by likelihood (output_type multiple_choice: lmms-eval calls
                    the model's loglikelihood once per option; the highest is the pick), as
                    linvid's demo scores them;
- linvid_niah_gen   the answer generated (generate_until) and compared with the right option's
                    text (case and a final full stop ignored);
- vnbench           VideoNIAH's protocol: lettered options, the letter generated, read as its
                    evaluation script reads it (`parse_letter`);
- vnbench_choice    the same questions with the option texts scored by likelihood.
Metrics (each aggregated over all tries of every question): circular (VideoNIAH's Overall,
the mean over types of the share of questions right in all 4 tries), all (over questions),
single_try (try 0 only), retrieval / ordering / counting, and position_1..4 (questions by the
quarter of the video their first needle is in; NaN when the data has no needle positions).
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from linvid.eval.vnbench import (
    LETTERS,
    answer_index,
    circular_scores,
    expand_tries,
    letter_prompt,
    parse_letter,
    question_key,
    read_annotations,
    task_of,
)
from linvid.outputs import atomic_write_text

NIAH_TASKS = ("linvid_niah", "linvid_niah_gen")
VNBENCH_TASKS = ("vnbench", "vnbench_choice")
TASKS_FOLDER = "lmms_eval"  # where `linvid niah generate` writes its tasks inside its output
POSITIONS = 4
METRICS = (
    "circular",
    "all",
    "single_try",
    "retrieval",
    "ordering",
    "counting",
    *(f"position_{where}" for where in range(1, POSITIONS + 1)),
)


# ---------------------------------------------------------------------------------------------
# Documents


def document(record: Mapping, video_path: str, prompt: str, answer_by: str) -> dict:
    """One try of one question as an lmms-eval document (a row of the task's JSONL).
    answer_by: how a generated answer names its option, "letter" or "text"."""
    depth = record.get("depth")
    if depth is None and record.get("needle_time") and record.get("duration"):
        depth = float(record["needle_time"][0]) / float(record["duration"])
    return {
        "video_path": video_path,
        "question": record["question"],
        "options": list(record["options"]),
        "answer_index": answer_index(record),
        "type": str(record.get("type", "")),
        "task": task_of(record.get("type", "")),
        "try": int(record["try"]),
        "key": question_key(record),
        "depth": None if depth is None else float(depth),
        "num_frames": record.get("num_frames"),
        "prompt": prompt,
        "answer_by": answer_by,
    }


def niah_documents(data_dir: str | os.PathLike) -> list[dict]:
    """Every try of every question of a `linvid niah generate` output directory, with the
    prompt linvid's demo asks (`linvid.niah.generate.prompt_for`)."""
    from linvid.niah.dataset import VNBENCH_FILE
    from linvid.niah.generate import prompt_for

    root = Path(data_dir).resolve()
    annotation = root / VNBENCH_FILE
    if not annotation.is_file():
        raise ValueError(
            f"{data_dir} has no {VNBENCH_FILE}: expected a directory written by "
            "`linvid niah generate --out DIR`"
        )
    return [
        document(
            record,
            str(root / record["video"]),
            prompt_for(record["question"], record["options"]),
            "text",
        )
        for record in expand_tries(read_annotations(annotation))
    ]


def vnbench_documents(annotation: str | os.PathLike, video_dir: str | os.PathLike) -> list[dict]:
    """Every try of every question of a VNBench question file (see linvid.eval.vnbench), with
    VideoNIAH's lettered prompt; videos are looked up under `video_dir` (paths in the file are
    relative to it, or absolute). A missing video is named."""
    videos = Path(video_dir).resolve()
    documents = []
    for record in expand_tries(read_annotations(annotation)):
        path = Path(record["video"])
        path = path if path.is_absolute() else videos / path
        if not path.is_file():
            raise ValueError(f"{annotation}: video {record['video']!r} is not in {video_dir}")
        documents.append(document(record, str(path), letter_prompt(record), "letter"))
    return documents


# ---------------------------------------------------------------------------------------------
# Task files


def _yaml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def task_yaml(name: str, data_file: str, *, choice: bool, max_new_tokens: int = 16) -> str:
    """The lmms-eval task YAML for `name` over the documents in `data_file`."""
    function = "!function linvid.eval.lmms_tasks."
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml_string(data_file)}",
        "test_split: test",
        f"doc_to_visual: {function}doc_to_visual",
        f"doc_to_text: {function}doc_to_text",
    ]
    if choice:
        lines += [
            "output_type: multiple_choice",
            f"doc_to_choice: {function}doc_to_choice",
            "doc_to_target: answer_index",
            'target_delimiter: ""',
            f"process_results: {function}process_choice",
        ]
    else:
        lines += [
            "output_type: generate_until",
            "doc_to_target: answer_index",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  temperature: 0",
            "  do_sample: false",
            f"process_results: {function}process_generation",
        ]
    lines.append("metric_list:")
    for metric in METRICS:
        lines += [
            f"  - metric: {metric}",
            f"    aggregation: {function}aggregate_{metric}",
            "    higher_is_better: true",
        ]
    lines += ["metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def write_tasks(out_dir: str | os.PathLike, tasks: Mapping[str, tuple[list[dict], bool]]) -> Path:
    """Write OUT/<name>.jsonl (the documents) and OUT/<name>.yaml for each task name ->
    (documents, scored by likelihood); each file is written atomically. Returns OUT, the
    folder to give lmms-eval as --include_path."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name, (documents, choice) in tasks.items():
        data_file = out / f"{name}.jsonl"
        atomic_write_text(data_file, "".join(json.dumps(doc) + "\n" for doc in documents))
        atomic_write_text(out / f"{name}.yaml", task_yaml(name, str(data_file), choice=choice))
    return out


def write_niah_tasks(data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """`linvid_niah` and `linvid_niah_gen` over a `linvid niah generate` directory."""
    documents = niah_documents(data_dir)
    return write_tasks(
        out_dir, {"linvid_niah": (documents, True), "linvid_niah_gen": (documents, False)}
    )


def write_vnbench_tasks(
    annotation: str | os.PathLike, video_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """`vnbench` and `vnbench_choice` over a local VNBench copy."""
    documents = vnbench_documents(annotation, video_dir)
    return write_tasks(
        out_dir, {"vnbench": (documents, False), "vnbench_choice": (documents, True)}
    )


# ---------------------------------------------------------------------------------------------
# The functions the YAML names (lmms-eval calls them)


def doc_to_visual(doc: Mapping) -> list[str]:
    return [doc["video_path"]]


def doc_to_text(doc: Mapping, lmms_eval_specific_kwargs: Mapping | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['prompt']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc: Mapping) -> list[str]:
    return list(doc["options"])


def _result(doc: Mapping, choice: int | None) -> dict:
    record = {
        "key": doc["key"],
        "type": doc["type"],
        "try": doc["try"],
        "depth": doc["depth"],
        "choice": choice,
        "correct": choice == doc["answer_index"],
    }
    return {metric: record for metric in METRICS}


def response_loss(response) -> float:
    """The loss of one option from lmms-eval's response: the linvid model's (negative
    log-likelihood, is_greedy) pair, which lmms-eval 0.7.3 hands to process_results as its
    str() (`unwrap_generation_output` stringifies every non-text response)."""
    if isinstance(response, str):
        response = ast.literal_eval(response)
    if isinstance(response, tuple | list):
        response = response[0]
    return float(response)


def process_choice(doc: Mapping, results: list) -> dict:
    """results: one response per option; the pick is the option with the lowest loss
    (negative log-likelihood: lmms-eval's argmin convention), the first on ties."""
    losses = [response_loss(response) for response in results]
    return _result(doc, min(range(len(losses)), key=lambda index: (losses[index], index)))


def generated_choice(doc: Mapping, text: str) -> int | None:
    """The option a generated answer names: by letter for lettered prompts (VideoNIAH's
    reading), else by its text (case, spaces and a final full stop ignored); None if none."""
    if doc["answer_by"] == "letter":
        letter = parse_letter(text)
        return None if letter is None else LETTERS.index(letter)
    said = " ".join(str(text).strip().rstrip(".").lower().split())
    for index, option in enumerate(doc["options"]):
        if said == " ".join(option.lower().split()):
            return index
    return None


def process_generation(doc: Mapping, results: list) -> dict:
    return _result(doc, generated_choice(doc, results[0]))


def scores(items: Iterable[Mapping]) -> dict:
    return circular_scores(items, bins=POSITIONS)


def aggregate_circular(items) -> float:
    return scores(items)["overall"]


def aggregate_all(items) -> float:
    return scores(items)["all"]


def aggregate_single_try(items) -> float:
    return scores(items)["single_try"]


def _task_accuracy(items, task: str) -> float:
    return scores(items)["by_task"].get(task, float("nan"))


def aggregate_retrieval(items) -> float:
    return _task_accuracy(items, "retrieval")


def aggregate_ordering(items) -> float:
    return _task_accuracy(items, "ordering")


def aggregate_counting(items) -> float:
    return _task_accuracy(items, "counting")


def _position_accuracy(items, where: int) -> float:
    return scores(items)["by_position"].get(where, float("nan"))


def aggregate_position_1(items) -> float:
    return _position_accuracy(items, 1)


def aggregate_position_2(items) -> float:
    return _position_accuracy(items, 2)


def aggregate_position_3(items) -> float:
    return _position_accuracy(items, 3)


def aggregate_position_4(items) -> float:
    return _position_accuracy(items, 4)
