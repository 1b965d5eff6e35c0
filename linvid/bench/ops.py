"""Speed of the sequence ops, measured in one run so the ratios hold on a noisy machine.

`linvid bench ops` (or `python -m linvid.bench.ops`) times, at B=1, H=4, K=V=P=N=64, fp32,
forward and forward+backward, each op's per-token reference, chunked form and one-token step,
beside same-run anchors: a plain per-token float32 loop for WKV6 and transformers'
`mamba2_chunk_scan` (chunk 64) for SSD. Achieved GFLOP/s counts the matmul FLOPs torch's
FlopCounterMode sees in one call, against this machine's fp32 matmul rate measured in the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from linvid.ops.ssd import ssd_chunk, ssd_recurrent, ssd_step
from linvid.ops.wkv6 import wkv6_chunk, wkv6_recurrent, wkv6_step

HEADS = 4
DIM = 64  # K = V for WKV6, P = N for SSD
STEP_TOKENS = 256  # decoding steps timed for the per-token step rate


@dataclass
class Row:
    op: str
    tokens: int
    mode: str  # "forward" | "forward+backward" | "step"
    implementation: str
    milliseconds: float  # median over repeats; for "step", per token
    speedup_vs_anchor: float | None  # anchor time / this time, same run
    gflops: float | None  # counted matmul GFLOP/s
    share_of_matmul_peak: float | None


def median_seconds(
    function: Callable[[], object], repeats: int, warmup: int = 1, slow_seconds: float = 2.0
) -> float:
    """Median wall time of `function()` over `repeats` calls after `warmup` untimed calls.

    A call slower than `slow_seconds` is timed once (the per-token references at long T take
    tens of seconds with backward; their first-call overhead is then negligible)."""
    times = []
    for call in range(warmup + repeats):
        start = time.perf_counter()
        function()
        elapsed = time.perf_counter() - start
        if call < warmup and elapsed > slow_seconds:
            return elapsed
        if call >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate (GFLOP/s) on square matrices, measured now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: a @ b, repeats, warmup=2)
    return 2 * size**3 / seconds / 1e9


def counted_flops(function: Callable[[], object]) -> int:
    """Matmul FLOPs of one call of `function`, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def wkv6_loop(r, k, v, w, u):
    """The plain per-token float32 loop (anchor): S <- diag(e^w) S + k^T v, o = r (S + u k^T v).
    r, k, w: (B, T, H, K); v: (B, T, H, V); u: (H, K). Returns o (B, T, H, V)."""
    batch, length, heads, key_dim = r.shape
    state = torch.zeros(batch, heads, key_dim, v.shape[-1])
    decay = torch.exp(w)
    outputs = []
    for t in range(length):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append((r[:, t, :, :, None] * (state + u[:, :, None] * kv)).sum(2))
        state = decay[:, t, :, :, None] * state + kv
    return torch.stack(outputs, dim=1)


def wkv6_inputs(tokens: int, requires_grad: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, tokens, HEADS, DIM)
    r, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    w = -torch.exp(torch.randn(shape, generator=generator) - 1)  # RWKV-6-like decays
    u = torch.randn(HEADS, DIM, generator=generator)
    inputs = [r, k, v, w, u]
    return [tensor.requires_grad_(requires_grad) for tensor in inputs]


def ssd_inputs(tokens: int, requires_grad: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, HEADS, DIM, generator=generator)
    dt = torch.nn.functional.softplus(torch.randn(1, tokens, HEADS, generator=generator) - 2)
    A = -torch.exp(torch.randn(HEADS, generator=generator))
    B, C = (torch.randn(1, tokens, 1, DIM, generator=generator) for _ in range(2))
    inputs = [x, dt, A, B, C]
    return [tensor.requires_grad_(requires_grad) for tensor in inputs]


def _hf_mamba2_chunk_scan():
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    # It warns on every call that mamba_ssm is absent; this benchmark knows.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return lambda x, dt, A, B, C: mamba2_chunk_scan(x, dt, A, B, C, 64)


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _timed(function, inputs, mode, repeats):
    if mode == "forward":
        with torch.no_grad():
            return median_seconds(lambda: function(*inputs), repeats)

    def forward_backward():
        for tensor in inputs:
            tensor.grad = None
        _first(function(*inputs)).sum().backward()

    return median_seconds(forward_backward, repeats)


def bench_sequence_ops(lengths, repeats: int, peak_gflops: float, modes) -> list[Row]:
    """Time WKV6 and SSD in every form at every length; the anchor comes first in each group."""
    ops = {
        "wkv6": (
            wkv6_inputs,
            [
                ("per-token loop (anchor)", wkv6_loop),
                ("wkv6_recurrent", wkv6_recurrent),
                ("wkv6_chunk", wkv6_chunk),
            ],
        ),
        "ssd": (
            ssd_inputs,
            [
                ("transformers mamba2_chunk_scan (anchor)", _hf_mamba2_chunk_scan()),
                ("ssd_recurrent", ssd_recurrent),
                ("ssd_chunk", ssd_chunk),
            ],
        ),
    }
    rows = []
    for op, (make_inputs, implementations) in ops.items():
        for tokens in lengths:
            for mode in modes:
                inputs = make_inputs(tokens, requires_grad=mode != "forward")
                anchor_seconds = None
                for name, function in implementations:
                    seconds = _timed(function, inputs, mode, repeats)
                    anchor_seconds = anchor_seconds or seconds
                    with torch.no_grad():
                        flops = counted_flops(lambda f=function, i=inputs: f(*i))
                    if mode != "forward":
                        flops = None  # FlopCounterMode's backward counts need a graph per call
                    rows.append(
                        _row(op, tokens, mode, name, seconds, anchor_seconds, flops, peak_gflops)
                    )
        rows.append(_step_row(op, make_inputs))
    return rows


