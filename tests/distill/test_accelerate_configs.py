"""The example accelerate configs parse with accelerate's own loader and say what they claim."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize(
    ("name", "distributed", "processes"),
    [
        ("one_gpu.yaml", "NO", 1),
        ("deepspeed_zero2_8gpu.yaml", "DEEPSPEED", 8),
        ("fsdp2_8gpu.yaml", "FSDP", 8),
        ("cpu_2proc.yaml", "MULTI_CPU", 2),
        ("fsdp2_cpu_2proc.yaml", "FSDP", 2),
    ],
)
def test_config_loads(name, distributed, processes):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == distributed and config.num_processes == processes
    if distributed == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2
    if distributed == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2


def test_fsdp_cpu_config_is_the_gpu_one_apart_from_the_device():
    """test_distributed_cpu.py runs the CPU config: it must shard as the 8-GPU one does."""
    gpu = load_config_from_file(str(CONFIGS / "fsdp2_8gpu.yaml"))
    cpu = load_config_from_file(str(CONFIGS / "fsdp2_cpu_2proc.yaml"))
    assert cpu.fsdp_config == gpu.fsdp_config
    assert (cpu.use_cpu, gpu.use_cpu, cpu.mixed_precision) == (True, False, "no")
