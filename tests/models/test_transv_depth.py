"""TransV at the real depths (issue 14): paper 002 §4.1 puts the attention-guided drop at layer
39 of Nemotron-Nano-v2's 56, an attention layer; scaled to a 28-layer hybrid whose Mamba-2
layers are 3, 7, ..., 27 (mamba2-hybrid-25 on Qwen2.5-VL-7B's depth) the deep point must still
sit at an attention layer, read that layer's attention scores, and start from its weights."""

import copy
import warnings

import pytest
import torch
from qwen_inputs import batch_inputs, video_sample
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.transv import (
    TransVPoint,
    TransVTextModel,
    apply_transv,
    paper_schedule,
)

DEPTH = 28  # Qwen2.5-VL-7B's decoder layers
HYBRID_MAMBA = tuple(range(3, DEPTH, 4))  # mamba2-hybrid-25 at 28 layers


@pytest.fixture(scope="module")
def teacher28():
    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config(num_layers=DEPTH, hidden_size=32, intermediate_size=64)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def hybrid28(teacher28):
    student = linvid.convert(teacher28, "mamba2-hybrid-25")
    assert student.linear_layers == HYBRID_MAMBA
    return student


def attention_layers_of(student):
    return tuple(i for i in range(DEPTH) if i not in student.linear_layers)


def test_the_paper_schedule_puts_the_attention_guided_drop_at_an_attention_layer(hybrid28):
    schedule = paper_schedule(DEPTH, attention_layers_of(hybrid28))
    # 39/56 of 28 is 19 (rounded down), a Mamba-2 layer; 18 and 20 are as near: the deeper.
    assert schedule == (TransVPoint(3, 0.5, "uniform"), TransVPoint(20, 0.9, "attention"))
    # A Transformer teacher keeps its points.
    assert paper_schedule(DEPTH)[1] == TransVPoint(19, 0.9, "attention")
    # Nemotron-Nano-v2's own layout (attention at 14, 21, 30, 39): the paper's layers exactly.
    assert paper_schedule(56, (14, 21, 30, 39)) == (
        TransVPoint(7, 0.5, "uniform"),
        TransVPoint(39, 0.9, "attention"),
    )


def test_the_80_layer_depth_also_lands_on_attention():
    mamba = set(range(3, 80, 4))  # mamba2-hybrid-25 on the 72B's 80 layers
    attention = tuple(i for i in range(80) if i not in mamba)
    shallow, deep = paper_schedule(80, attention)
    assert (shallow.layer, shallow.mode) == (10, "uniform")
    assert deep.mode == "attention" and deep.layer in attention and abs(deep.layer - 55.7) < 1


def test_an_all_linear_model_has_no_layer_for_the_attention_guided_drop():
    with pytest.raises(ValueError, match="needs an attention layer after layer 3"):
        paper_schedule(DEPTH, ())


def test_an_attention_guided_point_at_a_mamba_layer_is_refused_by_name(hybrid28):
    model = copy.deepcopy(hybrid28)
    schedule = [
        {"layer": 3, "drop": 0.5, "mode": "uniform"},
        {"layer": 19, "drop": 0.9, "mode": "attention"},
    ]
    with pytest.raises(ValueError) as error:
        apply_transv(model, schedule)
    message = str(error.value)
    assert "attention-guided TransV at layer 19 needs an attention layer" in message
    assert "nearest attention layers: [18, 20]" in message
    # A uniform drop at a Mamba-2 layer is what the paper does (its layer 7): accepted.
    apply_transv(model, [{"layer": 19, "drop": 0.9, "mode": "uniform"}])


def test_the_deep_point_reads_attention_scores_and_starts_from_that_layers_attention(hybrid28):
    model = apply_transv(copy.deepcopy(hybrid28), "paper").eval()
    language_model = model.model.language_model
    deep, shallow = language_model.transv["20"], language_model.transv["3"]
    layers = language_model.layers
    assert torch.equal(deep.query.weight, layers[20].self_attn.q_proj.weight)
    assert torch.equal(deep.output.weight, layers[20].self_attn.o_proj.weight)
    # Layer 3 is Mamba-2: the nearest attention layers are 2 and 4, the shallower is taken.
    assert torch.equal(shallow.key.weight, layers[2].self_attn.k_proj.weight)
    assert torch.equal(shallow.value.weight, layers[2].self_attn.v_proj.weight)

    scored = []
    original = TransVTextModel._vision_scores

    def spy(self, decoder_layer, *args):
        scores = original(self, decoder_layer, *args)
        scored.append((list(layers).index(decoder_layer), scores))
        return scores

    inputs = batch_inputs([video_sample(frames=8, suffix=(6, 7, 8, 9), seed=1)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TransVTextModel, "_vision_scores", spy)
        with torch.no_grad():
            model(**inputs, use_cache=True)
    assert [index for index, _ in scored] == [20]
    scores = scored[0][1]
    assert scores is not None and torch.all(scores > 0)


def test_a_student_saved_with_the_old_schedule_loads_as_the_uniform_drop_it_ran(hybrid28, tmp_path):
    old = [{"layer": 3, "drop": 0.5, "mode": "uniform"}, {"layer": 19, "drop": 0.9}]
    model = apply_transv(copy.deepcopy(hybrid28), [dict(old[0]), {**old[1], "mode": "uniform"}])
    # What earlier versions saved for the paper schedule at 28 layers.
    model.config.linvid_transv = [old[0], {**old[1], "mode": "attention"}]
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert any("linear-mixer layer 19" in str(item.message) for item in caught)
    points = loaded.model.language_model.transv_schedule
    assert points == (TransVPoint(3, 0.5, "uniform"), TransVPoint(19, 0.9, "uniform"))
