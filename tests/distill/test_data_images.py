"""Image and multi-image conversations in the distillation data (LLaVA-style "image" lines):
the inputs equal a real Qwen2_5_VLProcessor's for the same conversation, image and video
samples mix in one file and one batch, and a tiny Qwen2.5-VL reads a mixed batch as it reads
each sample alone (with pixels and with the vision feature cache).

Tiny sizes: images of 56x84, 70x100 (resized to 56x112) and 84x56; 8-frame 56x56 videos."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from linvid.distill.data import (
    IGNORE_INDEX,
    ImageError,
    SkippedSample,
    VideoConversationDataset,
    VisionFeatureCache,
    cached_video_features,
    collate,
    missing_videos,
    model_inputs,
    read_conversations,
    sample_visual_inputs,
)
from linvid.models.processor import build_bpe_tokenizer, build_processor, token_ids
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.video.io import write_video

CORPUS = (
    "Describe the picture.",
    "What differs between these two images?",
    "A red square on a blue ground.",
    "The left one is green and the right one is red.",
    "What happens in this clip?",
)
VIDEO_SIZE = 56 * 56  # frames stay 56x56
RECORDS = [
    {  # one image, the LLaVA pretraining layout
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": "A red square on a blue ground."},
        ],
    },
    {  # two images between text, and a second round
        "image": ["green.png", "pictures/wide.png"],
        "conversations": [
            {"from": "human", "value": "What differs between <image> and <image>?"},
            {"from": "gpt", "value": "The left one is green and the right one is red."},
            {"from": "human", "value": "Describe the picture."},
            {"from": "gpt", "value": "A red square."},
        ],
    },
    {
        "video": "clip.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat happens in this clip?"},
            {"from": "gpt", "value": "A red square on a blue ground."},
        ],
    },
    {  # images in two turns: one marker per image, in order across the turns
        "image": ["tall.png", "red.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "What differs <image>"},
            {"from": "gpt", "value": "The left one is green."},
        ],
    },
]


def picture(height, width, seed):
    """An RGB noise image with a coloured square (every image differs)."""
    generator = np.random.default_rng(seed)
    pixels = generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = generator.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "pictures").mkdir()
    picture(56, 84, seed=0).save(root / "red.png")
    picture(84, 56, seed=1).save(root / "green.png")
    picture(70, 100, seed=2).save(root / "pictures" / "wide.png")  # resized to 56x112
    picture(84, 56, seed=3).convert("L").save(root / "tall.png")  # grayscale -> RGB
    frames = torch.zeros(8, 3, 56, 56, dtype=torch.uint8)
    frames[:, 0] = 200
    for index in range(8):
        frames[index, :, 4 + 4 * index : 20 + 4 * index, 10:30] = 255
    write_video(root / "clip.mp4", frames, fps=8)
    with open(root / "train.jsonl", "w") as file:
        for record in RECORDS:
            file.write(json.dumps(record) + "\n")
    return root


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_bpe_tokenizer(CORPUS, vocab_size=384))


@pytest.fixture(scope="module")
def config(processor):
    return tiny_qwen2_5_vl_config(
        token_ids=token_ids(processor.tokenizer), vision_depth=2, fullatt_block_indexes=(1,)
    )


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_dataset(data_dir, tokenizer, config, **options):
    samples = read_conversations(data_dir / "train.jsonl")
    options = {"num_frames": 4, "min_pixels": VIDEO_SIZE, "max_pixels": VIDEO_SIZE, **options}
    return VideoConversationDataset(samples, tokenizer, config.vision_config, **options)


def processor_inputs(processor, data_dir, record):
    """What Qwen2_5_VLProcessor returns for the record's whole conversation (every turn, the
    answers included), the images given as a user gives them (PIL, in marker order)."""
    messages = []
    for turn in record["conversations"]:
        if turn["from"] == "gpt":
            messages.append({"role": "assistant", "content": turn["value"]})
            continue
        content = []
        for index, piece in enumerate(turn["value"].split("<image>")):
            if index:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": "user", "content": content})
    text = processor.apply_chat_template(messages, tokenize=False)
    paths = [record["image"]] if isinstance(record["image"], str) else record["image"]
    images = [Image.open(data_dir / path).convert("RGB") for path in paths]
    return processor(text=[text], images=images, return_tensors="pt")


@pytest.mark.parametrize("index", [0, 1, 3])
@pytest.mark.parametrize("use_processor", [False, True], ids=["torch", "processor"])
def test_image_inputs_equal_the_processors(data_dir, processor, config, index, use_processor):
    dataset = make_dataset(
        data_dir, processor.tokenizer, config, processor=processor if use_processor else None
    )
    item = dataset[index]
    reference = processor_inputs(processor, data_dir, RECORDS[index])
    assert item["input_ids"].tolist() == reference["input_ids"][0].tolist()
    assert item["mm_token_type_ids"].tolist() == reference["mm_token_type_ids"][0].tolist()
    assert torch.equal(item["image_grid_thw"], reference["image_grid_thw"])
    assert item["pixel_values"].shape == reference["pixel_values"].shape
    # Same arithmetic up to float32 rounding of the normalisation (and none with the processor).
    tolerance = 0 if use_processor else 1e-5
    torch.testing.assert_close(
        item["pixel_values"], reference["pixel_values"], rtol=0, atol=tolerance
    )
    assert 1 in item["mm_token_type_ids"].tolist() and 2 not in item["mm_token_type_ids"].tolist()


def test_image_answers_are_labelled(data_dir, processor, config):
    dataset = make_dataset(data_dir, processor.tokenizer, config)
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    item = dataset[1]
    labelled = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    answers = ["The left one is green and the right one is red.", "A red square."]
    expected = [i for answer in answers for i in [*tokenizer.encode(answer), end]]
    assert labelled == expected
    image_token = config.image_token_id
    assert (item["input_ids"] == image_token).sum() == item["image_grid_thw"].prod(-1).sum() // 4
    assert (item["labels"][item["input_ids"] == image_token] == IGNORE_INDEX).all()


def test_sandwich_puts_images_between_two_copies_of_the_question(data_dir, processor, config):
    """Paper 001 §3.2.3's layout for an image turn: its text (markers removed), its images in
    order, its text again; "standard" keeps each image where its marker is."""
    tokenizer = processor.tokenizer
    text = "What differs between and ?"
    images = "<|vision_start|><|image_pad|><|vision_end|>" * 2
    expected = {
        "sandwich": f"user\n{text}{images}{text}<|im_end|>",
        "standard": "user\nWhat differs between<|vision_start|><|image_pad|><|vision_end|>and"
        "<|vision_start|><|image_pad|><|vision_end|>?<|im_end|>",
    }
    for style, turn in expected.items():
        dataset = make_dataset(data_dir, tokenizer, config, style=style)
        ids = dataset[1]["input_ids"].tolist()
        # One <|image_pad|> per image, as the chat template renders it before expansion.
        collapsed = [
            token
            for position, token in enumerate(ids)
            if token != config.image_token_id or ids[position - 1] != config.image_token_id
        ]
        assert turn in tokenizer.decode(collapsed)


@pytest.mark.parametrize("use_cache", [False, True], ids=["pixels", "feature_cache"])
def test_mixed_batch_equals_each_sample_alone(
    data_dir, processor, config, model, tmp_path, use_cache
):
    """A batch of image, multi-image, video and image samples (right-padded) gives each row
    the logits that sample gets alone: pixels, grids and positions are assigned to the right
    sample. With the feature cache, videos come from the cache and images bypass it."""
    cache = VisionFeatureCache(tmp_path / "features") if use_cache else None
    dataset = make_dataset(data_dir, processor.tokenizer, config, feature_cache=cache)
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate(items, dataset.pad_token_id)
    assert batch["videos_per_sample"].tolist() == [0, 0, 1, 0]
    assert batch["images_per_sample"].tolist() == [1, 2, 0, 2]
    assert batch["image_grid_thw"].shape == (5, 3) and batch["video_grid_thw"].shape == (1, 3)

    def forward(batch):
        if cache is None:
            inputs = model_inputs(batch)
        else:
            inputs = model_inputs(batch, pixels=False)
            inputs["mm_encoder_outputs"] = cached_video_features(model, batch, cache)
        inputs.pop("labels")
        with torch.no_grad():
            return model(**inputs).logits

    together = forward(batch)
    if cache is not None:
        assert len(cache) == 1  # the video only
        again = collate([dataset[i] for i in range(len(dataset))], dataset.pad_token_id)
        assert "pixel_values_videos" not in again  # read from the cache, not decoded
        torch.testing.assert_close(forward(again), together)
    for row, item in enumerate(items):
        alone = forward(collate([item], dataset.pad_token_id))[0]
        length = item["input_ids"].shape[0]
        torch.testing.assert_close(together[row, :length], alone, rtol=1e-4, atol=1e-5)


def test_a_sample_s_visual_inputs_are_sliced_from_the_batch(data_dir, processor, config):
    dataset = make_dataset(data_dir, processor.tokenizer, config)
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate(items, dataset.pad_token_id)
    for position, item in enumerate(items):
        own = sample_visual_inputs(batch, position)
        if "image_grid_thw" in item:
            assert set(own) == {"pixel_values", "image_grid_thw"}
            assert torch.equal(own["pixel_values"], item["pixel_values"])
            assert torch.equal(own["image_grid_thw"], item["image_grid_thw"])
        else:
            assert set(own) == {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
            assert torch.equal(own["pixel_values_videos"], item["pixel_values_videos"])


def test_missing_and_broken_images_are_skipped_samples(data_dir, processor, config, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = data_dir / "red.png"
    lines = [
        {"image": str(good), "conversations": RECORDS[0]["conversations"]},
        {"image": [str(good), "gone.png"], "conversations": RECORDS[1]["conversations"]},
        {"image": "broken.png", "conversations": RECORDS[0]["conversations"]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples = read_conversations(path)
    missing = missing_videos(samples)
    assert list(missing) == [1]
    assert "data.jsonl:2: image" in missing[1] and "gone.png does not exist" in missing[1]
    dataset = VideoConversationDataset(samples, processor.tokenizer, config.vision_config)
    assert not isinstance(dataset[0], SkippedSample)
    with pytest.warns(UserWarning, match=r"skipping sample 1: .*data.jsonl:2: image file not"):
        assert isinstance(dataset[1], SkippedSample)
    with pytest.warns(UserWarning, match=r"skipping sample 2: .*cannot be decoded: .*broken"):
        assert isinstance(dataset[2], SkippedSample)
    batch = collate([dataset[i] for i in range(3)], dataset.pad_token_id)
    assert [index for index, _ in batch["skipped"]] == [1, 2]
    assert "video_grid_thw" not in batch and batch["image_grid_thw"].shape[0] == 1
    strict = VideoConversationDataset(
        samples, processor.tokenizer, config.vision_config, fail_on_bad_samples=True
    )
    with pytest.raises(ImageError, match="data.jsonl:3: image file cannot be decoded"):
        strict[2]


def test_a_conversation_too_long_for_its_images_is_skipped(data_dir, processor, config):
    dataset = make_dataset(data_dir, processor.tokenizer, config, max_sequence_length=40)
    with pytest.warns(UserWarning, match="after the last image .* exceed max_sequence_length=40"):
        assert isinstance(dataset[1], SkippedSample)
    # The first round fits; the second round (after the last image of sample 3) does not.
    lenient = make_dataset(data_dir, processor.tokenizer, config, max_sequence_length=70)
    item = lenient[1]
    assert not isinstance(item, SkippedSample) and item["input_ids"].shape[0] <= 70


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image": "a.png", "video": "a.mp4"}, "exactly one of 'video' .* got both"),
        ({}, "exactly one of 'video' .* got neither"),
        ({"image": []}, "non-empty list of non-empty paths under 'image'"),
        ({"image": ["a.png", 3]}, "non-empty list of non-empty paths under 'image'"),
        ({"image": ["a.png", "b.png"]}, r"'<image>' once per image \(2\) .* found '<image>' 1"),
        ({"image": "a.png", "question": "<video> x"}, "no '<video>'"),
        ({"video": "a.mp4", "question": "<video> <image> x"}, "and no '<image>'"),
        ({"image": "a.png", "answer": "<image>"}, "'<image>' appears in a gpt answer"),
    ],
)
def test_malformed_image_lines_name_file_and_line(tmp_path, record, message):
    question = record.pop("question", "<image> what")
    answer = record.pop("answer", "a")
    record["conversations"] = [
        {"from": "human", "value": question},
        {"from": "gpt", "value": answer},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        read_conversations(path)


def test_image_pixel_bounds_apply(data_dir, processor, config):
    """image_max_pixels shrinks images (here 56x84 under 56x56 pixels -> 28x56, HF's
    smart_resize) with or without the processor, and both give the same grid."""
    for chosen in (None, processor):
        dataset = make_dataset(
            data_dir, processor.tokenizer, config, processor=chosen, image_max_pixels=56 * 56
        )
        grid = dataset[0]["image_grid_thw"]
        assert grid.tolist() == [[1, 2, 4]]
