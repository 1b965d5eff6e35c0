"""A damaged checkpoint file is named with what went wrong (linvid/distill/checkpoint.py): the
message the mutation run (docs/mutation.md) found unchecked."""

import re

import pytest
import torch
from safetensors.torch import save_file

from linvid.distill.checkpoint import CheckpointError, _load_tensors


def test_a_truncated_safetensors_file_is_named_with_the_reason(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.arange(4.0)}, str(path))
    assert torch.equal(_load_tensors(path)["weight"], torch.arange(4.0))
    path.write_bytes(path.read_bytes()[:-3])
    message = (
        re.escape(f"{path} does not load as safetensors (SafetensorError: ")
        + r".+"
        + re.escape("); the file is truncated or corrupt")
    )
    with pytest.raises(CheckpointError, match=f"^{message}$"):
        _load_tensors(path)
