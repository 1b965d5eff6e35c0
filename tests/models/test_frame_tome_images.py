"""Per-frame ToMe on images (paper 001 Table 1 and Appendix setting B: the 10% keep ratio holds
for single images too): samples with one image, several images, an image and a video, or a
video, right-padded in one batch. Without merging the inputs, positions and logits are exactly
what Qwen2.5-VL gives the unmerged batch (positions from transformers' own `get_rope_index`);
merged, every token sits where `get_rope_index` puts the first grid cell it covers."""

import pytest
import torch
from qwen_inputs import PATCH_VALUES, video_sample
from transformers.modeling_outputs import BaseModelOutputWithPooling

import linvid
from linvid.models.frame_tome import FrameBudget, merge_video_tokens, merged_video_batch
from linvid.models.qwen2_5_vl import build_context
from linvid.models.tiny import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START

STUDENTS = ("rwkv6-all", "linmu", "qwen-rwkv-vl-25")
SECONDS = (0.5, 1.0)  # second_per_grid_ts of the batch's two videos
MERGE = 2  # the tiny config's spatial merge size


def image(height, width, seed):
    """One image of (height, width) patches: (its placeholder run with vision start / end,
    pixel rows (h*w, 1176), grid (3,) = [1, h, w]) as Qwen's image processor lays it out."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(height * width, PATCH_VALUES, generator=generator)
    tokens = (height // MERGE) * (width // MERGE)
    return [VISION_START, *([IMAGE_TOKEN] * tokens), VISION_END], pixels, [1, height, width]


def video(frames, height, width, seed):
    """One video (frames x height x width pixels) as `image` returns an image."""
    ids, pixels, grid = video_sample(frames, height, width, prefix=(), suffix=(), seed=seed)
    return ids.tolist(), pixels, grid.tolist()


def sample_parts():
    """Four samples, each a list of text ids and (kind, vision item): one image; two images
    between text; an image, then a video; a video alone."""
    return [
        [[3, 4], ("image", image(8, 8, seed=1)), [5, 6, 7]],
        [[3], ("image", image(8, 12, seed=2)), [8, 9], ("image", image(6, 4, seed=3)), [5, 6]],
        [[4, 4, 4], ("image", image(4, 6, seed=4)), [9], ("video", video(4, 112, 112, 5)), [7]],
        [[3, 5], ("video", video(6, 56, 112, seed=6)), [6, 7, 8, 9]],
    ]


def batch_inputs():
    """The four samples right-padded into one batch of unmerged model inputs with labels on
    each sample's last two text tokens."""
    rows, pixels, grids = [], {"image": [], "video": []}, {"image": [], "video": []}
    for parts in sample_parts():
        ids = []
        for part in parts:
            if isinstance(part, list):
                ids += part
            else:
                kind, (run, rows_of_pixels, grid) = part
                ids += run
                pixels[kind].append(rows_of_pixels)
                grids[kind].append(grid)
        rows.append(torch.tensor(ids))
    longest = max(len(row) for row in rows)
    input_ids = torch.stack([torch.nn.functional.pad(row, (0, longest - len(row))) for row in rows])
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = (torch.arange(longest)[None] < lengths[:, None]).long()
    labels = torch.full_like(input_ids, -100)
    for i, length in enumerate(lengths.tolist()):
        labels[i, length - 2 : length] = input_ids[i, length - 2 : length]
    types = (input_ids == IMAGE_TOKEN).long() + 2 * (input_ids == VIDEO_TOKEN).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "mm_token_type_ids": types * attention_mask,
        "pixel_values": torch.cat(pixels["image"]),
        "image_grid_thw": torch.tensor(grids["image"]),
        "pixel_values_videos": torch.cat(pixels["video"]),
        "video_grid_thw": torch.tensor(grids["video"]),
        "second_per_grid_ts": torch.tensor(SECONDS),
    }


@pytest.fixture(scope="module")
def models(teacher):
    return {"teacher": teacher, **{name: linvid.convert(teacher, name) for name in STUDENTS}}


@pytest.fixture(scope="module")
def inputs():
    return batch_inputs()


def qwen_positions(model, inputs):
    """transformers' own M-RoPE positions (3, B, L) of the unmerged batch."""
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
        attention_mask=inputs["attention_mask"],
    )
    return positions


def unmerged(inputs):
    return {key: value for key, value in inputs.items() if key != "labels"}


@pytest.mark.parametrize(
    "budget", [{"tokens_per_frame": 24}, {"tokens_per_frame": None, "keep_ratio": 1.0}]
)
def test_without_merging_inputs_and_positions_are_qwens(models, inputs, budget):
    teacher = models["teacher"]
    with torch.no_grad():
        merged = merged_video_batch(teacher, inputs, **budget)
        images = teacher.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        ).pooler_output
    mask = inputs["attention_mask"].bool()
    for name in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        assert torch.equal(merged[name], inputs[name]), name
    for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(merged[name], inputs[name]), name
    assert all(map(torch.equal, merged["mm_encoder_outputs"]["image"].pooler_output, images))
    expected = qwen_positions(teacher, inputs)
    assert torch.equal(merged["position_ids"][1:][:, mask], expected[:, mask])
    lengths = mask.sum(1).tolist()
    for row, length in enumerate(lengths):
        assert torch.equal(merged["position_ids"][0, row, :length], torch.arange(length))


