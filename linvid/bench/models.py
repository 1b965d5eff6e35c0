"""Time to first token, decode throughput, peak memory and cache size of the teacher and its
students against the input length, at a benchmark size built from a config (random weights).

`linvid bench models` (or `python -m linvid.bench.models`) builds a Qwen2.5-VL teacher
(default: hidden 512, 8 layers, 8 heads, 2 KV heads) and converts it with every preset, with
and without TransV (paper 002's schedule) and per-frame ToMe (16 tokens per frame); feeds each
a video of random pixel patches of the requested length and a short question; and measures,
with the papers' protocols:
  - TTFT (paper 003 §4.2): seconds to the first generated token without the vision encoder
    (from generate() called with the encoded video, the paper's figure) and with it (from
    pixel patches: the vision tower, and the ToMe merge when used, then that generate());
  - decode throughput (paper 000 §5.4): (N - 1) / (t_N - t_1) over N greedy tokens after the
    prefill, t_i the time token i is emitted by `generate()` (the model's real cache path);
  - peak memory of the measurement (resident set on CPU, the kernel's high-water mark reset
    before each input size; max allocated on CUDA);
  - cache bytes after the prefill (keys/values of attention layers, states of linear ones).
Each (model, variant) runs in a fresh process, input sizes in ascending order. A "frame" is
one temporal patch of Qwen2.5-VL (two video frames); its tokens are the LLM tokens after the
2x2 spatial merge (64 by default: a 224x224 frame). Writes results.json, results.md and
ttft.png, decode.png, memory.png into --out. `--device cuda` runs the same protocol on a GPU
with linvid's torch ops (linvid has no fla / mamba_ssm backends yet; the report says which
kernels ran); without a GPU it stops with an error saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from linvid.models.plan import PRESETS

MODELS = ("teacher", *PRESETS)
VARIANTS = ("base", "tome", "transv", "tome+transv")
DEFAULT_VARIANTS = ("base", "tome", "transv")
QUESTION = "describe the video ."
TOME_TOKENS_PER_FRAME = 16  # paper 002 §4
WARMUP_FRAMES = 4


@dataclass(frozen=True)
class BenchSize:
    """The benchmark model's size (the teacher's; students keep its widths)."""

    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int = 1536
    vocab_size: int = 4096
    vision_hidden_size: int = 128

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"benchmark size {name} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) "
                f"and num_heads by num_key_value_heads ({self.num_key_value_heads})"
            )
        if (self.hidden_size // self.num_heads) % 8:
            raise ValueError(
                f"head_dim = hidden_size / num_heads must be a multiple of 8 (M-RoPE sections), "
                f"got {self.hidden_size // self.num_heads}"
            )


def bench_tokenizer():
    from linvid.models.tokenizer import build_word_tokenizer

    return build_word_tokenizer([QUESTION])


def bench_config(size: BenchSize):
    """A Qwen2.5-VL config of `size` whose special ids match `bench_tokenizer()`."""
    from linvid.models.tiny import tiny_qwen2_5_vl_config
    from linvid.models.tokenizer import token_ids

    ids = token_ids(bench_tokenizer())
    if size.vocab_size < ids["vocab_size"]:
        raise ValueError(f"vocab_size must be >= {ids['vocab_size']} (the tokenizer's)")
    ids["vocab_size"] = size.vocab_size
    return tiny_qwen2_5_vl_config(
        num_layers=size.num_layers,
        hidden_size=size.hidden_size,
        num_heads=size.num_heads,
        num_key_value_heads=size.num_key_value_heads,
        intermediate_size=size.intermediate_size,
        vision_hidden_size=size.vision_hidden_size,
        token_ids=ids,
    )


def build_model(name: str, variant: str, config, seed: int = 0):
    """The teacher (random weights from `seed`) or its conversion with preset `name`, with the
    variant's TransV (paper 002's schedule for this depth). Raises ValueError for combinations
    the library refuses (e.g. TransV before M-MATE layers)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from linvid.models.convert import convert
    from linvid.models.transv import apply_transv

    check_choice("model", name, MODELS)
    check_choice("variant", variant, VARIANTS)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    if name != "teacher":
        model = convert(model, name, in_place=True).eval()
    if "transv" in variant:
        apply_transv(model, "paper")
    return model