def _row(op, tokens, mode, name, seconds, anchor_seconds, flops, peak_gflops):
    gflops = flops / seconds / 1e9 if flops else None
    return Row(
        op=op,
        tokens=tokens,
        mode=mode,
        implementation=name,
        milliseconds=seconds * 1e3,
        speedup_vs_anchor=anchor_seconds / seconds,
        gflops=gflops,
        share_of_matmul_peak=gflops / peak_gflops if gflops else None,
    )


def _step_row(op, make_inputs) -> Row:
    """Per-token decoding cost of the step form (independent of the prefix length)."""
    inputs = make_inputs(STEP_TOKENS, requires_grad=False)
    if op == "wkv6":
        r, k, v, w, u = inputs
        state = torch.zeros(1, HEADS, DIM, DIM)

        def decode():
            current = state
            for t in range(STEP_TOKENS):
                _, current = wkv6_step(r[:, t], k[:, t], v[:, t], w[:, t], u, current)
    else:
        x, dt, A, B, C = inputs
        state = torch.zeros(1, HEADS, DIM, DIM)

        def decode():
            current = state
            for t in range(STEP_TOKENS):
                _, current = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], current)

    with torch.no_grad():
        seconds = median_seconds(decode, repeats=3) / STEP_TOKENS
    name = f"{op}_step (per token, mean of {STEP_TOKENS})"
    return Row(op, STEP_TOKENS, "step", name, seconds * 1e3, None, None, None)


def machine_description(peak_gflops: float) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "fp32_matmul_gflops": round(peak_gflops, 1),
    }


def markdown_table(rows: list[Row]) -> str:
    header = (
        "| op | T | pass | implementation | ms | speed-up vs anchor | GFLOP/s "
        "| % of matmul peak |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        speedup = f"{row.speedup_vs_anchor:.2f}x" if row.speedup_vs_anchor else ""
        gflops = f"{row.gflops:.1f}" if row.gflops else ""
        share = f"{100 * row.share_of_matmul_peak:.0f}%" if row.share_of_matmul_peak else ""
        milliseconds = (
            f"{row.milliseconds:.3f}" if row.mode == "step" else f"{row.milliseconds:.1f}"
        )
        lines.append(
            f"| {row.op} | {row.tokens} | {row.mode} | {row.implementation} | {milliseconds} | "
            f"{speedup} | {gflops} | {share} |"
        )
    return "\n".join(lines)


def goal_lines(rows: list[Row], tokens: int) -> list[str]:
    """The issue's goals at `tokens`, forward: wkv6_chunk >= 8x the loop; ssd_chunk >= 1x HF."""
    found = {
        (row.op, row.implementation): row
        for row in rows
        if row.tokens == tokens and row.mode == "forward"
    }
    lines = []
    for op, name, goal in (("wkv6", "wkv6_chunk", 8.0), ("ssd", "ssd_chunk", 1.0)):
        row = found.get((op, name))
        if row is not None:
            verdict = "met" if row.speedup_vs_anchor >= goal else "NOT met"
            lines.append(
                f"{name} vs anchor at T={tokens}, forward: {row.speedup_vs_anchor:.2f}x "
                f"(goal >= {goal:g}x: {verdict})"
            )
    return lines


def run(lengths=(2048, 8192), repeats: int = 3, modes=("forward", "forward+backward")) -> dict:
    """Measure everything once; returns {"machine", "rows", "goals"}."""
    peak = matmul_gflops()
    rows = bench_sequence_ops(lengths, repeats, peak, modes)
    return {
        "machine": machine_description(peak),
        "shape": {"batch": 1, "heads": HEADS, "dim": DIM, "dtype": "float32"},
        "rows": [asdict(row) for row in rows],
        "goals": goal_lines(rows, max(lengths)),
        "table": markdown_table(rows),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lengths",
        default="2048,8192",
        help="comma-separated sequence lengths T (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def main_from_arguments(arguments: argparse.Namespace) -> int:
    try:
        lengths = tuple(int(part) for part in arguments.lengths.split(","))
    except ValueError:
        message = f"--lengths must be comma-separated integers, got {arguments.lengths!r}"
        raise ValueError(message) from None
    if any(length < 1 for length in lengths) or arguments.repeats < 1:
        raise ValueError("--lengths entries and --repeats must be >= 1")
    modes = ("forward",) if arguments.forward_only else ("forward", "forward+backward")
    result = run(lengths, arguments.repeats, modes)
    machine = result["machine"]
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), fp32 matmul {machine['fp32_matmul_gflops']} GFLOP/s"
    )
    print(f"B=1, H={HEADS}, K=V=P=N={DIM}, fp32; step rows are per token\n")
    print(result["table"])
    print()
    for line in result["goals"]:
        print(line)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linvid.bench.ops", description=__doc__)
    add_arguments(parser)
    return main_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