def encoded(model, inputs):
    """The unmerged batch with the vision tower's outputs as mm_encoder_outputs."""
    result = {key: value for key, value in unmerged(inputs).items() if "pixel" not in key}
    result["mm_encoder_outputs"] = {
        "image": model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        ),
        "video": model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
        ),
    }
    return result


@pytest.mark.parametrize("name", ["teacher", *STUDENTS])
def test_logits_without_merging_equal_the_unmerged_model(models, inputs, name):
    model = models[name]
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        merged = merged_video_batch(model, inputs, 24)
        merged.pop("labels")
        ours = model(**merged, use_cache=False).logits
        # The unmerged model from pixels (a scene-token student encodes both pixel kinds
        # itself) and from the tower's outputs.
        reference = model(**unmerged(inputs), use_cache=False).logits
        from_features = model(**encoded(model, inputs), use_cache=False).logits
    assert torch.equal(ours[mask], reference[mask])
    assert torch.equal(from_features[mask], reference[mask])


def first_cells(merged_item):
    """(frames, n) raster index of the first grid cell every merged token covers, read from
    the merge's destinations."""
    destination = merged_item.merge.destination  # (t, h*w)
    frames, tokens = merged_item.merge.size.shape
    first = torch.empty(frames, tokens, dtype=torch.long)
    for frame in range(frames):
        for token in range(tokens):
            first[frame, token] = (destination[frame] == token).nonzero().min()
    return first


@pytest.mark.parametrize(
    "budget",
    [{"tokens_per_frame": 3}, {"tokens_per_frame": None, "keep_ratio": 0.25}],
    ids=["three_per_frame", "keep_quarter"],
)
def test_merged_images_and_videos_sit_at_their_first_cells(models, inputs, budget):
    """Each image keeps FrameBudget's tokens as a (1, 1, n) row, each video frame likewise; the
    features are the direct merge of the tower's outputs; every text token keeps its unmerged
    position, every merged token takes the position `get_rope_index` gives its first cell."""
    teacher = models["teacher"]
    with torch.no_grad():
        merged = merged_video_batch(teacher, inputs, **budget)
        features = {
            "image": teacher.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
            ).pooler_output,
            "video": teacher.model.get_video_features(
                inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
            ).pooler_output,
        }
    reference = qwen_positions(teacher, inputs)
    frame_budget = FrameBudget(**budget)
    used = {"image": 0, "video": 0}
    for row, parts in enumerate(sample_parts()):
        cursor, expected_ids, expected_positions = 0, [], []
        for part in parts:
            if isinstance(part, list):
                expected_ids += part
                expected_positions.append(reference[:, row, cursor : cursor + len(part)])
                cursor += len(part)
                continue
            kind, (run, _, grid) = part
            index = used[kind]
            used[kind] += 1
            t, h, w = grid[0], grid[1] // MERGE, grid[2] // MERGE
            n = frame_budget.frame_tokens(h * w)
            assert n < h * w  # every image and frame of this batch merges
            assert merged[f"{kind}_grid_thw"][index].tolist() == [t, MERGE, n * MERGE]
            item = merge_video_tokens(features[kind][index], (t, h, w), n)
            ours = merged["mm_encoder_outputs"][kind].pooler_output[index]
            assert torch.equal(ours, item.features)
            cells = (first_cells(item) + torch.arange(t)[:, None] * h * w).reshape(-1)
            start = cursor + 1  # after <|vision_start|>
            expected_ids += [VISION_START, *run[1:2] * (t * n), VISION_END]
            expected_positions += [
                reference[:, row, cursor : cursor + 1],
                reference[:, row, start + cells],
                reference[:, row, start + t * h * w : start + t * h * w + 1],
            ]
            cursor += len(run)
        length = len(expected_ids)
        assert merged["attention_mask"][row].sum() == length
        assert merged["input_ids"][row, :length].tolist() == expected_ids
        positions = torch.cat(expected_positions, dim=1)
        assert torch.equal(merged["position_ids"][1:, row, :length], positions)
        labels = merged["labels"][row, :length]
        assert labels[-2:].tolist() == expected_ids[-2:] and (labels[:-2] == -100).all()
    assert used == {"image": 4, "video": 2}