def check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


def frame_grid(tokens_per_frame: int) -> tuple[int, int]:
    """(h, w) LLM-token grid of a frame holding `tokens_per_frame` tokens, as square as the
    count allows (h <= w)."""
    if tokens_per_frame < 1:
        raise ValueError(f"tokens per frame must be >= 1, got {tokens_per_frame}")
    h = int(tokens_per_frame**0.5)
    while tokens_per_frame % h:
        h -= 1
    return h, tokens_per_frame // h


def video_patches(config, frames: int, tokens_per_frame: int, seed: int = 0):
    """Random pixel patches of a video of `frames` temporal patches: (pixel_values_videos
    (frames * 4 * tokens_per_frame, C * 2 * 14 * 14), video_grid_thw (1, 3))."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    h, w = frame_grid(tokens_per_frame)
    grid = torch.tensor([[frames, h * merge, w * merge]])
    channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(frames * h * w * merge * merge, channels, generator=generator)
    return pixels, grid


class TokenClock:
    """A generate() streamer that records when each generated token is emitted (perf_counter
    seconds); the first put() is the prompt and is not a token."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def cache_bytes(cache) -> dict[str, int]:
    """Bytes of a generate() cache: {"attention_kv", "linear_states", "total"}."""
    if hasattr(cache, "state_bytes"):
        parts = dict(cache.state_bytes())
    else:
        kv = 0
        for layer in cache.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    kv += tensor.numel() * tensor.element_size()
        parts = {"linear_states": 0, "attention_kv": kv}
    parts["total"] = parts["linear_states"] + parts["attention_kv"]
    return parts


class PeakMemory:
    """Peak memory of a region: the process's resident high-water mark (VmHWM, reset through
    /proc/self/clear_refs) on CPU, torch's max allocated bytes on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass  # the peak then covers the whole process so far (sizes run in ascending order)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_inputs(
    model, tokenizer, pixels, grid, variant: str, tome_tokens_per_frame: int = TOME_TOKENS_PER_FRAME
) -> dict:
    """generate() inputs for one video question, the video encoded here: the vision tower's
    features (and the ToMe merge for "tome" variants) as `mm_encoder_outputs`, which is what
    generate() itself computes before its prefill."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from linvid.eval.prompts import render_video_prompt, video_messages
    from linvid.models.frame_tome import compressed_video_inputs
    from linvid.models.qwen_video import FRAME_LIST_FPS

    device = model.device
    pixels = pixels.to(device, model.dtype)
    if "tome" in variant:
        inputs, _ = compressed_video_inputs(
            model, tokenizer, pixels, grid, QUESTION, tokens_per_frame=tome_tokens_per_frame
        )
        return inputs
    config = model.config
    merge = config.vision_config.spatial_merge_size
    t, h, w = grid[0].tolist()
    ids = render_video_prompt(tokenizer, video_messages(QUESTION), t * (h // merge) * (w // merge))
    input_ids = torch.tensor([ids], device=device)
    features = model.get_video_features(pixels, grid.to(device), return_dict=True)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "video_grid_thw": grid.to(device),
        # Synthetic frames have no source timing: qwen-vl-utils' rate for a frame list.
        "second_per_grid_ts": torch.tensor(
            [config.vision_config.temporal_patch_size / FRAME_LIST_FPS], device=device
        ),
        "mm_token_type_ids": (input_ids == config.video_token_id).int() * 2,
        "mm_encoder_outputs": {
            "video": BaseModelOutputWithPooling(pooler_output=tuple(features.pooler_output))
        },
    }


def _generate(model, inputs, tokenizer, new_tokens: int, clock: TokenClock):
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=clock,
    )


