"""Video conversation data: JSONL parsing, answer-only labels, bad samples, collation, a
forward pass of a tiny Qwen2.5-VL, and the vision feature cache."""

import json
import os

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from linvid.distill.data import (
    IGNORE_INDEX,
    SkippedSample,
    VideoConversationDataset,
    VisionFeatureCache,
    cached_video_features,
    collate,
    model_inputs,
    read_conversations,
)
from linvid.models.qwen_video import video_token_count
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids
from linvid.video.io import VideoError, write_video

WORDS = "what is red blue green a ball the cat sits here yes no which colour and then".split()
WORDS += ["You are a helpful assistant."]  # the system prompt of Qwen2-VL's template
# Qwen2-VL / Qwen2.5-VL's own chat template (a default system turn, content parts).
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SIZE = 56 * 56  # min = max pixels: frames stay 56x56, 4 merged tokens per frame pair
RECORDS = [
    {
        "video": "red.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nwhat is here"},
            {"from": "gpt", "value": "a red ball"},
        ],
    },
    {
        "video": "missing.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nwhat is here"},
            {"from": "gpt", "value": "no"},
        ],
    },
    {
        "video": "clips/blue.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nwhich colour"},
            {"from": "gpt", "value": "blue"},
            {"from": "human", "value": "and then"},
            {"from": "gpt", "value": "the cat sits"},
        ],
    },
    {
        "video": "green.mp4",
        "conversations": [
            {"from": "human", "value": "what is here <video>"},
            {"from": "gpt", "value": "green"},
        ],
    },
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversations")
    os.makedirs(root / "clips")
    for index, (name, colour) in enumerate(
        [
            ("red.mp4", (200, 20, 20)),
            ("clips/blue.mp4", (20, 20, 200)),
            ("green.mp4", (20, 200, 20)),
        ]
    ):
        frames = torch.zeros(8, 3, 56, 56, dtype=torch.uint8)
        frames += torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1)
        frames[:, :, index * 8 : index * 8 + 16, 10:30] = 255  # something that moves per video
        write_video(root / name, frames, fps=8)
    with open(root / "train.jsonl", "w") as file:
        for record in RECORDS:
            file.write(json.dumps(record) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def config(tokenizer):
    return tiny_qwen2_5_vl_config(token_ids=token_ids(tokenizer))


def make_dataset(data_dir, tokenizer, config, **options):
    samples = read_conversations(data_dir / "train.jsonl")
    options = {"num_frames": 4, "min_pixels": SIZE, "max_pixels": SIZE, **options}
    return VideoConversationDataset(samples, tokenizer, config.vision_config, **options)


def labelled_ids(item):
    labels = item["labels"]
    return labels[labels != IGNORE_INDEX].tolist()


def answer_ids(tokenizer, *answers):
    """Token ids of each answer followed by the end-of-turn token."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [i for answer in answers for i in [*tokenizer.encode(answer), end]]


def test_read_conversations_resolves_paths_and_turns(data_dir):
    samples = read_conversations(data_dir / "train.jsonl")
    assert [os.path.relpath(s.video, data_dir) for s in samples] == [
        "red.mp4",
        "missing.mp4",
        os.path.join("clips", "blue.mp4"),
        "green.mp4",
    ]
    assert samples[2].turns == (("<video>\nwhich colour", "blue"), ("and then", "the cat sits"))
    assert samples[1].source.endswith("train.jsonl:2")
    other = read_conversations(data_dir / "train.jsonl", video_root="/videos")
    assert other[0].video == os.path.normpath("/videos/red.mp4")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"conversations": []}', "'video'"),
        ('{"video": "a.mp4"}', "'conversations'"),
        (
            '{"video": "a.mp4", "conversations": [{"from": "gpt", "value": "<video> x"}]}',
            "expected 'human'",
        ),
        (
            '{"video": "a.mp4", "conversations": [{"from": "human", "value": "x"}, '
            '{"from": "gpt", "value": "y"}]}',
            "'<video>' exactly once",
        ),
        (
            '{"video": "a.mp4", "conversations": [{"from": "human", "value": "<video> x"}]}',
            "ends with a human turn",
        ),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(RECORDS[0])
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{message}"):
        read_conversations(path)


def test_labels_cover_exactly_the_answers(data_dir, tokenizer, config):
    dataset = make_dataset(data_dir, tokenizer, config)
    first, multi_turn = dataset[0], dataset[2]
    assert labelled_ids(first) == answer_ids(tokenizer, "a red ball")
    assert labelled_ids(multi_turn) == answer_ids(tokenizer, "blue", "the cat sits")
    assert tokenizer.decode(labelled_ids(first)) == "a red ball <|im_end|>"
    # Labels equal the input ids where set (the model shifts them itself).
    for item in (first, multi_turn):
        mask = item["labels"] != IGNORE_INDEX
        assert torch.equal(item["labels"][mask], item["input_ids"][mask])
    # The prompt reads as the chat template lays it out.
    text = tokenizer.decode(first["input_ids"][first["mm_token_type_ids"] == 0].tolist())
    assert text == (
        "<|im_start|> user <|vision_start|> <|vision_end|> what is here <|im_end|> "
        "<|im_start|> assistant a red ball <|im_end|>"
    )


def test_labels_with_qwen_chat_template(data_dir, config):
    tokenizer = build_word_tokenizer(WORDS)
    tokenizer.chat_template = QWEN_TEMPLATE
    item = make_dataset(data_dir, tokenizer, config)[2]
    assert labelled_ids(item) == answer_ids(tokenizer, "blue", "the cat sits")
    text = tokenizer.decode(item["input_ids"][item["mm_token_type_ids"] == 0].tolist())
    assert text.startswith("<|im_start|> system You are a helpful assistant . <|im_end|>")


def test_video_tokens_match_the_grid(data_dir, tokenizer, config):
    dataset = make_dataset(data_dir, tokenizer, config)
    for index in (0, 2, 3):
        item = dataset[index]
        grid = item["video_grid_thw"]
        assert grid.tolist() == [[2, 4, 4]]
        assert item["pixel_values_videos"].shape == (32, 3 * 2 * 14 * 14)
        video = item["input_ids"] == config.video_token_id
        assert int(video.sum()) == video_token_count(grid, 2) == 8
        assert torch.equal(item["mm_token_type_ids"] != 0, video)
        assert set(item["mm_token_type_ids"][video].tolist()) == {2}
        assert (item["labels"][video] == IGNORE_INDEX).all()
        # The video tokens are contiguous, between vision start and end.
        positions = video.nonzero().flatten()
        assert positions[-1] - positions[0] == 7
        start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert int(item["input_ids"][positions[0] - 1]) == start


def test_sandwich_repeats_the_question_around_the_video(data_dir, tokenizer, config):
    item = make_dataset(data_dir, tokenizer, config, style="sandwich")[0]
    text = tokenizer.decode(item["input_ids"][item["mm_token_type_ids"] == 0].tolist())
    assert "what is here <|vision_start|> <|vision_end|> what is here" in text
    assert labelled_ids(item) == answer_ids(tokenizer, "a red ball")


def test_bad_sample_is_skipped_and_counted(data_dir, tokenizer, config):
    dataset = make_dataset(data_dir, tokenizer, config)
    with pytest.warns(UserWarning, match="skipping sample 1: .*train.jsonl:2: video file"):
        item = dataset[1]
    assert isinstance(item, SkippedSample) and item.index == 1
    assert dataset[1] == item  # remembered: counted once
    assert dataset.num_skipped == 1
    assert dataset.skipped[0][0] == 1 and "missing.mp4" in dataset.skipped[0][1]
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 1 and batch["skipped"] == [tuple(item)]
    assert dataset.collate([dataset[1]]) == {"skipped": [tuple(item)]}
    # Workers hold their own copy: the main process learns from the batch.
    fresh = make_dataset(data_dir, tokenizer, config)
    with pytest.warns(UserWarning, match="skipping sample 1"):
        fresh.record_skipped(batch)
    fresh.record_skipped(batch)
    assert fresh.skipped == dataset.skipped


def test_bad_sample_raises_when_asked(data_dir, tokenizer, config):
    dataset = make_dataset(data_dir, tokenizer, config, fail_on_bad_samples=True)
    with pytest.raises(VideoError, match="train.jsonl:2: video file not found"):
        dataset[1]


def test_too_long_drops_turns_but_never_cuts_the_video(data_dir, tokenizer, config):
    full = make_dataset(data_dir, tokenizer, config)[2]
    first_turn = (
        int((full["input_ids"] == tokenizer.convert_tokens_to_ids("<|im_end|>")).nonzero()[1]) + 1
    )
    dataset = make_dataset(data_dir, tokenizer, config, max_sequence_length=first_turn + 2)
    item = dataset[2]
    assert item["input_ids"].shape[0] == first_turn
    assert labelled_ids(item) == answer_ids(tokenizer, "blue")
    with pytest.warns(UserWarning, match="exceed max_sequence_length=10"):
        short = make_dataset(data_dir, tokenizer, config, max_sequence_length=10)[0]
    assert isinstance(short, SkippedSample)


def test_collate_pads_on_the_right(data_dir, tokenizer, config):
    dataset = make_dataset(data_dir, tokenizer, config)
    items = [dataset[0], dataset[2]]
    batch = collate(items, tokenizer.pad_token_id)
    lengths = [item["input_ids"].shape[0] for item in items]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = 0 if lengths[0] < lengths[1] else 1
    pad = slice(lengths[short], None)
    assert (batch["input_ids"][short, pad] == tokenizer.pad_token_id).all()
    assert (batch["labels"][short, pad] == IGNORE_INDEX).all()
    assert (batch["mm_token_type_ids"][short, pad] == 0).all()
    assert torch.equal(batch["input_ids"][0, : lengths[0]], items[0]["input_ids"])
    assert batch["pixel_values_videos"].shape == (64, 3 * 2 * 14 * 14)
    assert torch.equal(batch["pixel_values_videos"][32:], items[1]["pixel_values_videos"])
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    assert batch["sample_index"].tolist() == [0, 2]


def test_dataloader_with_workers_and_a_forward_pass(data_dir, tokenizer, config):
    dataset = make_dataset(data_dir, tokenizer, config)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=1, collate_fn=dataset.collate
    )
    batches = list(loader)
    with pytest.warns(UserWarning, match="skipping sample 1"):
        for batch in batches:
            dataset.record_skipped(batch)
    assert dataset.num_skipped == 1
    assert sorted(i for b in batches for i in b["sample_index"].tolist()) == [0, 2, 3]
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        output = model(**model_inputs(batches[0]))
    assert torch.isfinite(output.loss)


def test_feature_cache_round_trip_and_reuse(data_dir, tokenizer, config, tmp_path):
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    cache = VisionFeatureCache(tmp_path / "features", shard_size=2)
    dataset = make_dataset(data_dir, tokenizer, config, feature_cache=cache)
    batch = dataset.collate([dataset[0], dataset[2], dataset[3]])
    assert batch["has_pixels"].all()
    with torch.no_grad():
        fresh = model.model.get_video_features(
            batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True
        ).pooler_output
        encoded = cached_video_features(model, batch, cache)
        from_cache = cached_video_features(model, batch, cache)
        with_pixels = model(**model_inputs(batch))
        with_features = model(**model_inputs(batch, pixels=False), mm_encoder_outputs=from_cache)
    encoded, from_cache_features = encoded["video"].pooler_output, from_cache["video"].pooler_output
    assert len(fresh) == len(encoded) == len(from_cache_features) == 3
    for a, b, c in zip(fresh, encoded, from_cache_features, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    torch.testing.assert_close(with_features.logits, with_pixels.logits)
    torch.testing.assert_close(with_features.loss, with_pixels.loss)
    cache.flush()
    shards = [name for name in os.listdir(tmp_path / "features") if name.endswith(".safetensors")]
    assert len(shards) == 2  # 2 + 1 entries with shard_size 2
    assert not [name for name in os.listdir(tmp_path / "features") if name.endswith(".tmp")]

    # A second run: a new cache object on the same directory serves every video, so the
    # dataset decodes nothing and the batch carries no pixels.
    reopened = VisionFeatureCache(tmp_path / "features")
    assert len(reopened) == 3
    second = make_dataset(data_dir, tokenizer, config, feature_cache=reopened)
    item = second[0]
    assert item["pixel_values_videos"] is None and item["video_key"] == batch["video_keys"][0]
    again = second.collate([second[0], second[2], second[3]])
    assert "pixel_values_videos" not in again and not again["has_pixels"].any()
    with torch.no_grad():
        features = cached_video_features(model, again, reopened)
        output = model(**model_inputs(again, pixels=False), mm_encoder_outputs=features)
    torch.testing.assert_close(output.logits, with_pixels.logits)
    with pytest.raises(ValueError, match="pass mm_encoder_outputs"):
        model_inputs(again)


def test_feature_cache_rejects_another_vision_tower(tmp_path):
    cache = VisionFeatureCache(tmp_path, fingerprint="tower-a")
    cache.put("key", torch.ones(4, 8), torch.tensor([[2, 4, 4]]))
    cache.flush()
    assert VisionFeatureCache(tmp_path).fingerprint == "tower-a"
    with pytest.raises(ValueError, match="written for vision tower tower-a"):
        VisionFeatureCache(tmp_path, fingerprint="tower-b")


def test_pixel_statistics_follow_the_model(data_dir, tokenizer, config):
    """A model trained with its own pixel mean/std (e.g. [-1, 1] scaling) gets its videos
    normalised that way, and the feature-cache key tells the two apart."""
    clip = make_dataset(data_dir, tokenizer, config)
    symmetric = make_dataset(data_dir, tokenizer, config, pixel_statistics=((0.5,) * 3, (0.5,) * 3))
    pixels = symmetric[0]["pixel_values_videos"]
    assert float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    assert float(clip[0]["pixel_values_videos"].max()) > 1  # CLIP's std stretches past 1
    sample = clip.samples[0]
    assert clip.video_key(sample) != symmetric.video_key(sample)


def test_second_per_grid_and_the_teachers_processor(data_dir, tokenizer, config, tmp_path):
    """Each item carries the sampled video's second_per_grid_ts (8 frames at 8 fps, 4 sampled
    the qwen-vl-utils way: 4 fps, so 2 / 4 s per frame pair), also when its features come from
    the cache; with the teacher's processor the pixels are the processor's, equal to linvid's."""
    from linvid.models.processor import build_bpe_tokenizer, build_processor

    plain = make_dataset(data_dir, tokenizer, config)
    processor = build_processor(build_bpe_tokenizer(WORDS))
    with_processor = make_dataset(data_dir, tokenizer, config, processor=processor)
    item, processed = plain[0], with_processor[0]
    assert item["second_per_grid_ts"].tolist() == [0.5]
    assert torch.equal(processed["second_per_grid_ts"], item["second_per_grid_ts"])
    assert torch.equal(processed["video_grid_thw"], item["video_grid_thw"])
    difference = (processed["pixel_values_videos"] - item["pixel_values_videos"]).abs().max()
    assert difference < 1e-5
    batch = collate([item, plain[2]], tokenizer.pad_token_id)
    assert batch["second_per_grid_ts"].tolist() == [0.5, 0.5]
    assert "second_per_grid_ts" in model_inputs(batch)

    cache = VisionFeatureCache(tmp_path / "features", fingerprint="tiny")
    cached = make_dataset(data_dir, tokenizer, config, feature_cache=cache)
    key = cached.video_key(cached.samples[0])
    cache.put(key, torch.zeros(4, 64), item["video_grid_thw"])
    cache.flush()
    from_cache = cached[0]
    assert from_cache["pixel_values_videos"] is None
    assert from_cache["second_per_grid_ts"].tolist() == [0.5]
