"""Layer-wise hidden alignment (paper 003 eq. 6) between student mixers and teacher attention."""

import pytest
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


def padded_inputs():
    """Two samples with a video each; the second is shorter and right-padded (pad id 2)."""
    generator = torch.Generator().manual_seed(1)
    video = [VISION_START, *[VIDEO_TOKEN] * 8, VISION_END]
    ids = torch.tensor([[3, 4, *video, 5, 6, 7, 8], [4, *video, 6, 7, 2, 2, 2]])
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values_videos": torch.randn(2 * 2 * 4 * 4, 3 * 2 * 14 * 14, generator=generator),
        "video_grid_thw": torch.tensor([[2, 4, 4], [2, 4, 4]]),
        "mm_token_type_ids": (ids == VIDEO_TOKEN).int() * 2,
    }


def teacher_attention_outputs(teacher, batch, layers):
    """{layer: (input, output) of the teacher's self-attention}, by forward hooks of this test."""
    outputs, handles = {}, []
    for index in layers:
        attention = teacher.model.language_model.layers[index].self_attn

        def hook(module, args, kwargs, output, index=index):
            outputs[index] = (kwargs["hidden_states"].detach(), output[0].detach())

        handles.append(attention.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        teacher(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return outputs


def student_mixer_output(student, teacher, batch, layer):
    """(input, output) of the student mixer at `layer` in the student's own forward, with the
    teacher's self-attention put back in every layer below it: the decoder layers below are
    then the teacher's (the conversion copies norms, MLPs and embeddings), so the mixer gets the
    teacher's input to that layer and the context the student's forward builds."""
    layers = student.model.language_model.layers
    mixers = {index: layers[index].self_attn for index in range(layer)}
    recorded = {}

    def hook(module, args, output):
        recorded["io"] = (args[0].detach(), output[0].detach())

    handle = layers[layer].self_attn.mixer.register_forward_hook(hook)
    try:
        for index in mixers:
            layers[index].self_attn = teacher.model.language_model.layers[index].self_attn
        with torch.no_grad():
            student(**batch, use_cache=False)
    finally:
        handle.remove()
        for index, mixer in mixers.items():
            layers[index].self_attn = mixer
    return recorded["io"]


def test_alignment_loss_value_matches_eq6_computed_from_recorded_outputs():
    """The loss against paper 003 eq. 6 computed independently, in float64: the teacher's
    self-attention outputs recorded by this test's hooks, the student mixers' outputs from the
    student's own forward given the teacher's input at each layer, and
        L = 1/|A| sum_l [ 1/N sum_t ||h_S[l,t] - h_T[l,t]||^2 ]
    over the N scored tokens (the attention mask, or the mask given); reduction "mean" also
    divides by the hidden size D. Padding is left out of the default mask; per-layer values
    are reported."""
    teacher, student = models(ConversionPlan(mixer="mmate", fraction=1.0))
    batch = padded_inputs()
    layers = student.linear_layers
    assert layers == (0, 1)
    teacher_io = teacher_attention_outputs(teacher, batch, layers)
    student_io = {layer: student_mixer_output(student, teacher, batch, layer) for layer in layers}
    hidden_size = student.config.text_config.hidden_size
    video = batch["input_ids"] == VIDEO_TOKEN
    for mask, given in ((batch["attention_mask"].bool(), None), (video, video)):
        with torch.no_grad():
            loss, per_layer = hidden_alignment_loss(student, teacher, batch, mask=given)
            mean, _ = hidden_alignment_loss(student, teacher, batch, mask=given, reduction="mean")
        expected, paper = {}, []
        for layer in layers:
            torch.testing.assert_close(student_io[layer][0], teacher_io[layer][0])  # the input
            difference = student_io[layer][1].double() - teacher_io[layer][1].double()
            squares = difference.square().sum(-1)[mask]  # (N,) ||h_S - h_T||^2 per token
            assert squares.shape == (int(mask.sum()),) and bool((squares > 0).all())
            paper.append(squares.mean())  # eq. 6's bracket: 1/N sum_t
            expected[layer] = float(squares.mean())
        assert per_layer.keys() == expected.keys()
        for layer in layers:
            assert per_layer[layer] == pytest.approx(expected[layer], rel=1e-5), layer
        assert float(loss) == pytest.approx(sum(expected.values()) / len(layers), rel=1e-5)
        assert float(loss) == pytest.approx(float(sum(paper) / len(paper)), rel=1e-5)
        assert float(mean) * hidden_size == pytest.approx(float(loss), rel=1e-5)
    with torch.no_grad():  # scoring the padding too gives another value
        default = hidden_alignment_loss(student, teacher, batch)[0]
        everything = hidden_alignment_loss(student, teacher, batch, mask=torch.ones_like(video))[0]
    assert not torch.isclose(default, everything)


HIDDEN_STAGE = {  # a stage with the hidden loss only
    "name": "flex",
    "trainable": [".*"],
    "losses": {"hidden": 0.5},
    "learning_rate": 1e-3,
    "batch_size": 1,
    "steps": 1,
    "data": "test",
}


@pytest.mark.parametrize("reduction", ["paper", "mean"])
def test_the_trainer_uses_the_stages_hidden_reduction(reduction):
    """A stage's `hidden_reduction` reaches the loss the trainer optimises: "paper" (the
    default, eq. 6) is the hidden size times "mean"."""
    from types import SimpleNamespace

    from linvid.distill.recipe import Stage
    from linvid.distill.trainer import step_losses

    teacher, student = models("linmu")
    batch = inputs()
    batch["labels"] = torch.where(torch.arange(batch["input_ids"].shape[1]) >= 13, 5, -100)[None]
    batch["second_per_grid_ts"] = torch.tensor([1.0])
    batch["has_pixels"] = torch.ones(1, dtype=torch.bool)  # a collated batch's entry
    model_keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")
    plain = {key: batch[key] for key in (*model_keys, "mm_token_type_ids", "second_per_grid_ts")}
    stage = Stage.from_dict({**HIDDEN_STAGE, "hidden_reduction": reduction})
    assert Stage.from_dict(HIDDEN_STAGE).hidden_reduction == "paper"
    accelerator = SimpleNamespace(unwrap_model=lambda model: model)
    dataset = SimpleNamespace(feature_cache=None)
    with torch.no_grad():
        value = step_losses(stage, student, teacher, batch, accelerator, {}, dataset)["hidden"]
        expected, _ = hidden_alignment_loss(student, teacher, plain, reduction=reduction)
    torch.testing.assert_close(value, expected)
    if reduction == "mean":
        paper, _ = hidden_alignment_loss(student, teacher, plain)
        torch.testing.assert_close(value * student.config.text_config.hidden_size, paper)


def test_an_unknown_hidden_reduction_is_refused_by_name():
    from linvid.distill.recipe import Stage

    with pytest.raises(ValueError, match=r"stage 'flex'.*hidden_reduction.*'paper', 'mean'"):
        Stage.from_dict({**HIDDEN_STAGE, "hidden_reduction": "sum"})