class PrefillCache:
    """A forward hook that keeps the cache bytes after the first forward call (the prefill)."""

    def __init__(self, model):
        self.bytes: dict[str, int] | None = None
        self._handle = model.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        from linvid.models.cache import output_cache

        if self.bytes is None and output_cache(output) is not None:
            self.bytes = cache_bytes(output_cache(output))

    def remove(self) -> None:
        self._handle.remove()


def measure_point(model, tokenizer, config, variant, frames, tokens_per_frame, decode_tokens,
                  device, memory: PeakMemory,
                  tome_tokens_per_frame: int = TOME_TOKENS_PER_FRAME) -> dict:  # fmt: skip
    """One input size, one run: encode the video (timed: the vision part of TTFT), then
    generate() N tokens from the encoded video, recording when each token is emitted and the
    cache bytes after the prefill. "tome" variants merge each frame to tome_tokens_per_frame."""
    pixels, grid = video_patches(config, frames, tokens_per_frame)
    memory.reset()
    clock = TokenClock()
    prefill = PrefillCache(model)
    try:
        with torch.no_grad():
            _synchronize(device)
            started = time.perf_counter()
            inputs = prepare_inputs(model, tokenizer, pixels, grid, variant, tome_tokens_per_frame)
            _synchronize(device)
            encoded = time.perf_counter()
            _generate(model, inputs, tokenizer, decode_tokens, clock)
    finally:
        prefill.remove()
    peak = memory.peak()
    if len(clock.times) != decode_tokens:
        raise RuntimeError(f"generate() emitted {len(clock.times)} tokens, not {decode_tokens}")
    token_times = [moment - encoded for moment in clock.times]
    return {
        "frames": frames,
        "tokens_per_frame": tokens_per_frame,
        "video_tokens": frames * tokens_per_frame,
        "llm_tokens": inputs["input_ids"].shape[1],
        "vision_seconds": encoded - started,
        "ttft_seconds": token_times[0],
        "ttft_vision_seconds": clock.times[0] - started,
        "decode_tokens": decode_tokens,
        "token_times": token_times,
        "decode_tokens_per_second": (decode_tokens - 1) / (token_times[-1] - token_times[0]),
        "cache_bytes": prefill.bytes["total"],
        "cache_attention_kv_bytes": prefill.bytes["attention_kv"],
        "cache_linear_state_bytes": prefill.bytes["linear_states"],
        "peak_memory_bytes": peak,
        "memory_kind": memory.kind,
    }


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device cuda: no CUDA device is available here (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'}); run with --device cpu"
            )
        return torch.device("cuda")
    raise ValueError(f"unknown device {name!r}; expected cpu or cuda")


def run_model(spec: dict, emit=None) -> list[dict]:
    """Measure one (model, variant) at every size of `spec` (ascending), in this process.

    spec: {"model", "variant", "size": BenchSize fields, "points": [[frames, tokens_per_frame],
    ...], "decode_tokens", "device", "threads"}. Returns one row per point; `emit(row)` is
    called as each finishes. A refused combination gives rows with status "skipped"."""
    device = resolve_device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    base = {
        "model": spec["model"],
        "variant": spec["variant"],
        "threads": torch.get_num_threads(),
        "malloc_environment": {
            key: os.environ[key] for key in KEEP_FREED_MEMORY if key in os.environ
        },
    }
    config = bench_config(BenchSize(**spec["size"]))
    tokenizer = bench_tokenizer()
    try:
        model = build_model(spec["model"], spec["variant"], config).to(device)
    except ValueError as error:
        rows = [
            {**base, "status": "skipped", "reason": str(error), "frames": frames,
             "tokens_per_frame": per_frame, "video_tokens": frames * per_frame}
            for frames, per_frame in spec["points"]
        ]  # fmt: skip
        for row in rows:
            if emit:
                emit(row)
        return rows
    memory = PeakMemory(device)
    # Warm-up: first-call costs (allocator, lazy kernels) stay out of the first size.
    first_per_frame = spec["points"][0][1]
    measure_point(model, tokenizer, config, spec["variant"], WARMUP_FRAMES, first_per_frame, 2,
                  device, memory)  # fmt: skip
    rows = []
    for frames, per_frame in spec["points"]:
        row = {**base, "status": "ok"}
        row.update(
            measure_point(
                model,
                tokenizer,
                config,
                spec["variant"],
                frames,
                per_frame,
                spec["decode_tokens"],
                device,
                memory,
            )  # fmt: skip
        )
        rows.append(row)
        if emit:
            emit(row)
    return rows


