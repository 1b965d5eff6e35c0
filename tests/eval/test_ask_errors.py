"""`linvid ask` with wrong arguments, wrong model directories and Ctrl-C (issue #12, cases 6-8):
each is refused before anything is loaded or allocated, with one line that names the option or
the directory and says what was expected; a capped frame count is one warning line; Ctrl-C
leaves no traceback. The CLI runs in a subprocess, as a user runs it."""

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from cli_runs import REPO, default_ctrl_c
from cli_runs import run_cli as cli
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

import linvid
from linvid.eval.ask import fit_frame_count
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids
from linvid.video.io import write_video

QUESTION = "what color is the circle ?"
SMALL = ["--min-pixels", "3136", "--max-pixels", "3136", "--max-new-tokens", "2"]
INTERRUPTED = "linvid ask: interrupted."


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """teacher/ and student/ (all-RWKV, streams) with a tokenizer, and model directories that
    are wrong in one way each: no-tokenizer/, text-only/ (a Qwen2 language model),
    pickle-only/ (weights as a pickle .bin only), a-file.txt; clip.mp4 (8 frames) and
    long.mp4 (200 frames)."""
    root = tmp_path_factory.mktemp("ask_errors")
    tokenizer = build_word_tokenizer([QUESTION, "red green blue"])
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(
        tiny_qwen2_5_vl_config(token_ids=token_ids(tokenizer))
    ).eval()
    teacher.save_pretrained(root / "teacher")
    linvid.convert(teacher, "rwkv6-all").save_pretrained(root / "student")
    teacher.save_pretrained(root / "no-tokenizer")
    text_only = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    text_only.save_pretrained(root / "text-only")
    shutil.copytree(root / "teacher", root / "pickle-only")
    (root / "pickle-only" / "model.safetensors").unlink()
    # A pickle a weights-only unpickler refuses (a date): the raw UnpicklingError of the issue.
    torch.save({"saved": datetime.date(2025, 1, 1)}, root / "pickle-only" / "pytorch_model.bin")
    for directory in ("teacher", "student", "text-only", "pickle-only"):
        tokenizer.save_pretrained(root / directory)
    (root / "a-file.txt").write_text("not a model directory\n")
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (8, 3, 56, 112), generator=generator, dtype=torch.uint8)
    write_video(root / "clip.mp4", frames, fps=4)
    frames = torch.randint(0, 256, (200, 3, 56, 56), generator=generator, dtype=torch.uint8)
    write_video(root / "long.mp4", frames, fps=25)
    return root


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `linvid ask: error:` line of a refused run (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "linvid ask: error:" in line]
    return line


def test_min_pixels_above_max_pixels_is_refused_at_once(workspace):
    """Case 6: used to run for over ten minutes (6 GB); refused before the model is loaded."""
    started = time.monotonic()
    result = cli(
        *("ask", str(workspace / "clip.mp4"), QUESTION, "--model", str(workspace / "teacher")),
        *("--sampling", "timestamps", "--min-pixels", "100000000", "--max-pixels", "100000"),
    )
    line = error_line(result)
    assert "--min-pixels 100000000" in line and "--max-pixels 100000" in line
    assert "Loading weights" not in result.stderr  # nothing was loaded
    assert time.monotonic() - started < 120


