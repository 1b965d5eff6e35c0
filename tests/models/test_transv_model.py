"""TransV inside a tiny Qwen2.5-VL (teacher and student): shorter sequences for later layers,
p = 0 bit-identical, prefill + decoding == one full forward, generate(), save/load, errors."""

import copy
import json

import pytest
import torch
from qwen_inputs import batch_inputs, video_sample
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.models.cache import cache_keyword, output_cache
from linvid.models.plan import ConversionPlan
from linvid.models.tiny import VIDEO_TOKEN, tiny_qwen2_5_vl_config
from linvid.models.transv import TransVPoint, apply_transv, paper_schedule

SCHEDULE = [
    {"layer": 1, "drop": 0.5, "mode": "uniform"},
    {"layer": 3, "drop": 0.9, "mode": "attention"},
]
# A model without attention layers can only drop uniformly (attention-guided points need an
# attention layer's scores).
UNIFORM_SCHEDULE = [dict(point, mode="uniform") for point in SCHEDULE]
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def teacher4():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=4)).eval()


def long_inputs(seed=0):
    # 32 video tokens between a 4-token prefix and a 6-token instruction.
    return batch_inputs([video_sample(frames=8, suffix=(6, 7, 8, 9, 10, 11), seed=seed)])


def with_transv(model, schedule=SCHEDULE, alpha=0.5):
    model = apply_transv(copy.deepcopy(model), schedule)
    with torch.no_grad():
        for module in model.model.language_model.transv.values():
            module.alpha.fill_(alpha)  # a trained-looking gate, so the transfer is visible
    return model.eval()


def student(teacher4, layers=(2,), schedule=SCHEDULE):
    # Default: one linear layer between the two TransV points.
    converted = linvid.convert(teacher4, ConversionPlan(mixer="rwkv6", layers=layers))
    return with_transv(converted, schedule)


def make(teacher4, kind):
    if kind == "teacher":
        return with_transv(teacher4)
    if kind == "all-linear":
        return student(teacher4, (0, 1, 2, 3), UNIFORM_SCHEDULE)
    return student(teacher4)


def logits_of(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, use_cache=False, **kwargs).logits