# glibc malloc serves allocations above 32 MiB with fresh mmap()s and returns them on free, so
# every large activation of a long prefill is page-faulted (and zeroed) again: at 16K tokens
# that doubled the prefill time of every model here. Workers keep freed memory for reuse.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def run_model_process(spec: dict, log=None, *, keep_freed_memory: bool = True) -> list[dict]:
    """`run_model` in a fresh Python process (its memory its own); rows as they come.
    keep_freed_memory: run it with KEEP_FREED_MEMORY in its environment."""
    command = [sys.executable, "-m", "linvid.bench.models", "--worker", json.dumps(spec)]
    environment = {**os.environ, **(KEEP_FREED_MEMORY if keep_freed_memory else {})}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    rows = []
    for line in process.stdout:
        if line.startswith("{"):
            rows.append(json.loads(line))
            if log:
                log(rows[-1])
    errors = process.stderr.read()
    if process.wait() != 0:
        raise RuntimeError(
            f"benchmark of {spec['model']} ({spec['variant']}) failed: {errors.strip()[-3000:]}"
        )
    return rows


def parse_counts(text: str, what: str) -> list[int]:
    """ "a,b,c" or "lo:hi" (lo, 2 lo, 4 lo, ... up to hi) as a sorted list of ints >= 1."""
    try:
        if ":" in text:
            low, high = (int(part) for part in text.split(":"))
            if low < 1 or high < low:
                raise ValueError
            counts = []
            while low <= high:
                counts.append(low)
                low *= 2
        else:
            counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"{what} must be comma-separated integers or lo:hi (doubling from lo), got {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise ValueError(f"{what} entries must be >= 1, got {text!r}")
    return sorted(set(counts))


