"""lmms-eval drives linvid models through the `linvid` plugin (issue #13), and scores them as
linvid's own evaluator does.

A tiny teacher and two students (rwkv6-all, which streams, and linmu), a real
Qwen2_5_VLProcessor, 8 needle videos from `linvid niah generate`'s writer and the
`linvid_niah` / `linvid_niah_gen` tasks written for them: the teacher through lmms-eval's own
CLI, the students through its Python API (`simple_evaluate`). For every try of every question
the option lmms-eval picked must be the one linvid's option scoring (`linvid.eval.options.
evaluate`, what the demo uses) picks, the generated answer the one `linvid ask` gives, and
lmms-eval's circular accuracy the one VideoNIAH's rule gives on linvid's picks."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.eval.ask import ask_video_file
from linvid.eval.lmms_tasks import write_niah_tasks
from linvid.eval.options import AnswerEncoder, evaluate
from linvid.eval.student_view import InferenceSettings, StudentView
from linvid.eval.vnbench import circular_scores
from linvid.models.processor import build_bpe_tokenizer, build_processor, token_ids
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.niah.dataset import write_dataset
from linvid.niah.generate import vocabulary
from linvid.video.io import load_video

PIXELS = 56 * 56
MODEL_ARGS = f"min_pixels={PIXELS},max_pixels={PIXELS},fps=1"
PIXEL_ARGS = {"min_pixels": PIXELS, "max_pixels": PIXELS, "fps": 1}
MAX_NEW_TOKENS = 16  # the generation tasks' max_new_tokens
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    tokenizer = build_bpe_tokenizer([" ".join(vocabulary())] * 4)
    processor = build_processor(tokenizer)
    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config(num_layers=2, token_ids=token_ids(tokenizer))
    teacher = Qwen2_5_VLForConditionalGeneration(config).eval()
    models = {
        "teacher": teacher,
        "rwkv6-all": linvid.convert(teacher, "rwkv6-all"),
        "linmu": linvid.convert(teacher, "linmu"),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    write_dataset(root / "data", tasks=("retrieval", "counting"), frames=(16,), n=4)
    write_niah_tasks(root / "data", root / "tasks")
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def documents(workspace, task):
    lines = (workspace / "tasks" / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def linvid_choices(directory, docs) -> list[int]:
    """linvid's own evaluator on the documents' videos, prompts and options: frames sampled
    as `linvid ask` samples them, options scored by `linvid.eval.options.evaluate`."""
    model = linvid.load(directory).eval()
    from linvid.models.processor import load_processor

    processor = load_processor(directory)
    style = (
        "sandwich"
        if model.config.model_type != "qwen2_5_vl" and "rwkv" in str(model.config.linvid_plan)
        else "standard"
    )
    choices = []
    for doc in docs:
        frames, meta = load_video(
            doc["video_path"], fps=1.0, max_frames=768, min_pixels=PIXELS, max_pixels=PIXELS
        )
        encoder = AnswerEncoder(
            processor.tokenizer,
            model.config,
            style=style,
            sample_fps=meta["sample_fps"],
            processor=processor,
        )
        question = type("Question", (), {})()
        question.frames = frames.permute(0, 2, 3, 1)
        question.options = doc["options"]
        question.prompt = doc["prompt"]
        question.answer_index = doc["answer_index"]
        result = evaluate(
            model,
            processor.tokenizer,
            [question],
            encoder=encoder,
            prepare=StudentView(InferenceSettings(prompt_style=style)),
        )
        choices.append(result["records"][0]["choice"])
    return choices


def linvid_answers(directory, docs) -> list[str]:
    return [
        ask_video_file(
            str(directory),
            doc["video_path"],
            doc["prompt"],
            min_pixels=PIXELS,
            max_pixels=PIXELS,
            max_new_tokens=MAX_NEW_TOKENS,
        )[0].text.strip()
        for doc in docs
    ]


def circular_of(docs, choices) -> float:
    return circular_scores(
        {
            "key": doc["key"],
            "type": doc["type"],
            "try": doc["try"],
            "correct": choice == doc["answer_index"],
        }
        for doc, choice in zip(docs, choices, strict=True)
    )["overall"]


def response(sample) -> str:
    """A generation sample's answer (lmms-eval logs it as a string, or a one-item list)."""
    answer = sample["filtered_resps"]
    return answer if isinstance(answer, str) else answer[0]


