"""`linvid.convert(path, plan)`: the memory-lean way (issue 14). Given a checkpoint directory,
convert loads the teacher and converts it in place, so one model is in memory, and gives the
student that converting a loaded teacher gives."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.models.tiny import tiny_qwen2_5_vl_config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=4))
    path = tmp_path_factory.mktemp("teacher")
    teacher.to(torch.bfloat16).save_pretrained(path)
    return path


def test_a_path_converts_like_the_loaded_teacher(teacher_dir):
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher_dir)
    from_model = linvid.convert(teacher, "mamba2-hybrid-25").state_dict()
    from_path = linvid.convert(teacher_dir, "mamba2-hybrid-25")
    assert from_path.dtype == torch.bfloat16  # the saved dtype, as from_pretrained keeps it
    state = from_path.state_dict()
    assert state.keys() == from_model.keys()
    assert all(torch.equal(state[name], from_model[name]) for name in state)
    as_float = linvid.convert(str(teacher_dir), "mamba2-hybrid-25", dtype=torch.float32)
    assert as_float.dtype == torch.float32


def test_bad_paths_and_options_are_named(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="^model .*nowhere does not exist: expected a local model"):
        linvid.convert(tmp_path / "nowhere", "linmu")
    with pytest.raises(ValueError, match="out of range"):
        linvid.convert(teacher_dir, {"mixer": "rwkv6", "layers": [9]})
    teacher = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(num_layers=2))
    with pytest.raises(ValueError, match=r"load options \['dtype'\] apply only when"):
        linvid.convert(teacher, "linmu", dtype=torch.float32)
