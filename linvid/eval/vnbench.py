"""VNBench (VideoNIAH; paper 000 §5.1 evaluates on it) in its own format, scored with its own
circular rule. Pure: no model and no lmms-eval here (`linvid.eval.lmms_tasks` wires it in).

Annotation format (VideoNIAH's question files, a JSON list or JSONL), one record per
(question, try):
    video     path of the video (relative to the video folder, or absolute)
    question  the question text
    options   the 4 option texts, in this try's order
    gt        the right answer: its text (one of the options), its letter or its index 0-3
    type      the sub-task, e.g. "ret_insert1", "ord_edit2", "cnt_insert1"
    try       0-3: which of the 4 rotations of the options this record shows
`linvid niah generate` writes one record per question (no `try`; type "retrieval",
"ordering" or "counting"; `depth`, the first needle's relative position): `expand_tries` makes
its 4 tries, rotated as `linvid.niah.scoring.rotate_options` does.

Scoring (VideoNIAH's evaluation/eval.py): a question is right only if all 4 of its tries are
answered right; accuracy is computed per type and "overall" is the mean over types. A
generated answer is read as VideoNIAH reads it: the text before the first ".", then the first
of the letters A, B, C, D (in that order) it contains.
"""

from __future__ import annotations

import json
import math
import os
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping

TRIES = 4
LETTERS = string.ascii_uppercase[:TRIES]
TASK_PREFIXES = {"ret": "retrieval", "ord": "ordering", "cnt": "counting"}
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
REQUIRED_FIELDS = ("video", "question", "options", "gt")


def read_annotations(path: str | os.PathLike) -> list[dict]:
    """Records of a VNBench-style question file: a JSON list, or JSONL (one object a line).
    Raises ValueError naming the file and what is wrong."""
    text = open(path, encoding="utf-8").read()
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not a JSON list or JSONL of question records ({error})"
        ) from error
    if not records:
        raise ValueError(f"{path} holds no question records")
    for number, record in enumerate(records):
        check_record(record, f"{path}, record {number}")
    return records


