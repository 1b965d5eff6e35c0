"""Layer-wise hidden-state alignment (paper 003 eq. 6): each replaced layer's mixer, fed the
teacher's own input to that layer, is compared with the teacher attention's output there.

The teacher runs once per batch; forward hooks on its self-attention modules at the student's
converted layers record what goes in (the normalised hidden states) and what comes out. Each
student mixer then runs on exactly those inputs, so every layer is trained against its own
teacher layer without errors compounding from the layers below.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from linvid.distill.losses import hidden_mse
from linvid.models.qwen2_5_vl import LinvidQwen2_5_VLForConditionalGeneration, build_context


@contextmanager
def record_attention(teacher, layers):
    """Record the inputs and outputs of the teacher's self-attention at `layers`.

    Yields a dict filled during the teacher's forward: {layer: (hidden_in (B, L, D),
    attention_out (B, L, D))}, both detached."""
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    decoder_layers = teacher.model.language_model.layers
    for index in layers:

        def hook(module, args, kwargs, output, index=index):
            hidden_in = kwargs.get("hidden_states", args[0] if args else None)
            records[index] = (hidden_in.detach(), output[0].detach())

        handles.append(
            decoder_layers[index].self_attn.register_forward_hook(hook, with_kwargs=True)
        )
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def teacher_forced_outputs(
    student: LinvidQwen2_5_VLForConditionalGeneration, teacher, inputs: dict
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each converted layer's mixer run on the teacher's own input to that layer.

    inputs: the batch's model inputs (input_ids, attention_mask, pixel_values_videos, ...),
    the same tokens for both models. The teacher runs without gradients, the mixers with them
    when grad is enabled. Returns {layer: (student mixer output (B, L, D), teacher attention
    output (B, L, D), detached)} in the student's layer order."""
    layers = student.linear_layers
    if not layers:
        raise ValueError("the student has no converted layers to align")
    with torch.no_grad(), record_attention(teacher, layers) as records:
        teacher(**inputs, use_cache=False)
    context = build_context(
        student.config,
        student.plan,
        input_ids=inputs.get("input_ids"),
        inputs_embeds=inputs.get("inputs_embeds"),
        attention_mask=inputs.get("attention_mask"),
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
    )
    decoder_layers = student.model.language_model.layers
    outputs = {}
    for index in layers:
        hidden_in, target = records[index]
        output, _ = decoder_layers[index].self_attn.mixer(hidden_in, context, None)
        outputs[index] = (output, target)
    return outputs


def hidden_alignment_loss(
    student: LinvidQwen2_5_VLForConditionalGeneration,
    teacher,
    inputs: dict,
    mask=None,
    *,
    reduction: str = "paper",
) -> tuple[torch.Tensor, dict[int, float]]:
    """Mean over the student's converted layers of hidden_mse(mixer(teacher input), teacher
    attention output) (paper 003 eq. 6).

    inputs: the batch's model inputs (input_ids, attention_mask, pixel_values_videos, ...);
    mask: (B, L) tokens to score, default the attention mask; reduction: hidden_mse's ("paper":
    summed over channels, as eq. 6; "mean": also divided by them). The teacher runs without
    gradients. Returns (loss, {layer: its mse}) for logging."""
    outputs = teacher_forced_outputs(student, teacher, inputs)
    if mask is None and inputs.get("attention_mask") is not None:
        mask = inputs["attention_mask"].bool()
    per_layer = {}
    total = 0.0
    for index, (output, target) in outputs.items():
        loss = hidden_mse(output, target, mask, reduction=reduction)
        per_layer[index] = float(loss.detach())
        total = total + loss
    return total / len(outputs), per_layer
