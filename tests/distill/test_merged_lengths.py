"""A merging stage's data: the loader's sequence-length check counts the tokens the student
sees after per-frame ToMe (exactly `merged_video_batch`'s length), `make_dataset` hands it the
stage's budget, and `student_inputs` merges image, multi-image and video samples of one batch
(AuroraLong's stages at keep ratio 0.1 on image data, paper 001 Table 1)."""

import json
import warnings

import pytest
import torch
from test_data_images import config, data_dir, make_dataset, model, processor  # noqa: F401

import linvid
from linvid.distill.data import (
    SkippedSample,
    VisionFeatureCache,
    collate,
    model_inputs,
)
from linvid.distill.recipe import Stage
from linvid.distill.trainer import RunOptions, student_inputs
from linvid.distill.trainer import make_dataset as stage_dataset
from linvid.models.frame_tome import FrameBudget, merged_video_batch

BUDGETS = {
    "keep_tenth": FrameBudget(keep_ratio=0.1),
    "keep_half": FrameBudget(keep_ratio=0.5),
    "one_per_frame": FrameBudget(tokens_per_frame=1),
}


def merged_length(teacher, item, budget: FrameBudget) -> int:
    """The length `merged_video_batch` gives the sample (alone in a batch)."""
    inputs = model_inputs(collate([item], 0))
    with torch.no_grad():
        merged = merged_video_batch(teacher, inputs, budget.tokens_per_frame, budget.keep_ratio)
    return int(merged["attention_mask"].sum())


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
def test_the_length_check_counts_the_merged_sequence(
    data_dir,  # noqa: F811
    processor,  # noqa: F811
    config,  # noqa: F811
    model,  # noqa: F811
    budget,
):
    """With max_sequence_length = the merged length L a sample is read whole; with L - 1 it
    loses its last turn or, when that turn holds its video or last image, is skipped; without
    the budget the loader counts every placeholder and rejects L."""
    tokenizer = processor.tokenizer
    whole = make_dataset(data_dir, tokenizer, config, merged_tokens=budget)
    for index in range(len(whole)):
        item = whole[index]
        length = merged_length(model, item, budget)
        assert length < item["input_ids"].shape[0]  # the merge removes placeholders
        fits = make_dataset(
            data_dir, tokenizer, config, merged_tokens=budget, max_sequence_length=length
        )[index]
        assert torch.equal(fits["input_ids"], item["input_ids"]), index
        with warnings.catch_warnings():  # skipped samples warn; the outcome is checked
            warnings.simplefilter("ignore")
            short = make_dataset(
                data_dir, tokenizer, config, merged_tokens=budget, max_sequence_length=length - 1
            )[index]
            unmerged = make_dataset(data_dir, tokenizer, config, max_sequence_length=length)
            unmerged = unmerged[index]
        if index == 1:  # the second round (no image) is dropped, the first one stays
            assert short["input_ids"].shape[0] < item["input_ids"].shape[0]
        else:
            assert isinstance(short, SkippedSample) and "merged" in short.reason
        assert isinstance(unmerged, SkippedSample) or (
            unmerged["input_ids"].shape[0] < item["input_ids"].shape[0]
        )


def test_a_long_video_fits_once_merged(data_dir, processor, config):  # noqa: F811
    """TimeViper's case in small: the video's 8 placeholders alone pass max_sequence_length
    only when the stage merges its 2 frames to 1 token each."""
    tokenizer = processor.tokenizer
    item = make_dataset(data_dir, tokenizer, config)[2]
    limit = item["input_ids"].shape[0] - 8 + 2
    with pytest.warns(UserWarning, match=r"\(8 video tokens\) exceed max_sequence_length"):
        assert isinstance(
            make_dataset(data_dir, tokenizer, config, max_sequence_length=limit)[2], SkippedSample
        )
    merged = make_dataset(
        data_dir,
        tokenizer,
        config,
        max_sequence_length=limit,
        merged_tokens=FrameBudget(tokens_per_frame=1),
    )[2]
    assert torch.equal(merged["input_ids"], item["input_ids"])  # every placeholder stays


def stage(**fields):
    return Stage(
        name="language_image",
        trainable=("\\.visual\\.",),
        losses={"ce": 1.0},
        learning_rate=1e-5,
        batch_size=4,
        data="train",
        steps=1,
        **fields,
    )


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"tome_keep_ratio": 0.1}, FrameBudget(keep_ratio=0.1)),
        ({"tokens_per_frame": 16}, FrameBudget(tokens_per_frame=16)),
        ({"tome_keep_ratio": 1.0}, None),
        ({}, None),
    ],
)
def test_make_dataset_hands_the_stage_s_budget(data_dir, processor, config, fields, expected):  # noqa: F811
    options = RunOptions(teacher=str(data_dir), data=str(data_dir / "train.jsonl"), out="unused")
    dataset = stage_dataset(options, stage(**fields), processor.tokenizer, config)
    assert dataset.merged_tokens == expected


