"""Conversion of a tiny Qwen2.5-VL teacher into each kind of student: structure, weight reuse
at the model level, hybrid-cache decoding, padding, generate() and the safetensors round trip."""

import json

import pytest
import torch
from qwen_inputs import batch_inputs, video_sample
from transformers import AutoModelForImageTextToText

import linvid
from linvid.models.cache import HybridCache, cache_keyword, output_cache
from linvid.models.mixer_attention import MixerAttention
from linvid.models.plan import PRESETS, ConversionPlan

PLANS = {
    "rwkv6": ConversionPlan(mixer="rwkv6", layers=(1,)),
    "rwkv6_hybrid": ConversionPlan(mixer="rwkv6_hybrid", layers=(1,)),
    "mamba2": ConversionPlan(mixer="mamba2", layers=(0,)),
    "mmate_all": ConversionPlan(mixer="mmate", fraction=1.0),
    "rwkv6_all": ConversionPlan(mixer="rwkv6", fraction=1.0),
    # The papers' ablations (paper 000 Table 4, paper 003 Table 4).
    "rwkv6_hybrid_static": ConversionPlan(mixer="rwkv6_hybrid", layers=(1,), gate="static"),
    "mmate_flex": ConversionPlan(mixer="mmate", fraction=1.0, branches="flex"),
    "mmate_swin": ConversionPlan(mixer="mmate", fraction=1.0, branches="swin"),
}


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_empty_plan_is_bit_identical_to_the_teacher(teacher, video_inputs):
    student = linvid.convert(teacher, ConversionPlan(mixer="rwkv6", layers=()))
    assert torch.equal(logits_of(student, video_inputs), logits_of(teacher, video_inputs))


@pytest.mark.parametrize("name", sorted(PLANS))
def test_converted_layers_and_kept_modules(teacher, name):
    plan = PLANS[name]
    student = linvid.convert(teacher, plan)
    converted = set(plan.layer_indices(2))
    for index, layer in enumerate(student.model.language_model.layers):
        assert isinstance(layer.self_attn, MixerAttention) == (index in converted)
        teacher_layer = teacher.model.language_model.layers[index]
        for kept in ("mlp", "input_layernorm", "post_attention_layernorm"):
            for (key, value), (_, reference) in zip(
                getattr(layer, kept).state_dict().items(),
                getattr(teacher_layer, kept).state_dict().items(),
                strict=True,
            ):
                assert torch.equal(value, reference), (index, kept, key)
    for kept in ("visual", "language_model.embed_tokens", "language_model.norm"):
        student_module = student.model.get_submodule(kept)
        teacher_module = teacher.model.get_submodule(kept)
        for value, reference in zip(
            student_module.state_dict().values(), teacher_module.state_dict().values(), strict=True
        ):
            assert torch.equal(value, reference)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


# Local-Swin alone gives the text tokens no attention output at all (it covers vision tokens
# only): that ablation does not start near the teacher, as its paper 003 Table 4 scores show.
@pytest.mark.parametrize("name", sorted(set(PLANS) - {"mmate_swin"}))
def test_student_logits_at_init_are_finite_and_follow_the_teacher(teacher, video_inputs, name):
    student = linvid.convert(teacher, PLANS[name])
    student_logits = logits_of(student, video_inputs)
    teacher_logits = logits_of(teacher, video_inputs)
    assert torch.isfinite(student_logits).all()
    correlation = torch.corrcoef(torch.stack([student_logits.flatten(), teacher_logits.flatten()]))
    assert correlation[0, 1] > 0.5


