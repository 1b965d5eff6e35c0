"""After a TransV drop (paper 002), a student's linear mixers read the shortened rows: rows of
a batch keep different numbers of tokens, so the shortened rows are padded on the left. Every
logit of each row of a padded batch must equal that sample's logits alone (test_transv_model's
padded generate() compares three greedy tokens only).

The mixers' biases are drawn away from their conversion values: at conversion they are zero,
and the padding slots' hidden states are zero too (no bias anywhere in Qwen's layers), so a
mixer that ignored the padding mask would still add nothing there and the test could not tell
(docs/mutation.md: the `_shorten_context` mutants survived that way)."""

import copy

import pytest
import torch
from qwen_inputs import batch_inputs, video_sample
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.models.plan import ConversionPlan
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.transv import apply_transv

# The drop at layer 1 comes before the linear layers 2 and 3, which read the shortened rows.
SCHEDULE = [{"layer": 1, "drop": 0.5, "mode": "uniform"}]
SAMPLES = [  # different lengths and numbers of vision tokens: left padding before any drop
    video_sample(frames=8, suffix=(6, 7, 8, 9, 10, 11), seed=1),
    video_sample(frames=4, prefix=(3, 4, 5, 9, 10), suffix=(9, 8, 7, 6, 5, 4), seed=2),
]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=4)).eval()


@pytest.mark.parametrize("mixer", ["rwkv6", "mamba2"])
def test_mixers_after_a_drop_mask_the_padding_of_the_shortened_rows(teacher, mixer):
    student = linvid.convert(teacher, ConversionPlan(mixer=mixer, layers=(2, 3)))
    student = apply_transv(copy.deepcopy(student), SCHEDULE).eval()
    with torch.no_grad():
        for module in student.model.language_model.transv.values():
            module.alpha.fill_(0.5)  # a trained-looking gate: the transfer is visible
        generator = torch.Generator().manual_seed(3)
        for name, parameter in student.named_parameters():
            if ".mixer." in name and "bias" in name:  # trained-looking mixer biases
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
        batched = batch_inputs(SAMPLES)
        assert not batched["attention_mask"].all()  # the batch is padded
        logits = student(**batched, use_cache=False).logits
        for row, sample in enumerate(SAMPLES):
            alone = student(**batch_inputs([sample]), use_cache=False).logits[0]
            real = batched["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row, real], alone, rtol=1e-4, atol=1e-4)
