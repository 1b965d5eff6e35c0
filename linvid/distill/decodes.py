"""The teacher's greedy answers for sequence-level KD (paper 003 eq. 8), generated once and
kept on disk, so a resumed run and later stages over the same data never decode them again.

A store is a folder RUN_DIR/teacher_decodes/<key>, key = a hash of what the answers depend on
(teacher directory, data files, video sampling, prompt settings). Each process appends one
JSON line {"index": sample index, "tokens": [...]} per answer to its own
`rank-<r>.jsonl` and flushes it; reading takes every rank's file, so processes never write the
same file and a line cut short by a kill is ignored (that answer is decoded again).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def decodes_key(**settings) -> str:
    """A short hash of the JSON-serialisable `settings` (sorted by name)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TeacherDecodes:
    """sample index -> the teacher's answer token ids, backed by `directory` (see module)."""

    def __init__(self, directory: str | os.PathLike, rank: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"rank-{rank}.jsonl"
        self._answers: dict[int, list[int]] = {}
        for path in sorted(self.directory.glob("rank-*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed writer
                self._answers[int(record["index"])] = [int(t) for t in record["tokens"]]

    def __contains__(self, index: int) -> bool:
        return index in self._answers

    def __getitem__(self, index: int) -> list[int]:
        return self._answers[index]

    def __setitem__(self, index: int, tokens: list[int]) -> None:
        tokens = [int(token) for token in tokens]
        self._answers[int(index)] = tokens
        with open(self.path, "a", encoding="utf-8") as file:
            file.write("\n" + json.dumps({"index": int(index), "tokens": tokens}) + "\n")

    def __len__(self) -> int:
        return len(self._answers)
