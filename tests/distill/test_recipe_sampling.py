"""Per-stage video sampling in recipes: the fields are validated with errors naming the stage
and field, the shipped recipes carry the papers' numbers, the command line overrides them,
and `linvid distill`'s dataset samples as the stage says."""

import pytest

from linvid.cli import build_parser
from linvid.distill.recipe import Recipe, load_recipe
from linvid.distill.trainer import RunOptions, make_dataset, stage_decodes_key, stage_sampling

STAGE = {
    "name": "one",
    "trainable": ["x"],
    "losses": {"kl": 1.0},
    "learning_rate": 1e-4,
    "batch_size": 1,
    "data": "d",
    "steps": 1,
}


def recipe(**fields):
    return Recipe.from_dict({"name": "r", "stages": [{**STAGE, **fields}]})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"fps": 0}, "'fps' must be > 0"),
        ({"fps": "fast"}, "'fps' must be a number"),
        ({"max_frames": 2.5}, "'max_frames' must be an integer"),
        ({"max_frames": 1}, "'max_frames' must be an integer >= 2"),
        ({"max_pixels": -1}, "'max_pixels' must be > 0"),
        ({"min_pixels": 200, "max_pixels": 100}, r"'max_pixels' must be >= min_pixels \(200\)"),
        ({"image_max_pixels": 1000}, r"'image_max_pixels' must be an integer >= 3136"),
        ({"max_pixel": 100}, r"unknown stage fields \['max_pixel'\]"),
    ],
)
def test_bad_sampling_fields_name_stage_and_field(fields, message):
    with pytest.raises(ValueError, match=f"stage 'one': .*{message}"):
        recipe(**fields)


def test_defaults_are_shared_and_a_stage_overrides_them():
    parsed = Recipe.from_dict(
        {
            "name": "r",
            "defaults": {"fps": 1.0, "max_frames": 256, "max_pixels": 147456},
            "stages": [STAGE, {**STAGE, "name": "two", "fps": 2, "max_frames": 64}],
        }
    )
    first, second = parsed.stages
    assert first.video_sampling() == {"fps": 1.0, "max_frames": 256, "max_pixels": 147456}
    assert second.video_sampling() == {"fps": 2.0, "max_frames": 64, "max_pixels": 147456}


def test_overrides_win_and_num_frames_replaces_fps():
    stage = recipe(fps=1, max_frames=256, min_pixels=3136, max_pixels=50176).stages[0]
    assert stage.video_sampling(max_frames=32, max_pixels=8000) == {
        "fps": 1.0,
        "max_frames": 32,
        "min_pixels": 3136,
        "max_pixels": 8000,
    }
    assert stage.video_sampling(num_frames=8) == {
        "num_frames": 8,
        "max_frames": 256,
        "min_pixels": 3136,
        "max_pixels": 50176,
    }
    assert stage.video_sampling(fps=0.5)["fps"] == 0.5
    assert recipe().stages[0].video_sampling() == {}  # the data loader's defaults
    with pytest.raises(ValueError, match="max_pixels 1000 is below min_pixels 3136"):
        stage.video_sampling(max_pixels=1000)


@pytest.mark.parametrize(
    "name, expected",
    [
        # paper 000 Table 5: "Fps max frames 64", "Video max pixels 50176"
        ("qwen_rwkv_vl", {"max_frames": 64, "max_pixels": 50176}),
        # paper 002 §4.1: 1 fps, at most 256 frames, 384 x 384 frames
        ("timeviper", {"fps": 1.0, "max_frames": 256, "max_pixels": 384 * 384}),
        # paper 001 §4.1 / Table 2: 384-pixel inputs at 1 fps
        ("auroralong", {"fps": 1.0, "max_pixels": 384 * 384, "image_max_pixels": 384 * 384}),
        # paper 003: not given; paper 000's setting for the same teacher
        ("linmu", {"max_frames": 64, "max_pixels": 50176}),
    ],
)
def test_shipped_recipes_carry_the_papers_sampling(name, expected):
    for stage in load_recipe(name).stages:
        sampling = stage.video_sampling()
        assert {key: sampling.get(key) for key in expected} == expected, stage.name


def test_distill_flags_reach_the_options():
    parser = build_parser()
    arguments = parser.parse_args(
        "distill --recipe linmu --teacher t --data d.jsonl --out o --fps 0.5 --max-frames 32 "
        "--max-pixels 50176".split()
    )
    assert (arguments.fps, arguments.max_frames, arguments.max_pixels) == (0.5, 32, 50176)
    with pytest.raises(SystemExit):  # --fps and --num-frames exclude each other
        parser.parse_args(
            "distill --recipe linmu --teacher t --data d.jsonl --out o --fps 1 "
            "--num-frames 8".split()
        )


def test_trainer_dataset_samples_as_the_stage_says(tmp_path):
    """make_dataset gives VideoConversationDataset the stage's sampling, the options winning;
    the teacher-decodes key changes with it (decodes depend on the frames)."""
    from linvid.models.processor import build_bpe_tokenizer
    from linvid.models.tiny import tiny_qwen2_5_vl_config
    from linvid.models.tokenizer import token_ids

    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"video": "a.mp4", "conversations": [{"from": "human", "value": "<video> what"}, '
        '{"from": "gpt", "value": "a"}]}\n'
    )
    tokenizer = build_bpe_tokenizer(["what a"], vocab_size=260)
    config = tiny_qwen2_5_vl_config(token_ids=token_ids(tokenizer))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    stage = recipe(fps=1, max_frames=256, max_pixels=147456, image_max_pixels=147456).stages[0]
    options = RunOptions(teacher=str(teacher), data=str(data), out=str(tmp_path / "run"))
    dataset = make_dataset(options, stage, tokenizer, config)
    assert dataset.sampling["fps"] == 1.0 and dataset.sampling["max_frames"] == 256
    assert dataset.max_pixels == 147456 and dataset.image_max_pixels == 147456
    override = RunOptions(**{**options.__dict__, "num_frames": 8, "max_pixels": 50176})
    dataset = make_dataset(override, stage, tokenizer, config)
    assert dataset.sampling["num_frames"] == 8 and dataset.sampling["fps"] is None
    assert dataset.max_pixels == 50176
    assert stage_sampling(stage, override)["max_frames"] == 256
    assert stage_decodes_key(stage, options) != stage_decodes_key(stage, override)
