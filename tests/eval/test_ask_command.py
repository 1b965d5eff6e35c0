"""`linvid ask` end to end: a saved model directory, a video file written and read back."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.cli import main
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids
from linvid.video.io import write_video

QUESTION = "what color is the circle ?"
SMALL = ["--min-pixels", "3136", "--max-pixels", "6272", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_word_tokenizer([QUESTION, "red green blue"])
    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config(token_ids=token_ids(tokenizer))
    teacher = Qwen2_5_VLForConditionalGeneration(config).eval()
    dirs = {"teacher": root / "teacher", "student": root / "student"}
    teacher.save_pretrained(dirs["teacher"])
    linvid.convert(teacher, "rwkv6-all").save_pretrained(dirs["student"])
    for path in dirs.values():
        tokenizer.save_pretrained(path)
    return dirs


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (8, 3, 56, 112), generator=generator, dtype=torch.uint8)
    write_video(path, frames, fps=4)
    return str(path)


def run_json(capsys, *arguments):
    assert main(["ask", *arguments, "--json", *SMALL]) == 0
    return json.loads(capsys.readouterr().out)


def test_teacher_answers_a_video_file(model_dirs, video, capsys):
    result = run_json(
        capsys, video, QUESTION, "--model", str(model_dirs["teacher"]), "--num-frames", "8"
    )
    assert result["model"] == "Qwen2_5_VLForConditionalGeneration" and not result["streamed"]
    assert result["counts"]["frames"] == 8 and result["style"] == "standard"
    assert {"load_model", "total", "generate"} <= set(result["seconds"])


def test_student_streams_and_matches_its_whole_video_answer(model_dirs, video, capsys):
    common = [video, QUESTION, "--model", str(model_dirs["student"]), "--num-frames", "8"]
    streamed = run_json(capsys, *common, "--chunk-frames", "2")
    whole = run_json(capsys, *common, "--stream", "off")
    assert streamed["streamed"] and not whole["streamed"]
    assert streamed["style"] == "sandwich"  # all-RWKV student, paper 001
    assert streamed["new_tokens"] == whole["new_tokens"]
    assert streamed["counts"]["video_tokens"] == whole["counts"]["video_tokens"]


def test_unreadable_video_is_one_clear_line(model_dirs, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    code = main(["ask", str(broken), QUESTION, "--model", str(model_dirs["teacher"])])
    error = capsys.readouterr().err
    assert code == 2 and "broken.mp4" in error and "Traceback" not in error


def test_tokens_per_frame_option(model_dirs, video, capsys):
    result = run_json(
        capsys,
        video,
        QUESTION,
        "--model",
        str(model_dirs["student"]),
        "--num-frames",
        "8",
        "--tokens-per-frame",
        "2",
    )
    assert not result["streamed"] and result["counts"]["video_tokens"] == 4 * 2
