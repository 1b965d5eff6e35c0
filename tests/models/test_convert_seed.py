"""`linvid.convert` is reproducible (issue 14): the parameters a conversion draws rather than
copies (RWKV-6's low-rank adapters, Mamba-2's A_log / dt_bias / dt projection) come from a
fixed seed, so converting one teacher twice gives one student whatever the caller's random
state, and the caller's random state is left as it was."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.models.plan import PRESETS, ConversionPlan
from linvid.models.tiny import tiny_qwen2_5_vl_config


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=4)).eval()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_converting_twice_gives_the_same_student(teacher, preset):
    torch.manual_seed(1)
    first = linvid.convert(teacher, preset).state_dict()
    torch.manual_seed(2)
    second = linvid.convert(teacher, preset).state_dict()
    assert first.keys() == second.keys()
    assert [name for name in first if not torch.equal(first[name], second[name])] == []
    # Another seed draws other values for the drawn parameters only.
    other = linvid.convert(teacher, preset, seed=1).state_dict()
    drawn = [name for name in first if not torch.equal(first[name], other[name])]
    assert drawn and all(".self_attn.mixer." in name for name in drawn)


def test_random_init_is_seeded_too(teacher):
    plan = ConversionPlan(mixer="mamba2", layers=(1, 3), init="random")
    first = linvid.convert(teacher, plan).state_dict()
    second = linvid.convert(teacher, plan).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_the_callers_random_state_is_left_as_it_was(teacher):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    linvid.convert(teacher, "linmu")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_a_bad_seed_is_refused(teacher, seed):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        linvid.convert(teacher, "rwkv6-all", seed=seed)