def tokens_per_layer(model, inputs):
    seen = {}
    handles = [
        layer.register_forward_pre_hook(lambda _, args, i=i: seen.__setitem__(i, args[0].shape[1]))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    logits_of(model, inputs)
    for handle in handles:
        handle.remove()
    return seen


def test_zero_drop_is_bit_identical_to_the_model_without_transv(teacher4):
    inputs = long_inputs()
    model = with_transv(teacher4, [{"layer": 1, "drop": 0.0}, {"layer": 2, "drop": 0.0}])
    assert torch.equal(logits_of(model, inputs), logits_of(teacher4, inputs))


def test_later_layers_see_a_shorter_sequence(teacher4):
    inputs = long_inputs()
    length = inputs["input_ids"].shape[1]
    # 32 vision tokens: 16 dropped before layer 1, floor(0.9 * 16) = 14 before layer 3.
    assert tokens_per_layer(with_transv(teacher4), inputs) == {
        0: length,
        1: length - 16,
        2: length - 16,
        3: length - 30,
    }
    logits = logits_of(with_transv(teacher4), inputs)
    assert logits.shape[:2] == (1, length) and bool(torch.isfinite(logits).all())


def test_transfer_reaches_the_instruction_tokens_only_when_alpha_is_nonzero(teacher4):
    inputs = long_inputs()
    model = with_transv(teacher4, [{"layer": 1, "drop": 0.5}], alpha=0.0)
    moved = with_transv(teacher4, [{"layer": 1, "drop": 0.5}], alpha=0.5)
    text = inputs["mm_token_type_ids"][0] == 0
    plain, transferred = logits_of(model, inputs), logits_of(moved, inputs)
    last_vision = int(torch.nonzero(~text).max())
    # Text before the video sees no transfer; instruction tokens do once alpha != 0.
    assert torch.equal(plain[0, :4], transferred[0, :4])
    assert not torch.allclose(plain[0, last_vision + 1 :], transferred[0, last_vision + 1 :])


def test_attention_mode_keeps_the_vision_tokens_the_layer_attends_to_most(teacher4):
    inputs = long_inputs()
    eager = copy.deepcopy(teacher4)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        weights = eager(**inputs, use_cache=False, output_attentions=True).attentions[1]
    vision = torch.nonzero(inputs["mm_token_type_ids"][0]).flatten()
    scores = weights[0, :, -1, vision].mean(dim=0)  # last token, averaged over heads
    expected = vision[scores.topk(16).indices.sort().values]
    model = with_transv(teacher4, [{"layer": 1, "drop": 0.5, "mode": "attention"}])
    with torch.no_grad():
        kept = output_cache(model(**inputs, use_cache=True)).transv_kept[1][0]
    assert kept[torch.isin(kept, vision)].tolist() == expected.tolist()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kind", ["teacher", "student", "all-linear"])
def test_prefill_then_decoding_equals_one_full_forward(teacher4, kind, padded):
    model = make(teacher4, kind)
    inputs = batch_inputs(PADDED_SAMPLES) if padded else long_inputs()
    prompt = inputs["input_ids"].shape[1] - DECODE_STEPS
    full = logits_of(model, inputs, transv_prompt_length=prompt)
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    prefill = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        prefill[key] = inputs[key][:, :prompt]
    with torch.no_grad():
        output = model(**prefill, use_cache=True)
        cache = output_cache(output)
        assert sorted(cache.transv_kept) == [1, 3]
        logits = [output.logits]
        for position in range(prompt, prompt + DECODE_STEPS):
            output = model(
                input_ids=inputs["input_ids"][:, position : position + 1],
                attention_mask=inputs["attention_mask"][:, : position + 1],
                position_ids=positions[:, :, position : position + 1],
                **cache_keyword(cache),
                use_cache=True,
            )
            logits.append(output.logits)
    decoded = torch.cat(logits, dim=1)
    # Dropped tokens have no logits (zeros); every kept position must match.
    kept = full.abs().amax(-1) > 0
    if not padded:
        assert int(kept.sum()) == full.shape[1] - 30
    torch.testing.assert_close(decoded[kept], full[kept], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_generate_matches_greedy_decoding_by_hand(teacher4, kind):
    model = with_transv(teacher4) if kind == "teacher" else student(teacher4)
    inputs = long_inputs()
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        tokens = inputs["input_ids"]
        for _ in range(4):
            step = dict(inputs, input_ids=tokens, attention_mask=torch.ones_like(tokens))
            step["mm_token_type_ids"] = (tokens == VIDEO_TOKEN).int() * 2
            logits = logits_of(model, step, transv_prompt_length=prompt)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


PADDED_SAMPLES = [  # different lengths and different numbers of vision tokens: left padding
    video_sample(frames=8, suffix=(6, 7, 8, 9, 10, 11), seed=1),
    video_sample(frames=4, prefix=(3, 4, 5, 9, 10), suffix=(9, 8, 7, 6, 5, 4), seed=2),
]


@pytest.mark.parametrize("padded", [False, True])
def test_batch_matches_single_samples(teacher4, padded):
    model = with_transv(teacher4)
    if padded:
        samples = PADDED_SAMPLES
    else:
        samples = [video_sample(frames=8, suffix=(6, 7, 8, 9), seed=seed) for seed in (1, 2)]
    batched = logits_of(model, batch_inputs(samples))
    for row, sample in enumerate(samples):
        alone = logits_of(model, batch_inputs([sample]))
        length = alone.shape[1]
        torch.testing.assert_close(batched[row, -length:], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["student", "empty-plan teacher"])
def test_save_and_load_round_trip(teacher4, tmp_path, kind):
    # A teacher is saved as a student with an empty plan (bit-identical to the teacher).
    plan = ConversionPlan(mixer="rwkv6", layers=(2,) if kind == "student" else ())
    model = with_transv(linvid.convert(teacher4, plan))
    inputs = long_inputs()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["linvid_transv"] == SCHEDULE
    for loaded in (AutoModelForImageTextToText.from_pretrained(tmp_path), linvid.load(tmp_path)):
        transv = loaded.model.language_model.transv
        assert transv["1"].alpha.item() == pytest.approx(0.5)
        torch.testing.assert_close(
            logits_of(loaded.eval(), inputs), logits_of(model, inputs), rtol=0, atol=0
        )


def test_paper_schedule_depths():
    # paper 002 §4.1: layers 7 and 39 of TimeViper's 56
    assert paper_schedule(56) == (TransVPoint(7, 0.5, "uniform"), TransVPoint(39, 0.9, "attention"))
    assert paper_schedule(28) == (TransVPoint(3, 0.5, "uniform"), TransVPoint(19, 0.9, "attention"))


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([{"layer": 0, "drop": 0.5}], "out of range"),
        ([{"layer": 4, "drop": 0.5}], "out of range"),
        ([{"layer": 1, "drop": 1.0}], "drop rate"),
        ([{"layer": 1, "drop": -0.2}], "drop rate"),
        ([{"layer": 1, "drop": 0.5, "mode": "topk"}], "mode"),
        ([{"layer": 1, "drop": 0.5}, {"layer": 1, "drop": 0.2}], "duplicates"),
        ([{"layer": 1, "p": 0.5}], "unknown TransV fields"),
    ],
)
def test_bad_schedules_are_clear_errors(teacher4, schedule, message):
    with pytest.raises(ValueError, match=message):
        apply_transv(copy.deepcopy(teacher4), schedule)


def test_unsupported_uses_are_clear_errors(teacher4):
    model = with_transv(teacher4)
    with pytest.raises(ValueError, match="already has TransV"):
        apply_transv(model, SCHEDULE)
    mmate = linvid.convert(teacher4, ConversionPlan(mixer="mmate", fraction=1.0))
    with pytest.raises(ValueError, match="M-MATE"):
        apply_transv(mmate, UNIFORM_SCHEDULE)
    with pytest.raises(ValueError, match="convert its teacher first"):
        linvid.convert(model, ConversionPlan(mixer="rwkv6", layers=(2,)))
    mamba_first = linvid.convert(teacher4, ConversionPlan(mixer="mamba2", layers=(0, 1)))
    with pytest.raises(ValueError, match="first attention layer"):
        apply_transv(mamba_first, SCHEDULE)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_padded_generate_matches_single_samples(teacher4, kind):
    model = with_transv(teacher4) if kind == "teacher" else student(teacher4)
    with torch.no_grad():
        batched = model.generate(**batch_inputs(PADDED_SAMPLES), max_new_tokens=3, do_sample=False)
        for row, sample in enumerate(PADDED_SAMPLES):
            alone = model.generate(**batch_inputs([sample]), max_new_tokens=3, do_sample=False)
            assert torch.equal(batched[row, -3:], alone[0, -3:])


def test_training_loss_reaches_alpha_at_init(teacher4):
    model = apply_transv(copy.deepcopy(teacher4), SCHEDULE).train()
    inputs = long_inputs()
    labels = torch.where(inputs["mm_token_type_ids"] > 0, -100, inputs["input_ids"])
    model(**inputs, labels=labels, use_cache=False).loss.backward()
    for module in model.model.language_model.transv.values():
        assert module.alpha.item() == 0.0
        assert module.alpha.grad is not None and module.alpha.grad.abs().item() > 0
