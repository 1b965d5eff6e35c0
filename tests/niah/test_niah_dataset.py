import json
import os

import numpy as np
import pytest

from linvid.cli import main
from linvid.distill.data import read_conversations
from linvid.niah.dataset import parse_frames, parse_tasks, write_dataset
from linvid.niah.generate import COLOURS, NEEDLE_SPAN, TASKS, make_sample, prompt_text
from linvid.video.io import load_video, probe_video


def nearest_colour(pixels: np.ndarray) -> str:
    mean = pixels.reshape(-1, 3).astype(np.float32).mean(0)
    return min(COLOURS, key=lambda name: np.linalg.norm(mean - np.float32(COLOURS[name])))


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "niah"
    code = main(["niah", "generate", "--out", str(out), "--frames", "16:32", "--n", "2",
                 "--seed", "3"])  # fmt: skip
    assert code == 0
    assert "wrote 12 videos" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "vnbench.jsonl").read_text().splitlines()]
    assert len(records) == 12  # 2 frame counts x 3 tasks x 2
    assert {(r["type"], r["num_frames"]) for r in records} == {
        (task, frames) for task in TASKS for frames in (16, 32)
    }
    conversations = read_conversations(out / "conversations.jsonl")
    assert len(conversations) == 12
    for record, conversation in zip(records, conversations, strict=True):
        sample = make_sample(record["type"], record["num_frames"], record["seed"])
        assert record["options"] == list(sample.options)
        assert record["gt"] == sample.answer == record["options"][record["answer_index"]]
        assert record["gt_option"] == "ABCD"[sample.answer_index]
        assert record["needle_time"] == [float(start) for start in sample.events]  # 1 fps
        assert record["depth"] == sample.depth
        assert conversation.video == os.path.normpath(out / record["video"])
        assert conversation.turns == (("<video>\n" + prompt_text(sample), sample.answer),)
        info = probe_video(conversation.video)
        assert info["total_frames"] == record["num_frames"]
        assert info["size"] == (56, 56)


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    texts = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_dataset(tmp_path / name, tasks=("ordering",), frames=(16,), n=3, seed=seed)
        texts.append((tmp_path / name / "vnbench.jsonl").read_text())
    assert texts[0] == texts[1] != texts[2]


@pytest.mark.parametrize("size", [56, 28])
def test_mp4_round_trip_keeps_needle_colours(tmp_path, size):
    summary = write_dataset(tmp_path, frames=(32,), n=4, seed=5, size=size)
    for line in open(summary["vnbench"]):
        record = json.loads(line)
        sample = make_sample(record["type"], 32, record["seed"], size=size)
        pixels = {"min_pixels": size * size, "max_pixels": size * size}  # as the demo reads
        frames, meta = load_video(tmp_path / record["video"], fps=1.0, **pixels)
        assert meta["frame_indices"] == list(range(32))  # 1 fps: every frame
        frames = frames.permute(0, 2, 3, 1).numpy()
        assert frames.shape == sample.frames.shape
        for start, colour in zip(sample.events, sample.needle_colours, strict=True):
            for frame in range(start, start + NEEDLE_SPAN):
                mask = (sample.frames[frame] == COLOURS[colour]).all(-1)
                assert nearest_colour(frames[frame][mask]) == colour
                error = np.abs(frames[frame][mask].astype(int) - COLOURS[colour])
                assert np.median(error) <= 4
        # No needle colour anywhere else after decoding.
        away = np.setdiff1d(np.arange(32), sample.needle_frames)
        for colour in COLOURS:
            distance = np.linalg.norm(frames[away].astype(np.float32) - COLOURS[colour], axis=-1)
            assert (distance < 60).sum() == 0


def test_parse_frames_and_tasks():
    assert parse_frames("16:256") == (16, 32, 64, 128, 256)
    assert parse_frames("16:100") == (16, 32, 64)
    assert parse_frames("64,16") == (16, 64)
    assert parse_frames("32") == (32,)
    assert parse_frames("16,16") == (16,)
    assert parse_tasks("all") == TASKS
    assert parse_tasks("counting, retrieval") == ("counting", "retrieval")
    for bad in ("", "16:", "a:b", "256:16", "0:16", "-4", "16:32:64"):
        with pytest.raises(ValueError, match="--frames"):
            parse_frames(bad)
    for bad in ("", "retrieval,sorting", "retrieval,retrieval", "retrieval;ordering"):
        with pytest.raises(ValueError, match="--tasks"):
            parse_tasks(bad)


def test_cli_errors(tmp_path, capsys):
    for arguments, message in (
        (["--tasks", "retrieval,sorting"], "unknown 'sorting'"),
        (["--frames", "32:16"], "--frames must be"),
        (["--frames", "0,16"], "--frames entries must be >= 1"),
        (["--tasks", "counting", "--frames", "8"], "needs at least 14 frames"),
        (["--n", "0"], "n (samples per task and frame count)"),
        (["--size", "57"], "size must be even"),
    ):
        code = main(["niah", "generate", "--out", str(tmp_path / "x"), *arguments])
        assert code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
