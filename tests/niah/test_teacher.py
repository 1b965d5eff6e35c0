"""The demo teacher: config and tokenizer round trip, training batches, option scoring by
likelihood, a few training steps, and the trained-teacher cache."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from linvid.distill.data import IGNORE_INDEX
from linvid.eval.options import AnswerEncoder, choose_option, evaluate, option_scores
from linvid.eval.prompts import render_video_prompt, video_messages
from linvid.models.qwen_video import pixel_statistics
from linvid.niah import generate
from linvid.niah.scoring import rotate_options
from linvid.niah.teacher import (
    FINGERPRINT,
    HELD_OUT_SEED_BASE,
    TrainingBatches,
    build_teacher,
    build_tokenizer,
    evaluate_niah,
    held_out_samples,
    sample_batch,
    teacher_config,
    train_teacher,
    training_seed,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on 2 shared cores more threads only
    contend (several times slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    model = build_teacher(tokenizer, seed=0)
    model.eval()
    return model


@dataclasses.dataclass(frozen=True)
class Question:
    """A generic question: options of different token lengths (the batch needs padding)."""

    frames: object
    prompt: str
    options: tuple
    answer_index: int = 0
    task: str = "mixed"


def test_config_has_the_demo_sizes_and_round_trips_with_its_tokenizer(tmp_path, tokenizer):
    config = teacher_config(tokenizer)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (128, 256, 4)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.rope_parameters["mrope_section"] == [4, 6, 6]
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (2, 64, 128)
    assert (vision.window_size, vision.fullatt_block_indexes) == (112, [1])
    assert text.vocab_size == len(tokenizer)
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert pixel_statistics(config) == ((0.5,) * 3, (0.5,) * 3)

    model = build_teacher(tokenizer, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert pixel_statistics(loaded.config) == ((0.5,) * 3, (0.5,) * 3)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    sample = generate.make_sample("counting", 16, 3)
    assert (
        loaded_tokenizer(generate.prompt_text(sample))["input_ids"]
        == (tokenizer(generate.prompt_text(sample))["input_ids"])
    )
    assert torch.equal(
        option_scores(loaded, loaded_tokenizer, sample, prompt=generate.prompt_text),
        option_scores(model, tokenizer, sample, prompt=generate.prompt_text),
    )


def test_batch_labels_cover_exactly_the_answer_and_end_of_turn(tokenizer, teacher):
    samples = [generate.make_sample(task, 16, 5) for task in generate.TASKS]
    batch = sample_batch(AnswerEncoder(tokenizer, teacher.config), samples)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    video = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert batch["pixel_values_videos"].abs().max() <= 1.0  # pixels in [-1, 1]
    assert batch["video_grid_thw"].tolist() == [[8, 4, 4]] * 3
    for row, sample in enumerate(samples):
        length = int(batch["attention_mask"][row].sum())
        answer = tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(length - len(answer) - 1, length))
        assert labels[labelled].tolist() == [*answer, end]
        assert ids[labelled].tolist() == [*answer, end]
        before = ids[length - len(answer) - 3 : length - len(answer) - 1].tolist()
        assert tokenizer.convert_ids_to_tokens(before) == ["<|im_start|>", "assistant"]
        assert int((ids == video).sum()) == 32  # 8 frame pairs x 4 merged tokens
        assert torch.equal(batch["mm_token_type_ids"][row], (ids == video).long() * 2)


def _hand_log_likelihood(model, tokenizer, question, option):
    """log p(option tokens | prompt) from one unpadded sequence, summed by hand."""
    encoder = AnswerEncoder(tokenizer, model.config)
    video = encoder.video(question.frames)
    prompt = render_video_prompt(tokenizer, video_messages(question.prompt), 32)
    answer = tokenizer(option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=video["pixel_values_videos"],
            video_grid_thw=video["video_grid_thw"],
            second_per_grid_ts=video["second_per_grid_ts"],
            mm_token_type_ids=(ids == video_id).long() * 2,
        ).logits[0]
    log_probs = torch.log_softmax(logits.double(), -1)
    return sum(float(log_probs[len(prompt) - 1 + i, token]) for i, token in enumerate(answer))


def test_option_scores_match_a_hand_computed_likelihood_with_padding(tokenizer, teacher):
    frames = generate.make_sample("ordering", 16, 1).frames
    options = ("red", "red blue green", "cyan magenta", "4")  # 1, 3, 2, 1 tokens
    question = Question(frames, "In what order did the colours appear?", options)
    scores = option_scores(teacher, tokenizer, question)
    assert scores.shape == (4,)
    for index, option in enumerate(options):
        expected = _hand_log_likelihood(teacher, tokenizer, question, option)
        assert scores[index].item() == pytest.approx(expected, abs=1e-4)
    assert choose_option(teacher, tokenizer, question) == int(scores.argmax())


def test_option_scores_do_not_depend_on_the_order_of_the_options(tokenizer, teacher):
    for task in generate.TASKS:
        sample = generate.make_sample(task, 16, 11)
        base = option_scores(teacher, tokenizer, sample, prompt=generate.prompt_text)
        assert base.std() > 1e-4  # the options really score differently
        for shift in (1, 2, 3):
            # The same prompt text, the options given in another order: the same scores,
            # moved with their options (the prompt lists the options, so it is held fixed).
            rotated = rotate_options(sample, shift)
            scores = option_scores(teacher, tokenizer, rotated, prompt=generate.prompt_text(sample))
            order = [sample.options.index(option) for option in rotated.options]
            assert torch.allclose(scores, base[order], atol=1e-5)
            assert choose_option(
                teacher, tokenizer, rotated, prompt=generate.prompt_text(sample)
            ) == order.index(int(base.argmax()))


def test_evaluate_batches_questions_of_different_lengths_like_one_at_a_time(tokenizer, teacher):
    samples = [
        generate.make_sample("retrieval", 16, 2),
        generate.make_sample("counting", 32, 4),
        generate.make_sample("ordering", 24, 6),
    ]
    result = evaluate_niah(teacher, tokenizer, samples, batch_questions=3)
    for sample, record in zip(samples, result["records"], strict=True):
        alone = option_scores(teacher, tokenizer, sample, prompt=generate.prompt_text)
        assert record["scores"] == pytest.approx(alone.tolist(), abs=1e-3)
        assert record["num_frames"] == sample.num_frames and record["task"] == sample.task
        assert record["correct"] == (record["choice"] == sample.answer_index)
        assert record["depth"] == sample.depth
    assert set(result["accuracy"]) == {*generate.TASKS, "all"}

    calls = []

    def prepare(model, batch):  # sees rows of one video size and one prompt length only
        calls.append(batch["video_grid_thw"].tolist())
        assert len({int((row != IGNORE_INDEX).nonzero()[0]) for row in batch["labels"]}) == 1
        return batch

    again = evaluate_niah(teacher, tokenizer, samples, batch_questions=3, prepare=prepare)
    assert sorted(len(grids) for grids in calls) == [4, 4, 4]
    assert all(len({tuple(grid) for grid in grids}) == 1 for grids in calls)
    assert [r["scores"] for r in again["records"]] == [r["scores"] for r in result["records"]]
    sandwich = evaluate_niah(teacher, tokenizer, samples[:1], style="sandwich")
    assert sandwich["records"][0]["scores"] != result["records"][0]["scores"]
    with pytest.raises(ValueError, match="no `prompt`"):
        evaluate(teacher, tokenizer, samples)


def test_held_out_and_training_seeds_are_disjoint():
    assert training_seed(0, 0) == 0
    assert training_seed(9, 9_999_999) < HELD_OUT_SEED_BASE
    with pytest.raises(ValueError):
        training_seed(100, 0)
    held = held_out_samples(16, 2)
    assert [s.task for s in held] == [t for t in generate.TASKS for _ in range(2)]


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tokenizer):
    model = build_teacher(tokenizer, seed=1)
    samples = [generate.make_sample(task, 16, seed) for task in generate.TASKS for seed in (0, 1)]
    batch = sample_batch(AnswerEncoder(tokenizer, model.config), samples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    losses = []
    for _ in range(8):
        loss = model(**batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


TINY_RUN = {"max_steps": 2, "batch_size": 2, "check_every": 1, "check_per_task": 1}


def test_training_is_cached_by_fingerprint_and_refuses_other_settings(tmp_path):
    out = tmp_path / "teacher"
    lines = []
    threads = torch.get_num_threads()
    run = {"threads": threads + 1, "log_every": 1, **TINY_RUN}
    assert train_teacher(out, data_worker=False, log=lines.append, **run) == out
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    assert any(line.startswith("step      2") for line in lines)
    assert any(line.startswith("check at step 1, 16 frames") for line in lines)
    assert (out / FINGERPRINT).is_file() and (out / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert Qwen2_5_VLForConditionalGeneration.from_pretrained(out).config.video_token_id
    written = (out / "model.safetensors").stat().st_mtime_ns

    lines.clear()
    train_teacher(out, data_worker=False, log=lines.append, **TINY_RUN)
    assert lines and "reusing" in lines[0]
    assert (out / "model.safetensors").stat().st_mtime_ns == written

    with pytest.raises(FileExistsError, match="training"):
        train_teacher(out, data_worker=False, log=lines.append, **{**TINY_RUN, "lr": 2e-3})
    with pytest.raises(FileExistsError, match="seed"):
        train_teacher(out, data_worker=False, seed=1, log=lines.append, **TINY_RUN)
    (out / FINGERPRINT).unlink()  # a directory that never finished
    with pytest.raises(FileExistsError, match="not a finished teacher"):
        train_teacher(out, data_worker=False, log=lines.append, **TINY_RUN)


def test_an_interrupted_run_leaves_no_directory(tmp_path):
    def interrupt(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_teacher(
            tmp_path / "teacher", data_worker=False, log=interrupt, log_every=1, **TINY_RUN
        )
    assert list(tmp_path.iterdir()) == []


def test_phase_two_trains_and_checks_the_longer_videos_too(tmp_path, tokenizer):
    stream = iter(
        TrainingBatches(
            tokenizer, teacher_config(tokenizer), 0, {"counting": 1}, (16, 20), 56, 2, 0
        )
    )
    assert [next(stream)["video_grid_thw"][:, 0].tolist() for _ in range(3)] == [
        [8, 8],
        [10, 10],
        [8, 8],
    ]

    out, lines = tmp_path / "teacher", []
    run = {**TINY_RUN, "max_steps": 6, "check_every": 2, "goals": {}}
    train_teacher(out, data_worker=False, long_frames=(20,), log=lines.append, **run)
    assert "goals met at 16 frames; phase 2 on (16, 20) frames" in lines
    assert any(line.startswith("check at step 4, 20 frames") for line in lines)
    summary = json.loads((out / "training.json").read_text())
    assert summary["phase_two_from_step"] == 2 and summary["steps"] == 4
    assert summary["goals_met"] and set(summary["last_check"]) == {"16", "20"}


def test_a_step_schedule_trains_the_same_teacher_on_a_slow_machine(tmp_path, monkeypatch):
    """Issue 15: with max_steps the learning-rate schedule runs by steps, so a run on a
    machine that spends half its time budget before the first step (a clock that jumps from 0
    to 5000 of the 10000 s, then runs 10 s per call) trains the very same weights as a fast
    one; a schedule by time would have decayed the learning rate halfway already. The time
    budget only caps the run."""
    import itertools

    from safetensors.torch import load_file

    import linvid.niah.teacher as teacher_module

    run = {**TINY_RUN, "max_steps": 4, "check_every": 100, "seconds": 10_000, "warmup_steps": 1}
    train_teacher(tmp_path / "fast", data_worker=False, log=lambda line: None, **run)
    ticks = itertools.chain([0.0], itertools.count(5000.0, 10.0))
    monkeypatch.setattr(teacher_module.time, "perf_counter", lambda: next(ticks))
    train_teacher(tmp_path / "slow", data_worker=False, log=lambda line: None, **run)
    fast, slow = (load_file(tmp_path / name / "model.safetensors") for name in ("fast", "slow"))
    assert fast.keys() == slow.keys()
    assert all(torch.equal(fast[name], slow[name]) for name in fast)
    # The cap still stops a run that is too slow, and says why.
    lines = []
    ticks = itertools.chain([0.0], itertools.count(5000.0, 10.0))
    capped = {**run, "seconds": 5015}
    train_teacher(tmp_path / "capped", data_worker=False, log=lines.append, **capped)
    assert any("time budget of 5015 s reached at step" in line for line in lines)
    summary = json.loads((tmp_path / "capped" / "training.json").read_text())
    assert summary["steps"] < 4