def input_points(tokens=None, frames=None, tokens_per_frame: int = 64) -> list[list[int]]:
    """[[frames, tokens_per_frame], ...] from input sizes in tokens (each a multiple of
    tokens_per_frame) or in frames."""
    if (tokens is None) == (frames is None):
        raise ValueError("give the input sizes either in tokens or in frames")
    if frames is None:
        bad = [count for count in tokens if count % tokens_per_frame]
        if bad:
            raise ValueError(
                f"input sizes in tokens must be multiples of --tokens-per-frame "
                f"({tokens_per_frame}), got {bad}"
            )
        frames = [count // tokens_per_frame for count in tokens]
    if any(count < 1 for count in frames):
        raise ValueError("every input must hold at least one frame")
    return [[count, tokens_per_frame] for count in frames]


def run(models, variants, points, *, decode_tokens: int = 64, size: BenchSize = BenchSize(),
        device: str = "cpu", isolate: bool = True, threads: int | None = None, log=None,
        keep_freed_memory: bool = True) -> dict:  # fmt: skip
    """Measure every (model, variant) at every point; returns the report (see the module
    docstring). isolate: each (model, variant) in a fresh process (False: in this one, for
    quick checks; peak memory is then reset per point but shares the process);
    keep_freed_memory: those processes keep freed memory for reuse (KEEP_FREED_MEMORY)."""
    from linvid.bench.ops import machine_description, matmul_gflops

    for name in models:
        check_choice("model", name, MODELS)
    for variant in variants:
        check_choice("variant", variant, VARIANTS)
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 2:
        raise ValueError(f"decode tokens must be an int >= 2, got {decode_tokens!r}")
    resolve_device(device)
    rows = []
    started = time.perf_counter()
    for name in models:
        for variant in variants:
            spec = {
                "model": name,
                "variant": variant,
                "size": asdict(size),
                "points": points,
                "decode_tokens": decode_tokens,
                "device": device,
                "threads": threads,
            }
            if isolate:
                rows.extend(run_model_process(spec, log, keep_freed_memory=keep_freed_memory))
            else:
                rows.extend(run_model(spec, log))
    machine = machine_description(matmul_gflops())
    machine["device"] = device
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    machine["sequence_kernels"] = sequence_kernels()
    report = {
        "machine": machine,
        "size": asdict(size),
        "protocol": {
            "decode_tokens": decode_tokens,
            "decode_throughput": "(N - 1) / (t_N - t_1), t_i: time token i is emitted",
            "ttft": "seconds to the first token; ttft_seconds from generate() with the encoded "
            "video (without the vision encoder), ttft_vision_seconds from pixel patches "
            "(vision_seconds + ttft_seconds, one run)",
            "memory": "peak RSS per input size (CPU) or max allocated (CUDA)",
            "cache": "bytes of the generate() cache after the prefill",
            "frame": "one temporal patch (2 video frames); tokens per frame after the 2x2 merge",
            "tome_tokens_per_frame": TOME_TOKENS_PER_FRAME,
            "transv": "paper 002 schedule (uniform p=0.5 shallow, attention p=0.9 deep)",
            "isolated_processes": isolate,
            "threads": threads,
            "malloc_environment": KEEP_FREED_MEMORY if isolate and keep_freed_memory else {},
        },
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    report["goals"] = goal_lines(rows)
    report["table"] = markdown_table(rows)
    return report


def sequence_kernels() -> str:
    """What computes the linear mixers' scans: linvid's torch ops on every device; the optional
    GPU packages are reported when installed, since linvid does not call them yet."""
    import importlib.util

    found = [name for name in ("fla", "mamba_ssm") if importlib.util.find_spec(name)]
    note = f"; installed but not used by linvid: {', '.join(found)}" if found else ""
    return f"linvid torch ops (wkv6_chunk, ssd_chunk, window_attention_3d){note}"


def _index(rows) -> dict:
    return {
        (row["model"], row["variant"], row["video_tokens"]): row
        for row in rows
        if row["status"] == "ok"
    }


def markdown_table(rows) -> str:
    """One line per measured point; ratios against the teacher of the same variant and size."""
    found = _index(rows)
    lines = [
        "| model | variant | frames | video tokens | LLM tokens | TTFT (s) | TTFT w/ vision (s) "
        "| decode tok/s | decode vs teacher | TTFT vs teacher | cache (MiB) | peak mem (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            continue
        teacher = found.get(("teacher", row["variant"], row["video_tokens"]))
        speed = ttft = ""
        if teacher is not None:
            speed = f"{row['decode_tokens_per_second'] / teacher['decode_tokens_per_second']:.2f}x"
            ttft = f"{teacher['ttft_seconds'] / row['ttft_seconds']:.2f}x"
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['frames']} | {row['video_tokens']} | "
            f"{row['llm_tokens']} | {row['ttft_seconds']:.3f} | {row['ttft_vision_seconds']:.3f} "
            f"| {row['decode_tokens_per_second']:.1f} | {speed} | {ttft} | "
            f"{row['cache_bytes'] / 2**20:.2f} | {row['peak_memory_bytes'] / 2**20:.0f} |"
        )
    skipped = {
        (row["model"], row["variant"]): row["reason"] for row in rows if row["status"] != "ok"
    }
    for (name, variant), reason in skipped.items():
        lines.append(f"\nskipped {name} ({variant}): {reason}")
    return "\n".join(lines)


def _ratio_line(found, student, tokens, what, goal):
    teacher = found.get(("teacher", "base", tokens))
    row = found.get((student, "base", tokens))
    if teacher is None or row is None:
        return None
    if what == "decode":
        value = row["decode_tokens_per_second"] / teacher["decode_tokens_per_second"]
        text = f"{student} decode throughput / teacher's at {tokens} video tokens"
    else:
        value = teacher["ttft_seconds"] / row["ttft_seconds"]
        text = f"teacher TTFT / {student}'s (without vision) at {tokens} video tokens"
    verdict = "met" if value >= goal else "NOT met"
    return f"{text}: {value:.2f}x (goal >= {goal:g}x: {verdict})"


def goal_lines(rows) -> list[str]:
    """The issue's goals, at the sizes it names when measured (else the nearest below)."""
    found = _index(rows)
    sizes = sorted({key[2] for key in found})
    if not sizes:
        return []

    def at_most(target):
        below = [size for size in sizes if size <= target]
        return below[-1] if below else sizes[0]

    lines = [
        _ratio_line(found, "linmu", at_most(16384), "decode", 8.0),
        _ratio_line(found, "linmu", at_most(16384), "ttft", 2.5),
        _ratio_line(found, "qwen-rwkv-vl-25", at_most(8192), "decode", 1.25),
    ]
    for name in ("linmu", "rwkv6-all"):
        for variant in sorted({key[1] for key in found if key[0] == name}):
            caches = [found[(name, variant, size)]["cache_bytes"] for size in sizes
                      if (name, variant, size) in found]  # fmt: skip
            if len(caches) > 1:
                verdict = "constant: met" if len(set(caches)) == 1 else "NOT constant"
                lines.append(
                    f"{name} ({variant}) cache bytes over {len(caches)} input sizes: "
                    f"{min(caches)}..{max(caches)} ({verdict})"
                )
    return [line for line in lines if line]


def plot(report: dict, out_dir: Path) -> list[Path]:
    """ttft.png, decode.png, memory.png: every model's base variant (and the teacher's and
    students' compressed variants dashed) on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report["rows"] if row["status"] == "ok"]
    series = {}
    for row in rows:
        series.setdefault((row["model"], row["variant"]), []).append(row)
    colours = {name: f"C{index}" for index, name in enumerate(MODELS)}
    styles = {"base": "-", "tome": "--", "transv": ":", "tome+transv": "-."}
    figures = {
        "ttft.png": ("video tokens", "TTFT without vision encoder (s)", "video_tokens",
                     lambda row: row["ttft_seconds"], "log"),
        "decode.png": ("video tokens", "decode throughput (tokens/s)", "video_tokens",
                       lambda row: row["decode_tokens_per_second"], "log"),
        "memory.png": ("frames", "peak memory (MiB)", "frames",
                       lambda row: row["peak_memory_bytes"] / 2**20, "linear"),
    }  # fmt: skip
    machine = report["machine"]
    subtitle = (
        f"{report['size']['num_layers']} layers, hidden {report['size']['hidden_size']}; "
        f"{machine['device']}, {machine['cores']} cores, torch {machine['torch']}"
    )
    written = []
    for filename, (xlabel, ylabel, key, value, yscale) in figures.items():
        figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=90)
        for (name, variant), points in series.items():
            points = sorted(points, key=lambda row: row[key])
            axis.plot(
                [row[key] for row in points],
                [value(row) for row in points],
                styles[variant],
                color=colours[name],
                marker="o",
                markersize=3,
                label=f"{name}" if variant == "base" else f"{name} ({variant})",
            )
        axis.set_xscale("log", base=2)
        axis.set_yscale(yscale)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(subtitle, fontsize=8)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=6, ncol=2)
        figure.tight_layout()
        path = out_dir / filename
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated: {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated: {', '.join(VARIANTS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--tokens",
        default="1024:16384",
        help="video tokens per input: a,b,c or lo:hi doubling (default: %(default)s)",
    )
    parser.add_argument("--frames", help="input sizes in frames instead (a,b,c or lo:hi)")
    parser.add_argument("--tokens-per-frame", type=int, default=64, help="LLM tokens per frame")
    parser.add_argument(
        "--decode-tokens", type=int, default=64, help="N generated tokens (paper 000: 1000)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--hidden-size", type=int, default=BenchSize.hidden_size)
    parser.add_argument("--layers", type=int, default=BenchSize.num_layers)
    parser.add_argument("--heads", type=int, default=BenchSize.num_heads)
    parser.add_argument("--kv-heads", type=int, default=BenchSize.num_key_value_heads)
    parser.add_argument("--intermediate-size", type=int, default=BenchSize.intermediate_size)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per measured process (default 1: on a shared machine OpenMP "
        "barriers of several threads under contention make step times swing several-fold)",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="no fresh process per model (quick checks)"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="run the measured processes with glibc's default malloc settings (by default "
        "they keep freed memory: large activations are not page-faulted again each layer)",
    )
    parser.add_argument("--out", required=True, help="directory for results.json/.md and plots")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def _names(text: str, what: str, choices) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(f"--{what} needs at least one name from {', '.join(choices)}")
    for name in names:
        check_choice(what.rstrip("s"), name, choices)
    return names


def _progress(row: dict) -> None:
    if row["status"] != "ok":
        print(f"  {row['model']} ({row['variant']}): skipped: {row['reason']}", file=sys.stderr)
        return
    print(
        f"  {row['model']} ({row['variant']}) {row['video_tokens']} tokens: "
        f"TTFT {row['ttft_seconds']:.2f}s (+vision {row['ttft_vision_seconds']:.2f}s), "
        f"{row['decode_tokens_per_second']:.1f} tok/s, cache {row['cache_bytes'] / 2**20:.1f} MiB",
        file=sys.stderr,
        flush=True,
    )


def main_from_arguments(arguments: argparse.Namespace) -> int:
    models = _names(arguments.models, "models", MODELS)
    variants = _names(arguments.variants, "variants", VARIANTS)
    if arguments.frames:
        points = input_points(
            frames=parse_counts(arguments.frames, "--frames"),
            tokens_per_frame=arguments.tokens_per_frame,
        )
    else:
        points = input_points(
            tokens=parse_counts(arguments.tokens, "--tokens"),
            tokens_per_frame=arguments.tokens_per_frame,
        )
    size = BenchSize(
        hidden_size=arguments.hidden_size,
        num_layers=arguments.layers,
        num_heads=arguments.heads,
        num_key_value_heads=arguments.kv_heads,
        intermediate_size=arguments.intermediate_size,
    )
    if arguments.threads is not None and arguments.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {arguments.threads}")
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(
        models,
        variants,
        points,
        decode_tokens=arguments.decode_tokens,
        size=size,
        device=arguments.device,
        isolate=not arguments.in_process,
        threads=arguments.threads,
        log=_progress,
        keep_freed_memory=not arguments.default_malloc,
    )
    (out / "results.json").write_text(json.dumps(report, indent=1))
    text = report["table"] + "\n\n" + "\n".join(f"- {line}" for line in report["goals"]) + "\n"
    (out / "results.md").write_text(text)
    plot(report, out)
    machine = report["machine"]
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), device {machine['device']}; "
        f"N = {arguments.decode_tokens} decode tokens\n"
    )
    print(text)
    print(f"results and plots in {out}")
    return 0


def _worker(spec_text: str) -> int:
    spec = json.loads(spec_text)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    run_model(spec, emit=lambda row: print(json.dumps(row), flush=True))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    parser = argparse.ArgumentParser(prog="python -m linvid.bench.models", description=__doc__)
    add_arguments(parser)
    return main_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
