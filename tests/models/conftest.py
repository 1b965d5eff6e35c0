"""Fixtures: a tiny Qwen2.5-VL teacher and one video input."""

import pytest
import torch
from qwen_inputs import batch_inputs, video_sample
from transformers import Qwen2_5_VLForConditionalGeneration

from linvid.models.tiny import tiny_qwen2_5_vl_config


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=2))
    return model.eval()


@pytest.fixture(scope="module")
def video_inputs():
    return batch_inputs([video_sample()])