def check_against_linvid(workspace, name, results, samples):
    """lmms-eval's picks, answers and accuracies against linvid's own."""
    choice_docs, generation_docs = (
        documents(workspace, "linvid_niah"),
        documents(workspace, "linvid_niah_gen"),
    )
    picked = {sample["doc_id"]: sample["circular"]["choice"] for sample in samples["linvid_niah"]}
    assert sorted(picked) == list(range(len(choice_docs))) == list(range(32))
    expected = linvid_choices(workspace / name, choice_docs)
    assert [picked[index] for index in range(len(choice_docs))] == expected
    assert results["linvid_niah"]["circular,none"] == pytest.approx(
        circular_of(choice_docs, expected)
    )

    said = {sample["doc_id"]: response(sample) for sample in samples["linvid_niah_gen"]}
    answers = linvid_answers(workspace / name, generation_docs)
    assert [said[index].strip() for index in range(len(generation_docs))] == answers
    assert any(answers)  # the comparison compared something


def test_lmms_eval_cli_scores_the_teacher_as_linvid_does(workspace, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "lmms_eval",
        "--model", "linvid",
        "--model_args", f"pretrained={workspace / 'teacher'},{MODEL_ARGS}",
        "--tasks", "linvid_niah,linvid_niah_gen",
        "--include_path", str(workspace / "tasks"),
        "--batch_size", "4",
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=900)
    # lmms-eval 0.7.3 exits 0 after an error: the results file is the proof it finished
    results_files = list(out.rglob("*_results.json"))
    assert run.returncode == 0 and results_files, run.stderr[-3000:]
    results = json.loads(results_files[0].read_text())["results"]
    samples = {
        task: [
            json.loads(line)
            for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()
        ]
        for task in ("linvid_niah", "linvid_niah_gen")
    }
    check_against_linvid(workspace, "teacher", results, samples)


@pytest.mark.parametrize("student", ["rwkv6-all", "linmu"])
def test_simple_evaluate_scores_students_as_linvid_does(workspace, student):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    output = simple_evaluate(
        model="linvid",
        model_args=f"pretrained={workspace / student},{MODEL_ARGS}",
        tasks=["linvid_niah", "linvid_niah_gen"],
        batch_size=4,
        log_samples=True,
        task_manager=TaskManager(include_path=str(workspace / "tasks")),
    )
    check_against_linvid(workspace, student, output["results"], output["samples"])


def test_lmms_eval_builtin_qwen2_5_vl_refuses_a_student(workspace, monkeypatch):
    """The built-in model loads with Qwen2_5_VLForConditionalGeneration, which does not know
    a student's plan: the student's checkpoint layout makes it stop instead of scoring
    randomly initialised layers. (Its module imports decord at the top, which only its video
    reading uses and which the eval extra does not install: an empty stand-in lets the class
    import; the loading code run is lmms-eval's own.)"""
    monkeypatch.setitem(sys.modules, "decord", types.ModuleType("decord"))
    from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

    with pytest.raises(OSError, match="model.safetensors"):
        Qwen2_5_VL(pretrained=str(workspace / "rwkv6-all"), device="cpu", device_map="cpu")
    assert Qwen2_5_VL(pretrained=str(workspace / "teacher"), device="cpu", device_map="cpu")