def test_keep_ratio_budget_per_image():
    """max(1, round(r x n)) for an image of n tokens; at least one token; tokens_per_frame
    wins over keep_ratio; the count of a grid is frames x that."""
    budget = FrameBudget(keep_ratio=0.1)
    assert [budget.frame_tokens(n) for n in (1, 4, 6, 16, 24, 25, 144)] == [1, 1, 1, 2, 2, 2, 14]
    assert budget.count(torch.tensor([[1, 24, 24]]), 2) == 14
    assert budget.count([4, 16, 16], 2) == 4 * 6
    assert FrameBudget(16, keep_ratio=0.5).count([8, 16, 16], 2) == 8 * 16
    assert FrameBudget(16).count([2, 4, 4], 2) == 2 * 4  # never more than a frame has
    with pytest.raises(ValueError, match="tokens_per_frame or keep_ratio, got neither"):
        FrameBudget()
    with pytest.raises(ValueError, match="keep_ratio must be a number in \\(0, 1\\]"):
        FrameBudget(keep_ratio=0)
    with pytest.raises(ValueError, match="tokens_per_frame must be an int >= 1"):
        FrameBudget(0)


def test_vision_tower_features_give_the_same_batch(models, inputs):
    """mm_encoder_outputs with both modalities (the feature-cache path) instead of pixels."""
    teacher = models["teacher"]
    with torch.no_grad():
        from_pixels = merged_video_batch(teacher, inputs, 3)
        encoded = {
            "image": teacher.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
            ),
            "video": teacher.model.get_video_features(
                inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
            ),
        }
        features = dict(inputs, mm_encoder_outputs=encoded)
        del features["pixel_values"], features["pixel_values_videos"]
        from_features = merged_video_batch(teacher, features, 3)
    assert from_pixels.keys() == from_features.keys()
    for key in ("image", "video"):
        pairs = zip(
            from_pixels["mm_encoder_outputs"][key].pooler_output,
            from_features["mm_encoder_outputs"][key].pooler_output,
            strict=True,
        )
        assert all(torch.equal(a, b) for a, b in pairs)
    for key in from_pixels.keys() - {"mm_encoder_outputs"}:
        assert torch.equal(from_pixels[key], from_features[key]), key


def image_only(inputs, rows):
    """The batch's rows `rows` (image samples only) with their images' inputs."""
    images = inputs["image_grid_thw"]
    owners = [0, 1, 1, 2]  # sample of each image
    chosen = [index for index, owner in enumerate(owners) if owner in rows]
    sizes = images.prod(-1).tolist()
    starts = [sum(sizes[:index]) for index in range(len(sizes))]
    pixels = [inputs["pixel_values"][starts[i] : starts[i] + sizes[i]] for i in chosen]
    picked = {
        name: inputs[name][rows]
        for name in ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
    }
    return {**picked, "pixel_values": torch.cat(pixels), "image_grid_thw": images[chosen]}


def test_image_only_batch_trains_the_vision_tower_through_the_merge(models, inputs):
    """An image-only batch (AuroraLong's single-image stage at keep ratio 0.1) has no video
    keys; the student sees each merged image as a (1, 1, n) layout, and the loss reaches the
    vision tower's weights through the merge."""
    student = models["linmu"]
    batch = image_only(inputs, [0, 1])
    merged = merged_video_batch(student, batch, None, keep_ratio=0.1)
    assert "video_grid_thw" not in merged and "second_per_grid_ts" not in merged
    assert set(merged["mm_encoder_outputs"]) == {"image"}
    # 16, 24 and 6 tokens: round(1.6) = 2, round(2.4) = 2, round(0.6) = 1 kept.
    assert merged["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 4], [1, 2, 2]]
    context = build_context(
        student.config,
        student.plan,
        input_ids=merged["input_ids"],
        mm_token_type_ids=merged["mm_token_type_ids"],
        image_grid_thw=merged["image_grid_thw"],
    )
    layouts = [[layout.grid for layout in row] for row in context.videos]
    assert layouts == [[(1, 1, 2)], [(1, 1, 2), (1, 1, 1)]]
    labels = merged.pop("labels")
    student.zero_grad()
    logits = student(**merged, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    patch_embedding = student.model.visual.patch_embed.proj.weight
    assert patch_embedding.grad is not None and patch_embedding.grad.abs().sum() > 0
    student.zero_grad()


def test_mismatched_inputs_raise(models, inputs):
    teacher = models["teacher"]
    short = dict(inputs, image_grid_thw=inputs["image_grid_thw"][:3])
    short["pixel_values"] = inputs["pixel_values"][: int(short["image_grid_thw"].prod(-1).sum())]
    with torch.no_grad():
        with pytest.raises(ValueError, match="more image placeholder runs than rows"):
            merged_video_batch(teacher, short, 3)
        no_pixels = {key: value for key, value in inputs.items() if key != "pixel_values"}
        with pytest.raises(ValueError, match="needs the images' pixels \\(pixel_values\\)"):
            merged_video_batch(teacher, no_pixels, 3)
        features = BaseModelOutputWithPooling(pooler_output=(torch.zeros(16, 64),))
        one = dict(no_pixels, mm_encoder_outputs={"image": features})
        with pytest.raises(ValueError, match="holds 1 images, image_grid_thw 4"):
            merged_video_batch(teacher, one, 3)
        text = {key: inputs[key] for key in ("input_ids", "attention_mask", "labels")}
        with pytest.raises(ValueError, match="neither image_grid_thw nor video_grid_thw"):
            merged_video_batch(teacher, text, 3)
