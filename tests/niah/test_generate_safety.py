"""`linvid niah generate` follows the output rule (linvid/outputs.py): a non-empty --out is
replaced only with --overwrite, and then wholly (no stale videos); a Ctrl-C exits 130 with one
line and leaves the previous --out exactly as it was (never old JSONLs over new videos)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import file_hashes, interrupt_when

from linvid.cli import main
from linvid.niah.dataset import write_dataset
from linvid.outputs import OutputExistsError

SMALL = ["--tasks", "retrieval", "--frames", "16", "--n", "2"]


def small_dataset(out: Path, seed: int = 0) -> None:
    """What `linvid niah generate --out OUT *SMALL --seed SEED` writes (in this process: the
    CLI's start-up is slow)."""
    write_dataset(out, tasks=("retrieval",), frames=(16,), n=2, seed=seed)


def generate(*arguments, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linvid.cli", "niah", "generate", *map(str, arguments)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_a_non_empty_out_is_refused_without_overwrite_and_left_as_it_was(tmp_path):
    out = tmp_path / "niah"
    small_dataset(out, seed=1)
    before = file_hashes(out)
    result = generate("--out", out, *SMALL, "--seed", "2")
    assert result.returncode == 2, result.stderr
    line = result.stderr.splitlines()[0]
    assert "linvid niah: error: --out" in line and str(out) in line
    assert "not empty" in line and "--overwrite" in line
    assert "Traceback" not in result.stderr
    assert file_hashes(out) == before
    assert sorted(os.listdir(tmp_path)) == ["niah"]  # no partial directory left beside it


def test_overwrite_replaces_the_whole_output_with_no_stale_videos(tmp_path, capsys):
    out = tmp_path / "niah"
    write_dataset(out, tasks=("retrieval", "ordering"), frames=(16,), n=3)
    first = set(file_hashes(out))
    assert main(["niah", "generate", "--out", str(out), *SMALL, "--seed", "4", "--overwrite"]) == 0
    assert "wrote 2 videos" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "vnbench.jsonl").read_text().splitlines()]
    videos = {f"videos/{path.name}" for path in (out / "videos").iterdir()}
    assert videos == {record["video"] for record in records}  # nothing of the first run
    assert len(videos) == 2 and {record["seed"] for record in records} == {4_000_000, 4_000_001}
    assert len(first) == 2 + 6 and not videos >= (first - {"vnbench.jsonl"})
    assert sorted(os.listdir(tmp_path)) == ["niah"]


def test_write_dataset_follows_the_same_rule(tmp_path):
    out = tmp_path / "niah"
    write_dataset(out, tasks=("retrieval", "ordering"), frames=(16,), n=2, seed=0)
    before = file_hashes(out)
    with pytest.raises(OutputExistsError, match=f"{out} exists and is not empty.*--overwrite"):
        write_dataset(out, tasks=("retrieval",), frames=(16,), n=1, seed=1)
    assert file_hashes(out) == before
    summary = write_dataset(out, tasks=("retrieval",), frames=(16,), n=1, seed=1, overwrite=True)
    assert summary["samples"] == 1
    assert sorted(file_hashes(out)) == [
        "conversations.jsonl",
        "videos/retrieval_0016_000000.mp4",
        "vnbench.jsonl",
    ]
    video = "videos/retrieval_0016_000000.mp4"
    assert file_hashes(out)[video] != before[video]  # seed 1's video, not seed 0's
    # An empty directory is no earlier output: it is filled without --overwrite.
    (tmp_path / "empty").mkdir()
    assert write_dataset(tmp_path / "empty", tasks=("retrieval",), n=1)["samples"] == 1


@pytest.mark.parametrize("earlier", [True, False], ids=["over-an-earlier-out", "fresh-out"])
def test_ctrl_c_leaves_the_out_directory_as_it_was(tmp_path, earlier):
    parent = tmp_path / "data"
    parent.mkdir()
    out = parent / "niah"
    if earlier:
        small_dataset(out)
    before = file_hashes(out) if earlier else None
    old_videos = set(parent.rglob("*.mp4"))
    command = [sys.executable, "-m", "linvid.cli", "niah", "generate", "--out", str(out)]
    command += ["--frames", "16", "--n", "300", "--seed", "9"]
    command += ["--overwrite"] if earlier else []
    # Interrupt once the new run has written a video (in its partial directory).
    code, _, stderr = interrupt_when(
        command, lambda: set(parent.rglob("*.mp4")) - old_videos, tmp_path
    )
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert "linvid niah: interrupted. The --out directory is as it was; rerun the command." in (
        stderr
    )
    if earlier:
        assert file_hashes(out) == before  # the old JSONLs still describe the old videos
        assert os.listdir(parent) == ["niah"]
    else:
        assert os.listdir(parent) == []  # neither an --out nor a partial directory