def test_linvid_eval_run_writes_one_table_with_retention(workspace, tmp_path, capsys):
    """`linvid eval run`: two models on linvid_niah (written from --niah), one table whose
    values are lmms-eval's and whose retention is value / the teacher's; a rerun reuses the
    finished models' results."""
    from linvid.cli import main

    out = tmp_path / "eval"
    command = [
        "eval", "run",
        "--model", f"teacher={workspace / 'teacher'}",
        "--model", f"rwkv={workspace / 'rwkv6-all'}",
        "--teacher", "teacher",
        "--tasks", "linvid_niah",
        "--niah", str(workspace / "data"),
        "--model-args", MODEL_ARGS,
        "--limit", "8",
        "--out", str(out),
    ]  # fmt: skip
    assert main(command) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {(row["model"], row["metric"]): row for row in table["rows"]}
    saved = {
        name: json.loads((out / "results" / f"{name}.json").read_text())["results"]
        for name in ("teacher", "rwkv")
    }
    for (model, metric), row in rows.items():
        assert row["value"] == pytest.approx(
            saved[model]["linvid_niah"][f"{metric},none"], nan_ok=True
        )
        teacher = rows[("teacher", metric)]["value"]
        if teacher > 0 and row["value"] == row["value"]:
            assert row["retention"] == pytest.approx(row["value"] / teacher)
    assert (out / "table.png").stat().st_size > 0
    assert "| rwkv | linvid_niah | circular |" in (out / "table.md").read_text()
    capsys.readouterr()
    assert main(command) == 0
    assert capsys.readouterr().out.count("results from an earlier run") == 2


def test_plugin_refuses_what_it_cannot_do_with_clear_errors(workspace):
    from linvid.eval.lmms_model import LinvidModel

    teacher = str(workspace / "teacher")
    with pytest.raises(ValueError, match="unknown frames"):
        LinvidModel(pretrained=teacher, frames=8)
    with pytest.raises(ValueError, match="transv=on: .* has no TransV layers"):
        LinvidModel(pretrained=teacher, transv="on")
    with pytest.raises(ValueError, match="stream='sometimes'"):
        LinvidModel(pretrained=teacher, stream="sometimes")
    with pytest.raises(ValueError, match="pretrained .* does not exist"):
        LinvidModel(pretrained=str(workspace / "missing"))
    model = LinvidModel(pretrained=teacher, device="cpu")
    model.task_dict = {"t": {"test": [{"image": "x.png"}, {"video": "v.mp4"}]}}
    with pytest.raises(ValueError, match="not a video file"):
        model._video(lambda doc: [doc["image"]], 0, "t", "test")
    with pytest.raises(ValueError, match="gives 2 visuals"):
        model._video(lambda doc: ["a.mp4", "b.mp4"], 1, "t", "test")
    with pytest.raises(ValueError, match="decodes greedily"):
        model._generate("v.mp4", "question", {"temperature": 0.7})


def test_multi_round_generation_follows_the_tasks_rounds(workspace):
    """generate_until_multi_round: round 0 answers the request's context; each next round's
    prompt comes from the task's doc_to_text (lmms-eval's protocol) until it says stop; the
    result is the list of every round's answer, each the one `linvid ask` gives."""
    from lmms_eval.api.instance import Instance

    from linvid.eval.lmms_model import LinvidModel

    doc = documents(workspace, "linvid_niah_gen")[0]
    prompts = [doc["prompt"], "How many needles were there?"]

    def doc_to_text(document, previous_output, round_idx, previous_round_info):
        assert document is doc and len(previous_output) == round_idx
        visuals = [document["video_path"]]
        if round_idx < len(prompts):
            return visuals, prompts[round_idx], False, previous_output, {"round": round_idx}
        return visuals, None, True, previous_output, previous_round_info

    model = LinvidModel(pretrained=str(workspace / "teacher"), device="cpu", **PIXEL_ARGS)
    model.task_dict = {"t": {"test": [doc]}}
    request = Instance(
        request_type="generate_until_multi_round",
        arguments=(
            prompts[0],
            {"max_new_tokens": 8},
            lambda d: [d["video_path"]],
            doc_to_text,
            0,
            "t",
            "test",
        ),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    [rounds] = model.generate_until_multi_round([request])
    assert isinstance(rounds, list) and len(rounds) == 2
    expected = [
        ask_video_file(
            str(workspace / "teacher"),
            doc["video_path"],
            prompt,
            max_new_tokens=8,
            min_pixels=PIXELS,
            max_pixels=PIXELS,
        )[0].text  # fmt: skip
        for prompt in prompts
    ]
    assert rounds == expected
