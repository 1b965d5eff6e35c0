"""Per-frame ToMe after Qwen2.5-VL's vision tower (paper 002 §3.1): token counts, sizes,
positions and orders; without merging, positions and logits exactly Qwen's own; merged prompts
through the teacher and students, generate() and prefill + decode."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.eval.prompts import render_video_prompt, video_messages
from linvid.models.cache import cache_keyword
from linvid.models.frame_tome import (
    append_text_positions,
    compressed_video_inputs,
    merge_video_tokens,
    merged_position_ids,
)
from linvid.models.qwen2_5_vl import build_context
from linvid.models.qwen_video import video_to_patches
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids

QUESTION = "what color is the circle ?"
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 56 * 112}
STUDENTS = ("rwkv6-all", "linmu", "qwen-rwkv-vl-25")
ORDER_NAMES = ("ascending", "descending", "none")


def random_video(t=2, h=8, w=8, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(t * h * w, dim, generator=generator), (t, h, w)


def test_counts_sizes_features_and_positions():
    features, grid = random_video()
    merged = merge_video_tokens(features, grid, tokens_per_frame=5)  # 64 -> 32 -> 16 -> 8 -> 5
    assert merged.features.shape == (10, 16) and merged.size.shape == (10,)
    assert merged.merged and merged.token_grid == (2, 1, 5) and merged.num_tokens == 10
    assert merged.size.view(2, 5).sum(1).tolist() == [64.0, 64.0]
    frames = features.view(2, 64, 16)
    temporal, y, x = merged.positions.view(3, 2, 5)
    assert temporal.tolist() == [[0] * 5, [1] * 5]
    for frame in range(2):
        destination = merged.merge.destination[frame]
        for token in range(5):
            cells = (destination == token).nonzero().reshape(-1)
            assert merged.size[frame * 5 + token] == cells.numel()
            # Each token is the mean of its cells and sits at its first (raster) cell.
            torch.testing.assert_close(
                merged.features[frame * 5 + token], frames[frame, cells].mean(0)
            )
            assert int(y[frame, token] * 8 + x[frame, token]) == int(cells.min())


def test_identical_rows_merge_across_rounds():
    rows = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    features = rows.repeat_interleave(4, dim=0)  # a 4x4 frame whose row y is rows[y]
    merged = merge_video_tokens(features, (1, 4, 4), tokens_per_frame=4)  # 16 -> 8 -> 4
    torch.testing.assert_close(merged.features, rows)
    assert merged.size.tolist() == [4.0] * 4
    assert merged.positions[1:].T.tolist() == [[0, 0], [1, 0], [2, 0], [3, 0]]


def test_orders_permute_the_same_tokens():
    features, grid = random_video(t=3, h=6, w=4, seed=1)
    results = {order: merge_video_tokens(features, grid, 7, order) for order in ORDER_NAMES}

    def rows(merged):
        table = torch.cat([merged.positions.T.float(), merged.size[:, None], merged.features], 1)
        return sorted(map(tuple, table.tolist()))

    assert rows(results["ascending"]) == rows(results["descending"]) == rows(results["none"])
    for order, descending in (("ascending", False), ("descending", True)):
        merged = results[order]
        size = merged.size.view(3, 7)
        raster = (merged.positions[1] * 4 + merged.positions[2]).view(3, 7)
        # Sorted by size; equal sizes in raster order of their first cell.
        keys = (-size if descending else size) * 100 + raster
        assert torch.equal(keys, keys.sort(dim=1).values), order


def test_merging_never_crosses_frames():
    features, grid = random_video(t=3, h=4, w=6, seed=2)
    whole = merge_video_tokens(features, grid, 5)
    for frame, chunk in enumerate(features.view(3, 24, 16)):
        alone = merge_video_tokens(chunk, (1, 4, 6), 5)
        torch.testing.assert_close(whole.features.view(3, 5, 16)[frame], alone.features)
        assert torch.equal(whole.size.view(3, 5)[frame], alone.size)
        assert torch.equal(whole.positions.view(3, 3, 5)[1:, frame], alone.positions[1:])


@pytest.mark.parametrize("order", ORDER_NAMES)
@pytest.mark.parametrize("tokens_per_frame", [24, 100])
def test_frames_with_few_tokens_are_kept(order, tokens_per_frame):
    features, grid = random_video(t=2, h=4, w=6, seed=4)
    merged = merge_video_tokens(features, grid, tokens_per_frame, order, time_interval=2.5)
    assert torch.equal(merged.features, features)
    assert not merged.merged and merged.token_grid == grid and merged.tokens_per_frame == 24
    assert torch.equal(merged.size, torch.ones(48))
    t, y, x = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(6), indexing="ij")
    expected = torch.stack([(t * 2.5).long(), y, x]).reshape(3, -1)  # frame 1 at floor(2.5)
    assert torch.equal(merged.positions, expected)


def test_bad_arguments_raise():
    features, grid = random_video(t=1, h=4, w=4)
    for tokens_per_frame in (0, -3, 2.5):
        with pytest.raises(ValueError, match="tokens_per_frame must be an int >= 1"):
            merge_video_tokens(features, grid, tokens_per_frame)
    with pytest.raises(ValueError, match="order must be one of"):
        merge_video_tokens(features, grid, 4, "random")
    with pytest.raises(ValueError, match="t\\*h\\*w = 32 rows"):
        merge_video_tokens(features, (2, 4, 4), 4)
    with pytest.raises(ValueError, match="grid must be"):
        merge_video_tokens(features, (16,), 4)
    with pytest.raises(ValueError, match="time_interval"):
        merge_video_tokens(features, grid, 4, time_interval=0)
    merged = merge_video_tokens(features, grid, 4)
    with pytest.raises(ValueError, match="one run of 4 video placeholders"):
        merged_position_ids(torch.tensor([5, 9, 9, 5, 9, 9]), merged, video_token_id=9)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([QUESTION, "red green blue yellow"])


@pytest.fixture(scope="module")
def models(tokenizer):
    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config(num_layers=2, token_ids=token_ids(tokenizer))
    teacher = Qwen2_5_VLForConditionalGeneration(config).eval()
    return {"teacher": teacher, **{name: linvid.convert(teacher, name) for name in STUDENTS}}


@pytest.fixture(scope="module")
def video(models):
    frames = torch.randint(
        0, 256, (8, 3, 56, 112), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    return video_to_patches(frames, models["teacher"].config.vision_config, **PIXELS)


def unmerged_inputs(model, tokenizer, video):
    pixels, grid = video  # patch grid (4, 4, 8): 4 frames of 2 x 4 LLM tokens
    ids = torch.tensor([render_video_prompt(tokenizer, video_messages(QUESTION), 32)])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": pixels,
        "video_grid_thw": grid,
        "mm_token_type_ids": (ids == model.config.video_token_id).int() * 2,
    }


@pytest.mark.parametrize("second_per_grid", [1, 0.5])
@pytest.mark.parametrize("tokens_per_frame", [8, 50])
def test_positions_without_merging_are_qwens(
    models, tokenizer, video, tokens_per_frame, second_per_grid
):
    teacher = models["teacher"]
    reference = unmerged_inputs(teacher, tokenizer, video)
    with torch.no_grad():
        inputs, merged = compressed_video_inputs(
            teacher,
            tokenizer,
            *video,
            QUESTION,
            tokens_per_frame=tokens_per_frame,
            second_per_grid=second_per_grid,
        )
    expected, _ = teacher.model.get_rope_index(
        reference["input_ids"],
        reference["mm_token_type_ids"],
        video_grid_thw=reference["video_grid_thw"],
        second_per_grid_ts=torch.tensor([second_per_grid]),
    )
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    assert torch.equal(inputs["position_ids"][1:], expected)
    assert torch.equal(inputs["position_ids"][0, 0], torch.arange(expected.shape[-1]))
    assert torch.equal(inputs["video_grid_thw"], video[1]) and not merged.merged


@pytest.mark.parametrize("name", ["teacher", *STUDENTS])
def test_logits_without_merging_equal_the_unmerged_model(models, tokenizer, video, name):
    model = models[name]
    with torch.no_grad():
        inputs, _ = compressed_video_inputs(model, tokenizer, *video, QUESTION, tokens_per_frame=8)
        merged = model(**inputs, use_cache=False).logits
        unmerged = model(**unmerged_inputs(model, tokenizer, video), use_cache=False).logits
    assert torch.equal(merged, unmerged)


def test_teacher_generate_without_merging_equals_qwens_own(models, tokenizer, video):
    teacher = models["teacher"]
    settings = {
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        inputs, _ = compressed_video_inputs(
            teacher, tokenizer, *video, QUESTION, tokens_per_frame=8
        )
        ours = teacher.generate(**inputs, **settings)
        qwen = teacher.generate(**unmerged_inputs(teacher, tokenizer, video), **settings)
    assert torch.equal(ours.sequences, qwen.sequences)
    assert all(map(torch.equal, ours.logits, qwen.logits))


def test_students_see_a_merged_frame_as_a_row(models, tokenizer, video):
    student = models["linmu"]
    with torch.no_grad():
        inputs, _ = compressed_video_inputs(
            student, tokenizer, *video, QUESTION, tokens_per_frame=3, order="descending"
        )
    assert inputs["mm_encoder_outputs"]["video"].pooler_output[0].shape == (12, 64)
    assert inputs["video_grid_thw"].tolist() == [[4, 2, 6]]  # (t, 1, n) as a patch grid
    context = build_context(
        student.config,
        student.plan,
        input_ids=inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"],
    )
    (layout,) = context.videos[0]
    video_tokens = (inputs["input_ids"][0] == student.config.video_token_id).nonzero()
    assert layout.grid == (4, 1, 3) and torch.equal(layout.positions, video_tokens.reshape(-1))


@pytest.mark.parametrize("name", ["teacher", *STUDENTS])
def test_generate_on_a_merged_prompt_decodes_like_one_full_forward(models, tokenizer, video, name):
    model = models[name]
    with torch.no_grad():
        inputs, merged = compressed_video_inputs(
            model, tokenizer, *video, QUESTION, tokens_per_frame=3
        )
        length = inputs["input_ids"].shape[1]
        assert length == len(render_video_prompt(tokenizer, video_messages(QUESTION), 12))
        output = model.generate(
            **inputs,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            # Random weights: keep the placeholder id out of the answer, or the full forward
            # below would count it as a video token.
            suppress_tokens=[model.config.video_token_id],
            output_logits=True,
            return_dict_in_generate=True,
        )
        sequence = output.sequences
        full = model(
            input_ids=sequence,
            position_ids=append_text_positions(inputs["position_ids"], 4),
            mm_token_type_ids=torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 4)),
            mm_encoder_outputs=inputs["mm_encoder_outputs"],
            video_grid_thw=inputs["video_grid_thw"],
            use_cache=False,
        ).logits
    assert full.isfinite().all()
    generated = torch.stack(output.logits, dim=1)  # (1, 4, vocab): prefill, then 3 decodes
    torch.testing.assert_close(generated, full[:, length - 1 : -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", STUDENTS)
def test_student_prefill_then_decode_equals_full_forward(models, tokenizer, video, name):
    student = models[name]
    answer = torch.tensor([[5, 9, 7]])
    with torch.no_grad():
        inputs, _ = compressed_video_inputs(
            student, tokenizer, *video, QUESTION, tokens_per_frame=3
        )
        length = inputs["input_ids"].shape[1]
        positions = append_text_positions(inputs["position_ids"], 3)
        sequence = torch.cat([inputs["input_ids"], answer], dim=1)
        full = student(
            input_ids=sequence,
            position_ids=positions,
            mm_token_type_ids=torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 3)),
            mm_encoder_outputs=inputs["mm_encoder_outputs"],
            video_grid_thw=inputs["video_grid_thw"],
            use_cache=False,
        ).logits
        cache = student.make_cache()
        steps = [student(**inputs, **cache_keyword(cache), use_cache=True).logits[:, -1]]
        for index in range(3):
            steps.append(
                student(
                    input_ids=answer[:, index : index + 1],
                    position_ids=positions[..., length + index : length + index + 1],
                    **cache_keyword(cache),
                    use_cache=True,
                ).logits[:, -1]
            )
    torch.testing.assert_close(torch.stack(steps, 1), full[:, length - 1 :], atol=1e-5, rtol=1e-5)


def test_qwen_ignores_the_grid_when_features_and_positions_are_given(models, tokenizer, video):
    teacher = models["teacher"]
    with torch.no_grad():
        inputs, _ = compressed_video_inputs(
            teacher, tokenizer, *video, QUESTION, tokens_per_frame=3
        )
        with_grid = teacher(**inputs).logits
        inputs.pop("video_grid_thw")
        without_grid = teacher(**inputs).logits
    assert torch.equal(with_grid, without_grid)