@pytest.mark.parametrize("padded_batch", [False, True])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_prefill_then_decoding_equals_one_full_forward(teacher, name, padded_batch):
    student = linvid.convert(teacher, PLANS[name])
    samples = [video_sample(suffix=(6, 7, 8, 9, 10, 11))]
    if padded_batch:  # a second, shorter sample: left padding in the prefill
        samples.append(video_sample(frames=2, width=56, suffix=(9, 8, 7, 6, 5, 4), seed=3))
    inputs = batch_inputs(samples)
    full = logits_of(student, inputs)
    decode_steps = 4
    # M-RoPE positions of the whole sequence, as generate() passes them step by step.
    positions, _ = student.model.get_rope_index(
        inputs["input_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    prefill = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        prefill[key] = inputs[key][:, :-decode_steps]
    with torch.no_grad():
        output = student(**prefill, use_cache=True)
        cache = output_cache(output)
        assert isinstance(cache, HybridCache)
        logits = [output.logits]
        length = prefill["input_ids"].shape[1]
        for step in range(decode_steps):
            position = length + step
            output = student(
                input_ids=inputs["input_ids"][:, position : position + 1],
                attention_mask=inputs["attention_mask"][:, : position + 1],
                position_ids=positions[:, :, position : position + 1],
                **cache_keyword(cache),
                use_cache=True,
            )
            logits.append(output.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_left_padded_batch_matches_single_samples(teacher, name):
    student = linvid.convert(teacher, PLANS[name])
    long_sample = video_sample(prefix=(3, 4, 5, 9, 10, 11, 12), seed=1)
    short_sample = video_sample(frames=2, width=56, seed=2)
    batched = logits_of(student, batch_inputs([long_sample, short_sample]))
    for row, sample in enumerate((long_sample, short_sample)):
        alone = logits_of(student, batch_inputs([sample]))
        length = alone.shape[1]
        torch.testing.assert_close(batched[row, -length:], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["rwkv6_hybrid", "mmate_all", "mamba2"])
def test_generate_matches_greedy_decoding_by_hand(teacher, video_inputs, name):
    student = linvid.convert(teacher, PLANS[name])
    with torch.no_grad():
        generated = student.generate(**video_inputs, max_new_tokens=5, do_sample=False)
        tokens = video_inputs["input_ids"]
        for _ in range(5):
            inputs = dict(video_inputs, input_ids=tokens)
            inputs["attention_mask"] = torch.ones_like(tokens)
            inputs["mm_token_type_ids"] = (tokens == 61).int() * 2
            next_token = student(**inputs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def test_linear_state_does_not_grow_with_the_sequence(teacher):
    student = linvid.convert(teacher, PLANS["rwkv6_all"])
    sizes = []
    for frames in (2, 8):
        inputs = batch_inputs([video_sample(frames=frames)])
        with torch.no_grad():
            cache = output_cache(student(**inputs, use_cache=True))
        sizes.append(cache.state_bytes())
    assert sizes[0] == sizes[1]
    assert sizes[0]["linear_states"] > 0 and sizes[0]["attention_kv"] == 0


@pytest.mark.parametrize("name", sorted(PLANS))
def test_save_and_load_round_trip(teacher, video_inputs, tmp_path, name):
    student = linvid.convert(teacher, PLANS[name])
    student.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "linvid_qwen2_5_vl"
    assert saved["linvid_plan"]["mixer"] == PLANS[name].mixer
    for loaded in (AutoModelForImageTextToText.from_pretrained(tmp_path), linvid.load(tmp_path)):
        loaded.eval()
        torch.testing.assert_close(
            logits_of(loaded, video_inputs), logits_of(student, video_inputs), rtol=0, atol=0
        )


def test_presets_resolve_and_convert(teacher):
    for name in PRESETS:
        student = linvid.convert(teacher, name)
        assert student.plan == PRESETS[name]


def test_bad_plans_are_clear_errors(teacher):
    with pytest.raises(ValueError, match="out of range"):
        linvid.convert(teacher, ConversionPlan(mixer="rwkv6", layers=(5,)))
    with pytest.raises(ValueError, match="unknown mixer"):
        ConversionPlan(mixer="lstm", layers=(0,))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        ConversionPlan(mixer="rwkv6", fraction=1.5)
    with pytest.raises(ValueError, match="exactly one of layers"):
        ConversionPlan(mixer="rwkv6")
    with pytest.raises(ValueError, match="unknown preset"):
        linvid.convert(teacher, "qwen-rwkv-vl-75")
    with pytest.raises(ValueError, match="cannot convert a Linear"):
        linvid.convert(torch.nn.Linear(2, 2), "linmu")
    with pytest.raises(ValueError, match=r"unknown gate 'none'; expected one of \('dynamic'"):
        ConversionPlan(mixer="rwkv6_hybrid", layers=(0,), gate="none")
    with pytest.raises(ValueError, match="gate 'static' applies to the rwkv6_hybrid mixer"):
        ConversionPlan(mixer="rwkv6", layers=(0,), gate="static")
    with pytest.raises(ValueError, match=r"unknown branches 'all'; expected one of \('both'"):
        ConversionPlan(mixer="mmate", fraction=1.0, branches="all")
    with pytest.raises(ValueError, match="branches 'flex' applies to the mmate mixer only"):
        ConversionPlan(mixer="mamba2", layers=(0,), branches="flex")


def test_paper_000_placements_on_28_layers():
    # 25% of 28 layers is 7 layers (paper 000 §5.4); "late" puts each at the end of its block.
    late = ConversionPlan(mixer="rwkv6_hybrid", fraction=0.25, placement="late")
    assert late.layer_indices(28) == (3, 7, 11, 15, 19, 23, 27)
    early = ConversionPlan(mixer="rwkv6_hybrid", fraction=0.25, placement="early")
    assert early.layer_indices(28) == (0, 4, 8, 12, 16, 20, 24)
    ablation = ConversionPlan(mixer="rwkv6_hybrid", layers=(6, 13, 20, 27))
    assert ablation.layer_indices(28) == (6, 13, 20, 27)


@pytest.mark.parametrize("mixer", ["rwkv6", "mamba2", "mmate", "rwkv6_hybrid"])
def test_random_init_draws_new_projections(teacher, video_inputs, mixer):
    transfer = linvid.convert(teacher, ConversionPlan(mixer=mixer, layers=(1,)))
    random = linvid.convert(teacher, ConversionPlan(mixer=mixer, layers=(1,), init="random"))
    query = teacher.model.language_model.layers[1].self_attn.q_proj.weight

    def copies_query(student, branch=""):
        weights = student.model.language_model.layers[1].self_attn.mixer.get_submodule(branch)
        return any(w.shape == query.shape and torch.equal(w, query) for w in weights.parameters())

    if mixer == "rwkv6_hybrid":
        # The random-init ablation of paper 000 Table 4 is of the RWKV part: the scene
        # cross-attention starts from the attention either way.
        assert copies_query(transfer, "time_mix") and not copies_query(random, "time_mix")
        assert copies_query(random, "cross_attention") and copies_query(transfer, "cross_attention")
    else:
        assert copies_query(transfer) and not copies_query(random)
    assert torch.isfinite(logits_of(random, video_inputs)).all()


def test_empty_plan_generates_like_the_teacher(teacher):
    inputs = batch_inputs([video_sample(frames=16)])
    student = linvid.convert(teacher, ConversionPlan(mixer="rwkv6", layers=()))
    settings = {
        "max_new_tokens": 6,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        expected = teacher.generate(**inputs, **settings)
        got = student.generate(**inputs, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    for step_logits, reference in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(step_logits, reference, rtol=1e-5, atol=1e-5)