def check_record(record, where: str) -> None:
    """A question record has the fields VNBench's format needs, 4 options and a usable gt."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(
            f"{where}: missing {', '.join(missing)}; a VNBench record needs "
            f"{', '.join(REQUIRED_FIELDS)} (and type, try)"
        )
    options = record["options"]
    if not (isinstance(options, list) and len(options) == TRIES):
        raise ValueError(f"{where}: options must be a list of {TRIES} texts, got {options!r}")
    answer_index(record, where)
    if "try" in record and record["try"] not in range(TRIES):
        raise ValueError(f"{where}: try must be 0..{TRIES - 1}, got {record['try']!r}")


def answer_index(record, where: str = "record") -> int:
    """Index of the right option: `gt` as an option's text, a letter A-D or an index 0-3
    (the three spellings VideoNIAH's files and scripts use)."""
    gt, options = record["gt"], record["options"]
    if isinstance(gt, bool):
        raise ValueError(f"{where}: gt must be an option text, letter or index, got {gt!r}")
    if isinstance(gt, int) and 0 <= gt < len(options):
        return gt
    if isinstance(gt, str):
        if gt in options:
            return options.index(gt)
        if len(gt) == 1 and gt in LETTERS:
            return LETTERS.index(gt)
    raise ValueError(
        f"{where}: gt {gt!r} is none of the options {options!r}, a letter A-D or an index 0-3"
    )


def expand_tries(records: Iterable[Mapping]) -> list[dict]:
    """Every record as its 4 tries: a record with `try` is kept as it is; one without becomes
    4 copies, try k with the options rotated left by k (option i moves to i - k mod 4) and
    `gt` the right option's text."""
    expanded = []
    for record in records:
        if "try" in record:
            expanded.append(dict(record))
            continue
        options = list(record["options"])
        right = options[answer_index(record)]
        for shift in range(TRIES):
            rotated = options[shift:] + options[:shift]
            expanded.append({**record, "options": rotated, "gt": right, "try": shift})
    return expanded


def question_key(record: Mapping) -> str:
    """What the 4 tries of one question share: VideoNIAH's question_id without its try suffix
    when there is one, else the video, type and question."""
    if "question_id" in record and "try" in record:
        suffix = f"_{record['try']}"
        identifier = str(record["question_id"])
        if identifier.endswith(suffix):
            return identifier[: -len(suffix)]
    return f"{record['video']}|{record.get('type', '')}|{record['question']}"


def task_of(kind: str) -> str:
    """retrieval / ordering / counting for VNBench's types ("ret_insert1" -> retrieval) and
    for linvid's own; any other type is its own task."""
    return TASK_PREFIXES.get(str(kind).split("_")[0], str(kind))


def letter_prompt(record: Mapping) -> str:
    """VideoNIAH's prompt: the question, the lettered options, the letter instruction."""
    lines = [record["question"]]
    lines += [
        f"{letter}. {option}" for letter, option in zip(LETTERS, record["options"], strict=True)
    ]
    return "\n".join([*lines, LETTER_INSTRUCTION])


def parse_letter(text: str) -> str | None:
    """The letter VideoNIAH reads from a generated answer: the text before the first ".",
    then the first of A, B, C, D it contains (checked in that order); None if none."""
    head = str(text).split(".")[0]
    for letter in LETTERS:
        if letter in head:
            return letter
    return None


def position_bin(depth, bins: int = 4) -> int | None:
    """Which of `bins` equal parts of the video the first needle falls in (depth in [0, 1]),
    None when the record has no position."""
    if depth is None or (isinstance(depth, float) and math.isnan(depth)):
        return None
    return min(int(float(depth) * bins), bins - 1)


def circular_scores(results: Iterable[Mapping], bins: int = 4) -> dict:
    """VideoNIAH's scores from per-try results, each {"key" (question_key), "type", "try",
    "correct", optionally "depth"}.

    Returns {"overall": mean over types of the circular accuracy (VideoNIAH's Overall), "all"
    (over questions, as linvid's demo counts), "by_type", "by_task"
    (retrieval / ordering / counting), "by_position" (1..bins, by the first needle's depth;
    only questions with a depth), "single_try" (accuracy of try 0 alone), "questions",
    "incomplete" (questions without all 4 tries: they count as wrong, as in VideoNIAH)}."""
    questions: dict[str, dict] = {}
    for result in results:
        question = questions.setdefault(
            result["key"],
            {"type": result.get("type", ""), "depth": result.get("depth"), "tries": {}},
        )
        attempt = int(result["try"])
        if attempt in question["tries"]:
            raise ValueError(f"question {result['key']!r} has try {attempt} twice")
        question["tries"][attempt] = bool(result["correct"])
    by_type, by_task, by_position = defaultdict(list), defaultdict(list), defaultdict(list)
    single, every, incomplete = [], [], 0
    for question in questions.values():
        tries = question["tries"]
        complete = set(tries) == set(range(TRIES))
        incomplete += not complete
        right = complete and all(tries.values())
        every.append(right)
        by_type[question["type"]].append(right)
        by_task[task_of(question["type"])].append(right)
        where = position_bin(question["depth"], bins)
        if where is not None:
            by_position[where + 1].append(right)
        if 0 in tries:
            single.append(tries[0])

    def mean(values) -> float:
        return sum(values) / len(values) if values else float("nan")

    types = {kind: mean(values) for kind, values in sorted(by_type.items())}
    return {
        "overall": mean(list(types.values())),
        "all": mean(every),
        "by_type": types,
        "by_task": {task: mean(values) for task, values in sorted(by_task.items())},
        "by_position": {where: mean(values) for where, values in sorted(by_position.items())},
        "single_try": mean(single),
        "questions": len(questions),
        "incomplete": incomplete,
    }