@pytest.mark.parametrize("use_cache", [False, True], ids=["pixels", "feature_cache"])
def test_student_inputs_merge_images_and_videos_of_one_batch(
    data_dir,  # noqa: F811
    processor,  # noqa: F811
    config,  # noqa: F811
    model,  # noqa: F811
    tmp_path,
    use_cache,
):
    """AuroraLong's image stages (keep ratio 0.1): the student gets max(1, round(0.1 x n))
    tokens of every image and frame, as many as the loader counted, and trains on them."""
    torch.manual_seed(0)
    student = linvid.convert(model, "rwkv6-all")
    cache = VisionFeatureCache(tmp_path / "features") if use_cache else None
    budget = FrameBudget(keep_ratio=0.1)
    dataset = make_dataset(
        data_dir, processor.tokenizer, config, feature_cache=cache, merged_tokens=budget
    )
    items = [dataset[index] for index in range(len(dataset))]
    batch = collate(items, dataset.pad_token_id)
    inputs, labels = student_inputs(stage(tome_keep_ratio=0.1), student, batch, False, cache)
    image_token, video_token = config.image_token_id, config.video_token_id
    for row, item in enumerate(items):
        visual = item.get("image_grid_thw", item.get("video_grid_thw"))
        kept = sum(budget.count(grid, 2) for grid in visual)
        mask = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row][mask]
        assert int(((ids == image_token) | (ids == video_token)).sum()) == kept
        assert int(mask.sum()) == merged_length(model, item, budget)
        answer = item["labels"][item["labels"] != -100]
        assert torch.equal(labels[row][labels[row] != -100], answer)
    logits = student(**inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert torch.isfinite(loss)


IMAGE_RECIPE = """
name: test_image_stages
student: rwkv6-all
defaults: {steps: 2, batch_size: 2, data: test, learning_rate: 1.0e-3, losses: {ce: 1.0}}
stages:
  - name: pretrain
    trainable: ['\\.visual\\.merger\\.']
    tome_keep_ratio: 1.0
  - name: language_image
    trainable: ['\\.visual\\.', '\\.language_model\\.|(^|\\.)lm_head\\.']
    tome_keep_ratio: 0.1
    max_sequence_length: 40  # the two-image line has 32 image tokens, 4 once merged
"""


def test_distill_runs_keep_ratio_stages_on_image_data(tmp_path):
    """`linvid distill` with AuroraLong-style stages on single-image, two-image and video
    lines, with the teacher's template-less tokenizer (the default chat template): both
    stages run, and the 0.1 stage reads the two-image line although its 48 unmerged tokens
    exceed max_sequence_length (fail_on_bad_samples would stop the run otherwise)."""
    from distill_workspace import write_workspace
    from PIL import Image

    from linvid.cli import main

    records = write_workspace(tmp_path)
    for index, colour in enumerate([(200, 20, 20), (20, 20, 200), (20, 200, 20)]):
        picture = Image.new("RGB", (112, 112), colour)
        picture.paste((255, 255, 255), (16 * index, 16, 16 * index + 40, 56))
        picture.save(tmp_path / f"{index}.png")
    question = {"from": "human", "value": "<image>\nwhat is here"}
    lines = [
        {"image": "0.png", "conversations": [question, {"from": "gpt", "value": "a red ball"}]},
        {
            "image": ["1.png", "2.png"],
            "conversations": [
                {"from": "human", "value": "which <image> is here <image>"},
                {"from": "gpt", "value": "a blue ball"},
            ],
        },
        {"image": "2.png", "conversations": [question, {"from": "gpt", "value": "green"}]},
        records[0],
    ]
    data = tmp_path / "images.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(IMAGE_RECIPE)
    out = tmp_path / "run"
    size = str(56 * 56)
    command = [
        "distill", "--recipe", str(recipe), "--teacher", str(tmp_path / "teacher"),
        "--data", str(data), "--out", str(out), "--num-frames", "4",
        "--min-pixels", size, "--max-pixels", size,
    ]  # fmt: skip
    assert main(command) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["pretrain"] * 2 + ["language_image"] * 2
    assert all(torch.isfinite(torch.tensor(row["ce"])) for row in rows)
