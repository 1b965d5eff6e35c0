"""Edges of linvid/models/transv.py the mutation run (docs/mutation.md) found unchecked: the
paper's schedule (paper 002 §4.1: uniform p = 0.5 at layer 7 and attention-guided p = 0.9 at
layer 39 of TimeViper's 56) at the depths linvid meets, its smallest depth, switching TransV
on a model that has none, and the cache passed as `cache=` (transformers >= 5.24's name)."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import DynamicCache

from linvid.models.cache import output_cache
from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.transv import (
    TransVPoint,
    apply_transv,
    paper_schedule,
    set_transv_enabled,
)


@pytest.mark.parametrize(
    ("num_layers", "shallow", "deep"),
    [
        (56, 7, 39),  # TimeViper, the paper's own depths
        (28, 3, 19),  # Qwen2.5-VL-7B: 7/56 and 39/56 of 28, rounded down
        (36, 4, 25),  # Qwen2.5-VL-3B
        (8, 1, 5),
        (4, 1, 2),
        (3, 1, 2),  # the smallest: one layer before, between and after the points
    ],
)
def test_the_paper_schedule_scales_with_depth(num_layers, shallow, deep):
    assert paper_schedule(num_layers) == (
        TransVPoint(shallow, 0.5, "uniform"),
        TransVPoint(deep, 0.9, "attention"),
    )


def test_the_paper_schedule_needs_three_layers():
    with pytest.raises(
        ValueError, match=r"^the paper schedule needs at least 3 decoder layers, got 2$"
    ):
        paper_schedule(2)


def test_switching_a_model_without_transv_is_refused_by_name():
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=1))
    with pytest.raises(
        ValueError, match=r"^Qwen2_5_VLForConditionalGeneration has no TransV to switch$"
    ):
        set_transv_enabled(model, True)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_text_model_fills_the_cache_it_is_given_under_either_name(name):
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=3))
    language_model = apply_transv(model, "paper").model.language_model.eval()
    cache = DynamicCache(config=language_model.config)
    embeddings = torch.randn(1, 5, language_model.config.hidden_size)
    with torch.no_grad():
        output = language_model(inputs_embeds=embeddings, use_cache=True, **{name: cache})
    assert output_cache(output) is cache and cache.get_seq_length() == 5
