"""The issue-15 measurements: memory of the video in RWKV-6 / Mamba-2 layers, and the
teacher-forced error of each converted layer, on tiny models whose answers are known."""

import math

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.distill.hidden import hidden_alignment_loss, teacher_forced_outputs
from linvid.eval.diagnosis import decay_memory, layer_errors, scored_span
from linvid.layers.mamba2 import Mamba2Scan
from linvid.layers.rwkv6 import RWKV6TimeMix
from linvid.models.plan import ConversionPlan
from linvid.models.tiny import VIDEO_TOKEN, VISION_END, VISION_START, tiny_qwen2_5_vl_config

PREFIX = 3  # text tokens before <|vision_start|>


def inputs(answer=True):
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[3, 4, 5, VISION_START, *[VIDEO_TOKEN] * 8, VISION_END, 5, 6, 7, 8]])
    labels = torch.full_like(ids, -100)
    if answer:
        labels[0, -1] = 8
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values_videos": torch.randn(2 * 4 * 4, 3 * 2 * 14 * 14, generator=generator),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
        "mm_token_type_ids": (ids == VIDEO_TOKEN).int() * 2,
    }
    return batch


def models(plan):
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=2)).eval()
    return teacher, linvid.convert(teacher, plan).eval()


def test_the_span_runs_from_the_first_video_token_to_the_token_before_the_answer():
    first, end = scored_span(inputs())
    assert first.tolist() == [PREFIX + 1]  # after the prefix and <|vision_start|>
    assert end.tolist() == [inputs()["input_ids"].shape[1] - 2]
    first, end = scored_span(inputs(answer=False))
    assert end.tolist() == [inputs()["input_ids"].shape[1] - 1]  # the last real token
    text_only = {**inputs(), "mm_token_type_ids": torch.zeros_like(inputs()["input_ids"])}
    with pytest.raises(ValueError, match="video or an image"):
        scored_span(text_only)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        scored_span({"input_ids": inputs()["input_ids"]})


def test_rwkv6_memory_of_constant_decays_is_their_product_over_the_span():
    _, student = models("rwkv6-all")
    # decay_down = 0 makes w = -exp(w0): half the channels decay by 1e-3 per token, half by 1.
    rates = None
    for module in student.modules():
        if isinstance(module, RWKV6TimeMix):
            size = module.decay_base.numel()
            rates = torch.tensor([1e-3] * (size // 2) + [1.0] * (size - size // 2))
            with torch.no_grad():
                module.decay_base.copy_(rates.log())
                module.decay_down.zero_()
    rows = decay_memory(student, inputs())
    assert [row["layer"] for row in rows] == [0, 1]
    assert {row["kind"] for row in rows} == {"rwkv6"}
    first, end = scored_span(inputs())
    steps = int(end - first)
    for row in rows:
        assert row["span"] == steps
        # half the channels keep exp(-1e-3 * steps) ~ 1 of the first token, half exp(-steps).
        assert row["remembering"] == pytest.approx(0.5)
        retained = sorted([-1e-3 * steps / math.log(10)] * 32 + [-steps / math.log(10)] * 32)
        assert row["median_log10_retention"] == pytest.approx(
            torch.tensor(retained).median().item(), rel=1e-5
        )
        # half-lives ln2/1e-3 and ln2/1: torch's median of an even count is the lower one.
        assert row["median_half_life"] == pytest.approx(math.log(2), rel=1e-5)


def test_mamba2_memory_is_dt_times_a_over_the_span():
    _, student = models(ConversionPlan(mixer="mamba2", fraction=1.0))
    scans = [module for module in student.modules() if isinstance(module, Mamba2Scan)]
    assert scans
    for scan in scans:
        heads = scan.A_log.numel()
        with torch.no_grad():
            scan.dt_proj.weight.zero_()
            scan.dt_bias.fill_(math.log(math.expm1(0.5)))  # softplus^-1(0.5): dt = 0.5
            # A = -0.002 on the first head (remembers), -2 on the others (forget at once)
            scan.A_log.copy_(torch.tensor([0.002] + [2.0] * (heads - 1)).log())
    rows = decay_memory(student, inputs())
    first, end = scored_span(inputs())
    steps = int(end - first)
    for row in rows:
        assert row["kind"] == "mamba2"
        assert row["remembering"] == pytest.approx(1 / heads)
        assert row["median_half_life"] == pytest.approx(math.log(2) / 1.0, rel=1e-5)
    assert len(rows) == len(scans)
    assert steps > 0


def test_linmu_counts_only_the_forward_scans():
    _, student = models("linmu")
    rows = decay_memory(student, inputs())
    assert rows and all(row["module"].endswith("forward_scan") for row in rows)
    assert all(0.0 <= row["remembering"] <= 1.0 for row in rows)


def test_decay_memory_refuses_a_model_without_recurrent_layers():
    teacher, _ = models("linmu")
    with pytest.raises(ValueError, match="no RWKV-6 or Mamba-2 layer"):
        decay_memory(teacher, inputs())


def test_layer_errors_agree_with_the_alignment_loss_and_a_zero_mixer_scores_one():
    teacher, student = models("linmu")
    batch = inputs()
    rows = layer_errors(student, teacher, batch)
    assert [row["layer"] for row in rows] == [0, 1]
    _, per_layer = hidden_alignment_loss(student, teacher, batch, reduction="paper")
    outputs = teacher_forced_outputs(student, teacher, batch)
    tokens = batch["input_ids"].numel()
    for row in rows:
        target = outputs[row["layer"]][1]
        expected = per_layer[row["layer"]] * tokens / float(target.pow(2).sum())
        assert row["relative_error"] == pytest.approx(expected, rel=1e-4)
        assert len(row["by_position"]) == 4

    # A mixer that outputs zeros is exactly as far from the teacher as the teacher from zero.
    for layer in student.model.language_model.layers:
        mixer = layer.self_attn.mixer
        mixer.forward = lambda hidden_states, context=None, state=None: (
            torch.zeros_like(hidden_states),
            None,
        )
    for row in layer_errors(student, teacher, batch, bins=2):
        assert row["relative_error"] == pytest.approx(1.0)
        assert row["vision"] == pytest.approx(1.0) and row["text"] == pytest.approx(1.0)
        assert row["by_position"] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="bins"):
        layer_errors(student, teacher, batch, bins=0)
