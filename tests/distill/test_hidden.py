"""Layer-wise hidden alignment (paper 003 eq. 6) between student mixers and teacher attention."""

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.distill.hidden import hidden_alignment_loss, record_attention
from linvid.models.plan import ConversionPlan
from linvid.models.tiny import VIDEO_TOKEN, VISION_END, VISION_START, tiny_qwen2_5_vl_config


def inputs():
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[3, 4, VISION_START, *[VIDEO_TOKEN] * 8, VISION_END, 5, 6, 7]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(2 * 4 * 4, 3 * 2 * 14 * 14, generator=generator),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
        "mm_token_type_ids": (ids == VIDEO_TOKEN).int() * 2,
    }


def models(plan):
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=2)).eval()
    return teacher, linvid.convert(teacher, plan)


def test_records_what_the_teacher_attention_sees_and_returns():
    teacher, _ = models("linmu")
    batch = inputs()
    with torch.no_grad(), record_attention(teacher, (1,)) as records:
        teacher(**batch, use_cache=False)
    hidden_in, output = records[1]
    attention = teacher.model.language_model.layers[1].self_attn
    assert not attention._forward_hooks  # removed on exit
    assert hidden_in.shape == output.shape == (1, batch["input_ids"].shape[1], 64)
    assert torch.isfinite(output).all() and output.abs().sum() > 0


def test_alignment_loss_trains_only_the_mixers_and_decreases():
    teacher, student = models(ConversionPlan(mixer="mmate", fraction=1.0))
    batch = inputs()
    loss, per_layer = hidden_alignment_loss(student, teacher, batch)
    assert set(per_layer) == {0, 1} and torch.isfinite(loss)
    loss.backward()
    for name, parameter in student.named_parameters():
        touched = parameter.grad is not None and parameter.grad.abs().sum() > 0
        if ".mixer." not in name:
            assert not touched, name
    mixer_parameters = [p for n, p in student.named_parameters() if ".mixer." in n]
    optimizer = torch.optim.Adam(mixer_parameters, lr=1e-2)
    first = float(loss.detach())
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = hidden_alignment_loss(student, teacher, batch)
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.5 * first