def test_num_frames_is_capped_by_the_default_max_frames(workspace):
    """Case 7: --num-frames 100000000 allocated 940 GB and died with a traceback; the default
    --max-frames (768, Qwen's) caps it, with one warning line; frames of the 8-frame video
    repeat ("timestamps" sampling)."""
    result = cli(
        *("ask", str(workspace / "clip.mp4"), QUESTION, "--model", str(workspace / "teacher")),
        *("--sampling", "timestamps", "--num-frames", "100000000", "--json", *SMALL),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["counts"]["frames"] == 768
    (warning,) = [line for line in result.stderr.splitlines() if "warning" in line]
    assert "--num-frames 100000000 is capped at --max-frames 768" in warning
    assert "has 8 frames" in warning and "repeat" in warning


def test_num_frames_beyond_the_video_is_capped_for_qwen_sampling(workspace):
    """Case 7: Qwen sampling takes each frame at most once: 100 frames asked of an 8-frame
    video give 8, with one warning line naming the video."""
    result = cli(
        *("ask", str(workspace / "clip.mp4"), QUESTION, "--model", str(workspace / "teacher")),
        *("--num-frames", "100", "--json", *SMALL),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["counts"]["frames"] == 8
    (warning,) = [line for line in result.stderr.splitlines() if "warning" in line]
    assert "clip.mp4 has 8 frames, fewer than 100: sampling 8" in warning


def test_fit_frame_count():
    info = {"path": "v.mp4", "total_frames": 9}
    warnings = []
    assert fit_frame_count(None, 768, info, "qwen", warnings.append) is None
    assert fit_frame_count(6, 768, info, "qwen", warnings.append) == 6
    assert fit_frame_count(4, 768, info, "timestamps", warnings.append) == 4
    assert warnings == []
    assert fit_frame_count(10**8, 768, info, "qwen", warnings.append) == 8
    assert fit_frame_count(20, 16, info, "timestamps", warnings.append) == 16
    assert len(warnings) == 2 and all("\n" not in warning for warning in warnings)
    assert "capped at --max-frames 768" in warnings[0] and "sampling 8" in warnings[0]
    assert "capped at --max-frames 16" in warnings[1] and "repeat" in warnings[1]


# Case 8: each wrong --model directory -> (a phrase of the message, the directory's name).
WRONG_MODELS = {
    "no-tokenizer": "has no tokenizer files (looked for tokenizer.json, vocab.json",
    "a-file.txt": "is a file, not a directory",
    "text-only": "holds a 'qwen2' model (Qwen2ForCausalLM), without a vision tower",
    "pickle-only": "holds pickle weights only (pytorch_model.bin): linvid loads safetensors",
    "missing": "does not exist: expected a local model directory",
}


@pytest.mark.parametrize("name", sorted(WRONG_MODELS))
def test_a_wrong_model_directory_is_named_with_what_was_expected(workspace, name):
    """Case 8: used to give "video tokens do not match, tokens: 0", a hub lookup, a
    1,500-character line or a raw UnpicklingError."""
    directory = workspace / name
    result = cli("ask", str(workspace / "clip.mp4"), QUESTION, "--model", str(directory))
    line = error_line(result)
    assert f"--model {directory} {WRONG_MODELS[name]}" in line
    assert len(line) < 400
    assert "huggingface" not in result.stderr.lower()  # local paths stay local
    assert "Loading weights" not in result.stderr  # refused before loading


def test_ctrl_c_during_ask_prints_no_traceback(workspace):
    """Ctrl-C while a streaming student prefills the video (a real SIGINT): exit 130 and one
    line. The signal is sent once the prefill progress bar is up, so the run is well inside
    the command (the 100-chunk prefill takes seconds more)."""
    command = [
        *(sys.executable, "-m", "linvid.cli", "ask", str(workspace / "long.mp4"), QUESTION),
        *("--model", str(workspace / "student"), "--num-frames", "200", "--chunk-frames", "2"),
        *SMALL,
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_ctrl_c,
    )
    error = bytearray()

    def read_errors():
        while chunk := os.read(process.stderr.fileno(), 4096):
            error.extend(chunk)

    reader = threading.Thread(target=read_errors, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while b"prefill" not in error:
        assert process.poll() is None, bytes(error).decode()[-3000:]
        assert time.monotonic() < deadline, bytes(error).decode()[-3000:]
        time.sleep(0.05)
    time.sleep(0.2)
    assert process.poll() is None, "the run ended before Ctrl-C; give it a longer video"
    process.send_signal(signal.SIGINT)
    output = process.stdout.read()
    process.wait(timeout=120)
    reader.join(timeout=30)
    text = bytes(error).decode()
    assert process.returncode == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.rstrip().splitlines()[-1] == INTERRUPTED, text[-3000:]
    assert output == b""  # no answer
