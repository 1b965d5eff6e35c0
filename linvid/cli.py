"""The `linvid` console script. Each command is a subparser whose work lives in the module
that owns it (bench/, distill/, eval/ ...); this file only wires arguments to them and turns
user errors into one line with a hint instead of a traceback."""

from __future__ import annotations

import argparse
import sys

from linvid import __version__

# What a Ctrl-C leaves, per command (the output rule: linvid/outputs.py).
INTERRUPT_HINTS = {
    "convert": "Nothing was written; the --out directory is as it was.",
    "ask": "",
    "distill": "Finished checkpoints are kept; rerun the same command with --resume to go on.",
    "demo": "Finished steps are kept; rerun the same command to go on from them.",
    "niah": "The --out directory is as it was; rerun the command.",
    "scenes": "",
    "bench": "",
    "eval": "Models finished are kept in --out/results; rerun the same command to go on.",
}


def add_module_command(commands, name: str, module, summary: str) -> None:
    """A subcommand whose work lives in `module`: its docstring is the description, its
    add_arguments(parser) and main_from_arguments(arguments) the arguments and the run."""
    command = commands.add_parser(
        name,
        help=summary,
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(command)
    command.set_defaults(run=module.main_from_arguments)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linvid",
        description="Convert Transformer video LLMs into linear-time students, distill them, "
        "and run, benchmark and evaluate them on long videos.",
    )
    parser.add_argument("--version", action="version", version=f"linvid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser("bench", help="efficiency measurements")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    from linvid.bench import memory, models, ops, video_io

    for name, module, summary in (
        ("ops", ops, "time the sequence ops (WKV6, SSD) against same-run anchors"),
        ("video-io", video_io, "peak memory of loading a long video against its sampled frames"),
        ("memory", memory, "peak memory of `linvid ask` against the number of frames"),
        ("models", models, "TTFT, decode throughput, memory and cache of teacher and students"),
    ):
        add_module_command(bench_commands, name, module, summary)

    from linvid.demo import command as demo_command

    summary = "the whole job on generated data: teacher, four students, report"
    add_module_command(commands, "demo", demo_command, summary)

    niah = commands.add_parser("niah", help="needle-in-a-video-haystack data (VNBench-style)")
    niah_commands = niah.add_subparsers(dest="niah_command", metavar="WHAT")
    from linvid.niah import dataset as niah_dataset

    add_module_command(
        niah_commands,
        "generate",
        niah_dataset,
        "write needle videos, vnbench.jsonl and conversations.jsonl",
    )

    evaluation = commands.add_parser("eval", help="real benchmarks through lmms-eval")
    evaluation_commands = evaluation.add_subparsers(dest="eval_command", metavar="WHAT")
    from linvid.eval import compare

    add_module_command(
        evaluation_commands, "run", compare, "several models on the same tasks: one table"
    )
    tasks = evaluation_commands.add_parser(
        "tasks",
        help="write the linvid_niah / vnbench task files for lmms-eval's --include_path",
        description=compare.tasks_from_arguments.__doc__ or None,
    )
    compare.tasks_arguments(tasks)
    tasks.set_defaults(run=compare.tasks_from_arguments)

    scenes = commands.add_parser(
        "scenes",
        help="find a video's scene cuts and draw them on a contact sheet",
        description="Sample a video, compare adjacent frames by their downsampled pixels and "
        "cut it with scene_boundaries (paper 000 eq. 8-9). Inside a model the cut uses the "
        "vision tower's frame tokens; pixels let you see the cuts and tune tau beforehand.",
    )
    scenes.add_argument("video", help="video file")
    scenes.add_argument("--out", help="PNG contact sheet to write (thumbnails + similarity)")
    scenes.add_argument("--fps", type=float, default=1.0, help="frames sampled per second")
    scenes.add_argument("--max-frames", type=int, default=256, help="cap on sampled frames")
    scenes.add_argument("--tau", type=float, default=0.6, help="cut where similarity < tau")
    scenes.add_argument("--max-scenes", type=int, default=16, help="at most this many scenes")
    scenes.add_argument("--thumb-size", type=int, default=96, help="thumbnail long side (px)")
    scenes.add_argument("--start", type=float, help="first second to sample")
    scenes.add_argument("--end", type=float, help="sample before this second")
    scenes.add_argument("--json", action="store_true", help="print the cuts as JSON")
    scenes.set_defaults(run=run_scenes)

    convert = commands.add_parser(
        "convert",
        help="convert a local Transformer checkpoint into a linear or hybrid student",
        description="Replace a checkpoint's planned decoder layers by linear-time mixers "
        "initialised from its attention weights and save the student (safetensors).",
    )
    convert.add_argument("--model", required=True, help="local checkpoint directory (teacher)")
    convert.add_argument(
        "--recipe",
        "--plan",
        dest="plan",
        required=True,
        help="preset: qwen-rwkv-vl-25, qwen-rwkv-vl-50, mamba2-hybrid-25, linmu, rwkv6-all",
    )
    convert.add_argument(
        "--layers", help="override: comma-separated decoder layer indices, e.g. 0,2,5"
    )
    convert.add_argument(
        "--fraction", type=float, help="override: fraction of layers to replace (not with --layers)"
    )
    convert.add_argument("--placement", choices=("early", "middle", "late"), help="override")
    convert.add_argument(
        "--init",
        choices=("transfer", "random"),
        help="override; random draws the sequence mixer anew (for the hybrid RWKV preset the "
        "RWKV-6 branch only, the scene cross-attention still transfers; paper 000 Table 4)",
    )
    convert.add_argument(
        "--gate",
        choices=("dynamic", "static"),
        help="override: the hybrid RWKV cross-attention gate; static = one scalar (paper 000 "
        "Table 4 ablation)",
    )
    convert.add_argument(
        "--branches",
        choices=("both", "flex", "swin"),
        help="override: the M-MATE branches; flex or swin alone (paper 003 Table 4 ablations)",
    )
    convert.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the parameters drawn rather than copied (default 0: converting twice "
        "gives the same student)",
    )
    convert.add_argument("--out", required=True, help="output directory for the student")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (never the input)"
    )
    convert.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="dtype of the student's weights; auto (default) keeps the teacher's saved dtype",
    )
    convert.add_argument(
        "--max-shard-size",
        default="5GB",
        help="write the student in safetensors shards of at most this size, with an index "
        "(default 5GB, as released checkpoints; e.g. 500MB)",
    )
    convert.set_defaults(run=run_convert)

    ask = commands.add_parser(
        "ask",
        help="answer a question about a video with a local model (teacher or student)",
        description="Sample a video, answer a question about it. Students whose every layer "
        "is a causal linear mixer prefill the video chunk by chunk with a fixed-size state.",
    )
    ask.add_argument("video", help="video file")
    ask.add_argument("question", help="the question")
    ask.add_argument("--model", required=True, help="local model directory (with tokenizer)")
    ask.add_argument("--fps", type=float, default=1.0, help="frames sampled per second")
    ask.add_argument(
        "--sampling",
        choices=("qwen", "timestamps"),
        default="qwen",
        help="qwen: qwen-vl-utils' frames and sizes, what Qwen2.5-VL was trained with "
        "(default); timestamps: linvid's nearest frame to each planned time",
    )
    ask.add_argument("--num-frames", type=int, help="sample exactly this many frames instead")
    from linvid.video.qwen_sampling import FPS_MAX_FRAMES

    ask.add_argument(
        "--max-frames",
        type=int,
        default=FPS_MAX_FRAMES,
        help=f"cap on sampled frames, with --fps or --num-frames (default {FPS_MAX_FRAMES}, "
        "Qwen2.5-VL's)",
    )
    ask.add_argument("--max-pixels", type=int, default=768 * 28 * 28, help="per frame")
    ask.add_argument("--min-pixels", type=int, default=128 * 28 * 28, help="per frame")
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument(
        "--style",
        choices=("auto", "standard", "sandwich"),
        default="auto",
        help="prompt layout; auto: sandwich for all-RWKV students (paper 001)",
    )
    ask.add_argument(
        "--stream",
        choices=("auto", "on", "off"),
        default="auto",
        help="chunked prefill (auto: when the model can)",
    )
    ask.add_argument("--chunk-frames", type=int, default=32, help="frames per streamed chunk")
    ask.add_argument(
        "--tokens-per-frame",
        type=int,
        help="merge each frame's vision tokens to this many (ToMe, paper 002: 16)",
    )
    ask.add_argument("--json", action="store_true", help="print answer, timings and counts")
    ask.set_defaults(run=run_ask)

    distill = commands.add_parser(
        "distill",
        help="distill a student from its teacher through a recipe's stages",
        description="Run a distillation recipe (YAML file or shipped name) stage by stage on "
        "accelerate: `accelerate launch -m linvid.cli distill ...` for several processes.",
    )
    distill.add_argument("--recipe", required=True, help="recipe YAML file or shipped name")
    distill.add_argument("--teacher", required=True, help="teacher model directory")
    student = distill.add_mutually_exclusive_group()
    student.add_argument("--student", help="student directory (a saved linvid model)")
    student.add_argument("--plan", help="conversion preset to build the student from the teacher")
    distill.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="[NAME=]FILE",
        help="LLaVA-Video-style conversations JSONL: FILE for every stage, NAME=FILE for the "
        "stages whose recipe 'data' is NAME (repeatable; named files win over the default)",
    )
    distill.add_argument("--out", required=True, help="run directory")
    distill.add_argument(
        "--feature-cache",
        metavar="DIR",
        help="where to keep the frozen vision tower's outputs (default RUN_DIR/vision_features; "
        "one folder can serve every student of a teacher)",
    )
    distill.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="always run the vision tower on decoded frames",
    )
    distill.add_argument(
        "--resume",
        action="store_true",
        help="go on from the newest checkpoint of --out that reads back whole (a run stopped "
        "before its first checkpoint starts over)",
    )
    distill.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds an earlier run: its checkpoints and logs are "
        "dropped when the new run starts, its student/ is replaced once the new one is saved "
        "whole (never when --out is or holds the --teacher/--student)",
    )
    distill.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps")
    distill.add_argument("--keep-checkpoints", type=int, default=2, help="newest kept")
    distill.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    distill.add_argument("--seed", type=int, default=0)
    # Video sampling: each flag overrides the recipe stages' own field (fps, max_frames, ...).
    sampling = distill.add_mutually_exclusive_group()
    sampling.add_argument(
        "--num-frames", type=int, help="frames per video (default: the recipe's fps, else 1 fps)"
    )
    sampling.add_argument("--fps", type=float, help="frames per second sampled from each video")
    distill.add_argument("--max-frames", type=int, help="at most this many frames per video")
    distill.add_argument("--min-pixels", type=int, help="per frame")
    distill.add_argument("--max-pixels", type=int, help="per frame")
    distill.set_defaults(run=run_distill)
    return parser


def run_distill(arguments: argparse.Namespace) -> int:
    from linvid.distill.recipe import load_recipe
    from linvid.distill.trainer import RunOptions, distill

    recipe = load_recipe(arguments.recipe)
    for name in ("checkpoint_every", "max_steps"):
        value = getattr(arguments, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if arguments.keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints must be >= 1, got {arguments.keep_checkpoints}")
    default, by_name = data_arguments(arguments.data)
    options = RunOptions(
        teacher=arguments.teacher,
        data=default,
        data_by_name=by_name,
        feature_cache=not arguments.no_feature_cache,
        feature_cache_dir=arguments.feature_cache,
        out=arguments.out,
        student=arguments.student,
        plan=arguments.plan,
        resume=arguments.resume,
        overwrite=arguments.overwrite,
        checkpoint_every=arguments.checkpoint_every,
        keep_checkpoints=arguments.keep_checkpoints,
        max_steps=arguments.max_steps,
        seed=arguments.seed,
        num_frames=arguments.num_frames,
        fps=arguments.fps,
        max_frames=arguments.max_frames,
        min_pixels=arguments.min_pixels,
        max_pixels=arguments.max_pixels,
    )
    destination = distill(recipe, options)
    print(f"distilled student: {destination}")
    return 0


def data_arguments(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """`--data` values -> (the default FILE or None, {NAME: FILE}). A value is NAME=FILE when
    it has "=" and is not itself an existing file."""
    import os

    default, by_name = None, {}
    for value in values:
        name, equals, path = value.partition("=")
        if equals and not os.path.isfile(value) and name and "/" not in name:
            if name in by_name:
                raise ValueError(f"--data names {name!r} twice")
            by_name[name] = path
        elif default is not None:
            raise ValueError(
                f"--data gives two default files ({default}, {value}); name all but one "
                "as NAME=FILE"
            )
        else:
            default = value
    return default, by_name


def run_convert(arguments: argparse.Namespace) -> int:
    import dataclasses

    from linvid.models.convert import convert_checkpoint, parse_layers
    from linvid.models.directory import (
        TEACHER_MODEL_TYPES,
        check_model_directory,
        decoder_layer_count,
    )
    from linvid.models.plan import resolve_plan

    plan = resolve_plan(arguments.plan)
    if arguments.layers is not None and arguments.fraction is not None:
        raise ValueError(
            f"give --layers or --fraction, not both (got --layers {arguments.layers} and "
            f"--fraction {arguments.fraction:g}): --layers names the decoder layers to replace, "
            "--fraction replaces that share of them"
        )
    if arguments.fraction is not None and not 0 < arguments.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {arguments.fraction:g}")
    config = check_model_directory(arguments.model, "--model", model_types=TEACHER_MODEL_TYPES)
    overrides = {}
    if arguments.layers is not None:
        layers = parse_layers(arguments.layers, decoder_layer_count(config))
        overrides["layers"], overrides["fraction"] = layers, None
    if arguments.fraction is not None:
        overrides["fraction"], overrides["layers"] = arguments.fraction, None
    for name in ("placement", "init", "gate", "branches"):
        if getattr(arguments, name) is not None:
            overrides[name] = getattr(arguments, name)
    plan = dataclasses.replace(plan, **overrides)
    out = convert_checkpoint(
        arguments.model,
        plan,
        arguments.out,
        overwrite=arguments.overwrite,
        dtype=arguments.dtype,
        max_shard_size=arguments.max_shard_size,
        seed=arguments.seed,
    )
    print(f"converted {arguments.model} with plan {plan.to_dict()} -> {out}")
    return 0


def run_ask(arguments: argparse.Namespace) -> int:
    import json

    from linvid.eval.ask import ask_video_file

    stream = {"auto": None, "on": True, "off": False}[arguments.stream]
    fps = None if arguments.num_frames is not None else arguments.fps
    answer, run = ask_video_file(
        arguments.model,
        arguments.video,
        arguments.question,
        fps=fps,
        num_frames=arguments.num_frames,
        max_frames=arguments.max_frames,
        max_pixels=arguments.max_pixels,
        min_pixels=arguments.min_pixels,
        max_new_tokens=arguments.max_new_tokens,
        style=arguments.style,
        stream=stream,
        chunk_frames=arguments.chunk_frames,
        tokens_per_frame=arguments.tokens_per_frame,
        sampling=arguments.sampling,
        progress=not arguments.json,
    )
    if arguments.json:
        result = {"answer": answer.text, "new_tokens": answer.new_tokens, **run}
        result.update(seconds=answer.seconds, counts=answer.counts)
        print(json.dumps(result, indent=2))
    else:
        print(answer.text)
    return 0


def run_scenes(arguments: argparse.Namespace) -> int:
    import json

    from linvid.video.contact_sheet import draw_contact_sheet, find_scene_cuts

    if arguments.thumb_size < 8:
        raise ValueError(f"--thumb-size must be >= 8 pixels, got {arguments.thumb_size}")
    cuts = find_scene_cuts(
        arguments.video,
        fps=arguments.fps,
        max_frames=arguments.max_frames,
        tau=arguments.tau,
        max_scenes=arguments.max_scenes,
        thumb_size=arguments.thumb_size,
        start=arguments.start,
        end=arguments.end,
    )
    if arguments.out:
        draw_contact_sheet(cuts, arguments.out, thumb_size=arguments.thumb_size)
    if arguments.json:
        print(json.dumps({**cuts.to_dict(), "contact_sheet": arguments.out}, indent=2))
    else:
        print(cuts.describe())
        if arguments.out:
            print(f"contact sheet: {arguments.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if not hasattr(arguments, "run"):
        parser.print_help()
        return 2
    try:
        return arguments.run(arguments)
    except KeyboardInterrupt:
        # CPython kills the process with SIGINT at exit if the interrupt escaped an exec() of
        # source text (lazy imports run some); a trivial exec clears that, so 130 stands.
        exec("pass")
        hint = INTERRUPT_HINTS.get(arguments.command, "")
        print(f"linvid {arguments.command}: interrupted. {hint}".rstrip(), file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"linvid {arguments.command}: error: {error}", file=sys.stderr)
        print("hint: run with --help for the expected arguments", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
