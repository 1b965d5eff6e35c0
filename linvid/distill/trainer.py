"""The distillation loop: a recipe's stages run in order on one student, on accelerate.

One stage, read top to bottom in `run_stage`:
  freeze (LoRA first if the stage has it) -> AdamW over the stage's parameter groups ->
  warmup + cosine schedule -> for each optimizer step: `gradient_accumulation` micro-batches,
  each scored by the stage's weighted losses ("kl" against the teacher's logits, "ce" on the
  answer labels, "hidden" per converted layer, "sequence" on the teacher's greedy answers)
  -> step, log, checkpoint.

Multi-process runs (`accelerate launch`) split every global micro-batch across processes
(`split_batches=True`) from one explicit, seeded sample order, and each loss is rescaled to
the mean over its scored tokens of the whole optimizer step (all micro-batches, all
processes): N processes with per-process batch b, with or without gradient accumulation, end
with the same weights as one process with batch N*b (up to float rounding).

Checkpoints (RUN_DIR/checkpoints/step-XXXXXXXX) are written into a temporary directory and
renamed, so a directory with that name is always complete:
  model.safetensors            the whole student, LoRA adapters included (what resume loads)
  optimizer.safetensors + .json the torch optimizer's state_dict: tensors / everything else
  scheduler.json               the LambdaLR state_dict
  rng_<rank>.safetensors + .json torch (CPU, CUDA) / python and numpy RNG states per process
  student_trainable.safetensors the stage's trainable weights (safetensors)
  trainer_state.json           stage index, stage step, global step, data position (epoch,
                               batch index), skipped samples
  manifest.json                every other file's size and SHA-256, written last
No pickles: `linvid.distill.checkpoint` writes and reads these with safetensors and JSON. FSDP
and DeepSpeed runs write accelerate's own (sharded, partly pickled) save_state format instead.
A checkpoint whose weights are not finite is never written (the run stops instead); an old
checkpoint is renamed to tmp-... before it is deleted, and one that replaces another goes
through `linvid.outputs.replace_path`, so an interrupt never leaves a partial step-N.

The run directory follows the output rule (linvid/outputs.py), checked before any model loads
(`check_run_directory`): --out is never a --teacher/--student input; a new run needs an empty
or missing --out, or --overwrite (the earlier run's checkpoints and logs are then dropped when
the new run starts, its student/ is replaced only when the new one is saved whole); --resume
needs a run to resume. The final student is built in RUN_DIR/.student.partial-* and renamed.
Resuming verifies the newest checkpoint file by file (`verify_checkpoint`) and falls back to
the previous one when it does not read back whole, moving the unusable one to
checkpoints/unusable-step-N with a warning that says why. Every sample's video file is checked
to exist before any model loads (`check_videos`): a stage with `fail_on_bad_samples` stops
there, naming the files and their data lines; other stages warn once and skip them. Ctrl-C
keeps every finished checkpoint: rerun with --resume.

Token compression (paper 002, TimeViper), for Qwen2.5-VL students:
- a recipe's `transv` schedule is applied to the student once, before the first stage, with
  init "transfer" (`linvid.models.transv.apply_transv`); its parameters (`...transv.<layer>...`)
  are then the student's, matched by stage patterns and parameter groups like any other. A
  stage with `transv: false` runs with every TransV point dropping nothing
  (`set_transv_enabled`); other stages run with TransV on, teacher-forced with
  `transv_prompt_length` = the index of the first answer token. TransV takes one prompt length
  per call, so every sample of a micro-batch must share it (right padding sits in the answer
  part, which TransV leaves alone); a micro-batch whose prompts differ in length is refused
  (use a per-process micro-batch of 1). Only "kl" and "ce" are allowed with TransV on: the
  teacher (no TransV) scores the same answer tokens; "hidden" and "sequence" are refused.
- a stage's `tokens_per_frame` merges each frame of the student's videos to that many tokens
  after the vision tower (`linvid.models.frame_tome`, gradients flow into the merger) and
  rebuilds placeholders, labels and M-RoPE positions. The paper trains TimeViper without a
  teacher, so only "ce" stages may set it (the teacher would see other tokens). The vision
  tower runs outside the wrapped model's forward here: tested in one process only.
- a stage's `tome_keep_ratio` < 1 (paper 001, AuroraLong: 10% of the visual tokens) does the
  same with round(ratio x the frame's tokens) per frame, merged tokens sorted by ascending
  size (paper 001 §3.2.2). AuroraLong merges inside its SigLIP ViT; for a Qwen2.5-VL student
  linvid merges after the tower, whose window attention needs the whole patch grid.
  With several processes (DDP), a stage with `transv:
  false` must not train TransV parameters (they get no gradient).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from linvid.distill.checkpoint import (
    CheckpointError,
    full_model_state,
    load_training_state,
    read_json,
    required_files,
    save_training_state,
    uses_own_format,
    verify_checkpoint,
    write_manifest,
)
from linvid.distill.data import (
    IGNORE_INDEX,
    VideoConversationDataset,
    cached_video_features,
    missing_videos,
    model_inputs,
    read_conversations,
    sample_visual_inputs,
)
from linvid.distill.decodes import TeacherDecodes, decodes_key
from linvid.distill.hidden import hidden_alignment_loss
from linvid.distill.losses import cross_entropy, sequence_kd, token_kl, weighted_total
from linvid.distill.recipe import (
    LOSSES,
    Recipe,
    Stage,
    freeze_for_stage,
    lr_scheduler,
    make_optimizer,
)
from linvid.models.directory import TEACHER_MODEL_TYPES, check_model_directory
from linvid.outputs import (
    OutputExistsError,
    atomic_directory,
    atomic_write_text,
    check_output,
    replace_path,
)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
STATE_KEYS = ("stage_index", "stage_step", "global_step", "epoch", "batch_index")
RUN_ONLY_KEYS = ("out", "checkpoint")  # in the loop's state, never saved in a checkpoint
UNUSABLE = "unusable-"  # prefix of a checkpoint moved aside because it does not read back
MAX_LISTED = 20  # bad samples named in one message
# Test-only: seconds to sleep after every optimizer step, so a test can kill a run mid-stage.
SLOW_STEP_VARIABLE = "LINVID_TEST_SLOW_STEP_SECONDS"
SEQUENCE_MIN_NEW_TOKENS = 16  # the teacher's greedy answers may run this long at least


@dataclass
class RunOptions:
    """Everything `linvid distill` is given besides the recipe.

    data: the conversations JSONL read by every stage whose `data` name is not in
    `data_by_name` (None: every stage's name must be there). data_by_name: a stage's `data`
    name -> its JSONL (`--data NAME=FILE`); a name joined with "+" ("video_caption+video_qa")
    reads each part's file. num_frames / fps / max_frames / min_pixels / max_pixels: video
    sampling as in `VideoConversationDataset`, overriding every stage's own fields
    (`Stage.video_sampling`). feature_cache: keep the vision tower's outputs on disk for the
    stages that can use them (`stage_feature_cache`), in feature_cache_dir (default
    RUN_DIR/vision_features; share it between runs of students of one teacher). resume: go on
    from the newest usable checkpoint in `out` (a run stopped before its first one starts over).
    overwrite: let a new run (or a resume of a finished run without checkpoints) replace the
    earlier run in `out` (see `check_run_directory`).
    """

    teacher: str
    data: str | None
    out: str
    student: str | None = None
    plan: str | None = None
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_steps: int | None = None
    seed: int = 0
    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    data_by_name: dict[str, str] = field(default_factory=dict)
    feature_cache: bool = True
    feature_cache_dir: str | None = None


def stage_data_files(stage: Stage, options: RunOptions) -> list[str]:
    """The JSONL files `stage` reads: each "+"-joined part of its `data` name from
    options.data_by_name, else options.data; checked to exist."""
    files = []
    for part in stage.data.split("+"):
        path = options.data_by_name.get(part.strip(), options.data)
        if path is None:
            known = sorted(options.data_by_name)
            raise ValueError(
                f"stage {stage.name!r} reads data {part.strip()!r}, which no --data names "
                f"(named: {known}); pass --data {part.strip()}=FILE.jsonl or a default "
                "--data FILE.jsonl"
            )
        if not os.path.isfile(path):
            raise ValueError(f"data file not found: {path} (stage {stage.name!r})")
        if path not in files:
            files.append(path)
    return files


TRANSV_LOSSES = ("kl", "ce")  # losses a stage with TransV on may weight
TOME_LOSSES = ("ce",)  # losses a stage with tokens_per_frame may weight


def merges_frames(stage: Stage) -> bool:
    """Whether the stage merges the student's frame tokens (tokens_per_frame, or a
    tome_keep_ratio below 1)."""
    return stage.tokens_per_frame is not None or (stage.tome_keep_ratio or 1.0) < 1.0


def check_recipe(recipe: Recipe) -> None:
    """Reject what this loop cannot run before any model is loaded."""
    for stage in recipe.stages:
        weighted = sorted(name for name, weight in stage.losses.items() if weight > 0)
        if merges_frames(stage):
            other = [name for name in weighted if name not in TOME_LOSSES]
            if other:
                field_name = "tokens_per_frame" if stage.tokens_per_frame else "tome_keep_ratio"
                raise ValueError(
                    f"stage {stage.name!r} sets {field_name!r} with losses {other}: per-frame "
                    "ToMe is trained with 'ce' only (the teacher would see other video tokens)"
                )
        if stage.transv is True and recipe.transv is None:
            continue  # the --student may hold TransV: checked once it is loaded
        if recipe.transv is not None and stage.transv is not False:
            other = [name for name in weighted if name not in TRANSV_LOSSES]
            if other:
                raise ValueError(
                    f"stage {stage.name!r} runs with TransV on and weights {other}; with TransV "
                    f"only {list(TRANSV_LOSSES)} are supported (set 'transv: false' for it)"
                )


def check_model_directories(options: RunOptions) -> None:
    """Refuse a --teacher (a Qwen2.5-VL directory with its tokenizer) or --student (a saved
    linvid model) that is not a local model directory, naming the option and the path
    (`linvid.models.directory.check_model_directory`): models are read with
    local_files_only, so a mistyped path is named as missing, never sent to a model hub."""
    check_model_directory(
        options.teacher, "--teacher", tokenizer=True, model_types=TEACHER_MODEL_TYPES
    )
    if options.student is not None:
        check_model_directory(options.student, "--student")


def run_checkpoints(out: Path) -> list[Path]:
    """The checkpoint directories of a run (checkpoints/step-*), newest first. Each was
    renamed into place whole; whether it still reads back is `usable_checkpoint`'s question."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted((path for path in folder.glob("step-*") if path.is_dir()), reverse=True)


def check_run_directory(options: RunOptions) -> list[Path]:
    """Check what `options.out` may be used for before anything is read or written, and
    return the checkpoints a resume may start from (newest first; [] for a new run).

    --out is never a --teacher/--student input (nor holds one or lies inside one), not even
    with --overwrite. With --resume, --out must hold a run: a missing or empty --out is
    refused (nothing to resume, most likely a mistyped path) and so is a finished run
    (student/) without checkpoints unless --overwrite; a run stopped before its first
    checkpoint starts over from step 0. A new run needs a missing or empty --out, or
    --overwrite: an earlier run's checkpoints ask for --resume or --overwrite, its student/
    and any other content for --overwrite."""
    out = Path(options.out)
    check_output(out, overwrite=True, inputs=(options.teacher, options.student))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: expected a run directory")
    checkpoints = run_checkpoints(out)
    student = out / "student"
    if options.resume:
        if not out.exists() or not any(out.iterdir()):
            problem = "does not exist" if not out.exists() else "is empty"
            raise ValueError(
                f"--resume: --out {out} {problem}, so there is nothing to resume; check the "
                "path, or drop --resume to start a new run there"
            )
        if not checkpoints and student.exists() and not options.overwrite:
            raise OutputExistsError(
                f"--resume: --out {out} holds a finished run ({student}) and no checkpoint to "
                "resume from; pass --overwrite to run it again and replace its student, or "
                "choose another --out"
            )
        return checkpoints
    if options.overwrite:
        return []
    if checkpoints:
        raise OutputExistsError(
            f"--out {out} already holds checkpoints of another run (newest: "
            f"{checkpoints[0].name}); pass --resume to continue it, --overwrite to start "
            "afresh (its checkpoints are dropped), or choose a new --out"
        )
    if student.exists():
        raise OutputExistsError(
            f"--out {out} holds the student of an earlier run ({student}); pass --overwrite to "
            "replace it (only once the new one is saved whole), or choose another --out"
        )
    if (out / "metrics.jsonl").exists():
        raise OutputExistsError(
            f"--out {out} holds a run stopped before its first checkpoint; pass --resume to "
            "run it again from step 0, --overwrite to start afresh, or choose another --out"
        )
    check_output(out, overwrite=False)
    return []


def _remove(path: Path) -> None:
    """Delete a file or directory of the run; a directory is first renamed to a hidden
    `.NAME.removing-*` beside it, so an interrupt never leaves it half-deleted under its
    name."""
    if path.is_dir():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.removing-", dir=path.parent))
        os.replace(path, aside / path.name)
        shutil.rmtree(aside)
    elif path.exists():
        path.unlink()


def clear_earlier_run(out: Path) -> None:
    """Start afresh (--overwrite) in the --out of an earlier run: drop its checkpoints, the
    teacher's stored answers, metrics and loss plots. Its student/ stays until the new one
    replaces it whole; the vision feature cache (keyed by the tower's weights and each video's
    file) stays too."""
    for path in (out / CHECKPOINTS, out / "teacher_decodes", out / "metrics.jsonl"):
        _remove(path)
    for plot in out.glob("loss_*.png"):
        _remove(plot)


def _listing(reasons: list[str]) -> str:
    """At most MAX_LISTED reasons, then how many more."""
    shown = "; ".join(reasons[:MAX_LISTED])
    if len(reasons) > MAX_LISTED:
        shown += f"; and {len(reasons) - MAX_LISTED} more"
    return shown


def check_videos(recipe: Recipe, options: RunOptions, *, report: bool = True) -> None:
    """Check every sample's video file of every stage before any model loads
    (`missing_videos`: exists, is a file, is not empty; nothing is decoded). A stage with
    `fail_on_bad_samples` stops the run here, naming the files and their data lines; for the
    other stages one warning (when `report`) lists the samples they will skip."""
    found: dict[tuple[str, ...], tuple[int, dict[int, str], list[str]]] = {}
    for stage in recipe.stages:
        files = tuple(stage_data_files(stage, options))
        if files not in found:
            samples = [sample for path in files for sample in read_conversations(path)]
            found[files] = (len(samples), missing_videos(samples), [])
        count, missing, skipping = found[files]
        if not missing:
            continue
        if stage.fail_on_bad_samples:
            raise ValueError(
                f"stage {stage.name!r} stops on bad samples (fail_on_bad_samples: true) and "
                f"{len(missing)} of its {count} samples have no video file: "
                f"{_listing(list(missing.values()))}. Fix the paths in the data, or set "
                "'fail_on_bad_samples: false' to skip these samples"
            )
        skipping.append(stage.name)
    if not report:
        return
    for count, missing, skipping in found.values():
        if skipping:
            warnings.warn(
                f"stage(s) {', '.join(map(repr, skipping))} will skip {len(missing)} of their "
                f"{count} samples, whose video file is missing (fail_on_bad_samples: false): "
                f"{_listing(list(missing.values()))}",
                stacklevel=2,
            )


def read_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer_state.json; CheckpointError naming the file when it does not
    parse or lacks a position."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    state = read_json(path)
    if not isinstance(state, dict) or not all(
        isinstance(state.get(key), int) for key in STATE_KEYS
    ):
        raise CheckpointError(
            f"{path} does not hold the run's position (integers {', '.join(STATE_KEYS)})"
        )
    return state


def _move_aside(checkpoint: Path) -> Path:
    """Rename an unusable checkpoint to unusable-<name> beside it (kept for inspection,
    never resumed from or pruned instead of a good one)."""
    target = checkpoint.with_name(UNUSABLE + checkpoint.name)
    number = 1
    while target.exists():
        number += 1
        target = checkpoint.with_name(f"{UNUSABLE}{checkpoint.name}-{number}")
    os.replace(checkpoint, target)
    return target


def usable_checkpoint(candidates: list[Path], accelerator) -> Path | None:
    """The newest of `candidates` (newest first) that reads back whole (`verify_checkpoint`
    and `read_trainer_state`), or None when there are none. Newer ones that do not are moved
    to checkpoints/unusable-step-N and named, with the reason, in one warning. When none is
    usable, CheckpointError names each one's bad file. The main process reads the files and
    tells the others its choice."""
    if not candidates:
        return None
    outcome: list = [None]
    if accelerator.is_main_process:
        required = [STATE_FILE]
        if uses_own_format(accelerator):
            required += required_files(accelerator)
        skipped, chosen = [], None
        for checkpoint in candidates:
            try:
                verify_checkpoint(checkpoint, required)
                read_trainer_state(checkpoint)
            except CheckpointError as error:
                skipped.append((checkpoint, str(error)))
                continue
            chosen = checkpoint
            break
        if chosen is None:
            reasons = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
            outcome = [
                (
                    "error",
                    f"cannot resume: no checkpoint in {candidates[0].parent} reads back "
                    f"whole ({reasons}); repair or remove them, or start afresh with "
                    "--overwrite instead of --resume",
                )
            ]
        else:
            if skipped:
                moved = [(path, _move_aside(path), reason) for path, reason in skipped]
                warnings.warn(
                    "; ".join(
                        f"skipping checkpoint {path.name}, which does not read back whole "
                        f"({reason}); moved it to {target}"
                        for path, target, reason in moved
                    )
                    + f"; resuming from {chosen}",
                    stacklevel=2,
                )
            outcome = [("checkpoint", str(chosen))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise CheckpointError(value)
    return Path(value)


def build_models(options: RunOptions, recipe: Recipe):
    """(teacher in eval mode, student, tokenizer) from the run's directories."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    import linvid

    check_model_directories(options)
    # Local paths stay local: a directory is never looked up on a model hub.
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        options.teacher, local_files_only=True
    ).eval()
    teacher.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(options.teacher, local_files_only=True)
    if options.student is not None:
        student = linvid.load(options.student, local_files_only=True)
    else:
        plan = options.plan or recipe.student
        if plan is None:
            raise ValueError("give --student DIR or --plan PRESET (the recipe names no student)")
        torch.manual_seed(options.seed)
        student = linvid.convert(teacher, plan)
    if recipe.transv is not None:
        from linvid.models.transv import apply_transv, has_transv

        if has_transv(student):
            raise ValueError(
                f"recipe {recipe.name!r} applies TransV ({recipe.transv!r}), but the student "
                "already has TransV; pass a student without it or a recipe without 'transv'"
            )
        apply_transv(student, recipe.transv, init="transfer")
    student.train()
    return teacher, student, tokenizer


def stage_decodes_key(stage: Stage, options: RunOptions) -> str:
    """What the teacher's greedy answers to `stage`'s samples depend on, hashed."""
    return decodes_key(
        teacher=os.path.abspath(options.teacher),
        data=[os.path.abspath(path) for path in stage_data_files(stage, options)],
        sampling=sorted(stage_sampling(stage, options).items()),
        max_sequence_length=stage.max_sequence_length,
        min_new_tokens=SEQUENCE_MIN_NEW_TOKENS,
    )


def stage_feature_cache(stage: Stage, student, teacher, options: RunOptions):
    """The `VisionFeatureCache` a stage reads and fills (folder: the vision tower's
    fingerprint), or None when the stage needs pixels: the feature cache is off, the stage
    trains the vision tower, merges frames (tokens_per_frame), lets the teacher decode
    ("sequence"), or weights a teacher loss while the teacher's vision tower differs from the
    student's. Call after `freeze_for_stage`."""
    from linvid.distill.data import VisionFeatureCache, vision_fingerprint

    student = getattr(student, "get_base_model", lambda: student)()
    visual = student.model.visual
    if (
        not options.feature_cache
        or merges_frames(stage)
        or stage.losses.get("sequence", 0) > 0
        or any(parameter.requires_grad for parameter in visual.parameters())
    ):
        return None
    fingerprint = vision_fingerprint(student)
    teacher_losses = any(stage.losses.get(name, 0) > 0 for name in ("kl", "hidden"))
    if teacher_losses and vision_fingerprint(teacher) != fingerprint:
        return None
    root = Path(options.feature_cache_dir or Path(options.out) / "vision_features")
    return VisionFeatureCache(root / fingerprint, fingerprint=fingerprint)


def make_dataset(options: RunOptions, stage: Stage, tokenizer, config, feature_cache=None):
    """The stage's VideoConversationDataset for a model with `config` (its vision config and
    pixel statistics); the pixels come from the teacher directory's processor when it has
    one (a real checkpoint's), as a Qwen2.5-VL user's would."""
    from linvid.models.frame_tome import FrameBudget
    from linvid.models.processor import load_processor
    from linvid.models.qwen_video import pixel_statistics

    merged_tokens = None  # a merging stage's lengths count the tokens its student sees
    if merges_frames(stage):
        merged_tokens = FrameBudget(stage.tokens_per_frame, stage.tome_keep_ratio)
    samples = [
        sample for path in stage_data_files(stage, options) for sample in read_conversations(path)
    ]
    return VideoConversationDataset(
        samples,
        tokenizer,
        config.vision_config,
        max_sequence_length=stage.max_sequence_length,
        fail_on_bad_samples=stage.fail_on_bad_samples,
        style=stage.prompt_style,
        feature_cache=feature_cache,
        pixel_statistics=pixel_statistics(config),
        processor=load_processor(options.teacher),
        merged_tokens=merged_tokens,
        **stage_sampling(stage, options),
    )


def stage_sampling(stage: Stage, options: RunOptions) -> dict:
    """The stage's video / image sampling, the command line's options winning."""
    return stage.video_sampling(
        fps=options.fps,
        num_frames=options.num_frames,
        max_frames=options.max_frames,
        min_pixels=options.min_pixels,
        max_pixels=options.max_pixels,
    )


def sample_order(size: int, seed: int, stage_index: int, epoch: int) -> list[int]:
    """The epoch's sample order: a permutation fixed by (seed, stage, epoch) alone, the same
    on every process and after a resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + stage_index * 1_009 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def teacher_decode_batch(teacher, batch, decodes: dict, dataset) -> dict:
    """Sequence-level KD inputs (paper 003 eq. 8): each sample's first question followed by
    the teacher's own greedy answer, labelled on that answer only.

    The teacher answers each sample once (`decodes`: sample index -> token ids, a
    `TeacherDecodes` store on disk that resumed runs and later stages reuse): at most
    max(SEQUENCE_MIN_NEW_TOKENS, ground-truth answer length) tokens, up to and including its
    end of turn. Returns model inputs (B, L') with "labels" and the pixels and grids of the
    videos and images whose placeholders are in those prompts (images of later turns are not).
    """
    inputs = model_inputs(batch)
    merge = teacher.config.vision_config.spatial_merge_size**2
    sequences, labels, types, visuals = [], [], [], []
    for i, index in enumerate(batch["sample_index"].tolist()):
        answer = (inputs["labels"][i] != IGNORE_INDEX).nonzero()
        prompt_length = int(answer[0])  # the first answer starts here
        prompt = inputs["input_ids"][i, :prompt_length]
        prompt_types = inputs["mm_token_type_ids"][i, :prompt_length]
        visual = _prompt_visual_inputs(batch, i, prompt_types, merge)
        visuals.append(visual)
        if index not in decodes:
            generated = teacher.generate(
                input_ids=prompt[None],
                attention_mask=torch.ones_like(prompt)[None],
                mm_token_type_ids=prompt_types[None],
                **visual,
                max_new_tokens=max(SEQUENCE_MIN_NEW_TOKENS, len(answer)),
                do_sample=False,
                # A placeholder in the answer would ask for a video that is not there.
                suppress_tokens=[
                    getattr(teacher.config, f"{name}_token_id")
                    for name in ("image", "video", "vision_start", "vision_end")
                ],
                eos_token_id=dataset.end_of_turn_id,
                pad_token_id=dataset.pad_token_id,
            )[0, prompt_length:].tolist()
            if dataset.end_of_turn_id in generated:
                generated = generated[: generated.index(dataset.end_of_turn_id) + 1]
            decodes[index] = generated
        decoded = torch.tensor(decodes[index], dtype=prompt.dtype)
        sequences.append(torch.cat([prompt, decoded]))
        labels.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), decoded]))
        types.append(torch.cat([prompt_types, 0 * decoded]))
    longest = max(len(sequence) for sequence in sequences)

    def pad(tensors, value):
        return torch.stack(
            [torch.nn.functional.pad(t, (0, longest - len(t)), value=value) for t in tensors]
        )

    lengths = torch.tensor([len(sequence) for sequence in sequences])
    return {
        "input_ids": pad(sequences, dataset.pad_token_id),
        "attention_mask": (torch.arange(longest)[None, :] < lengths[:, None]).long(),
        "labels": pad(labels, IGNORE_INDEX),
        "mm_token_type_ids": pad(types, 0),
        **{
            key: torch.cat([visual[key] for visual in visuals if key in visual])
            for key in sorted({key for visual in visuals for key in visual})
        },
    }


def _prompt_visual_inputs(batch, position: int, prompt_types: torch.Tensor, merge: int) -> dict:
    """Sample `position`'s pixels and grids for a prompt that ends before its first answer:
    its video, and of its images the leading ones whose placeholders lie in the prompt
    (`prompt_types`: the prompt's mm_token_type_ids, 1 on image tokens; merge: the vision
    tower's spatial merge, patches per LLM token)."""
    visual = sample_visual_inputs(batch, position)
    if "image_grid_thw" not in visual:
        return visual
    tokens = (visual["image_grid_thw"].prod(-1) // merge).tolist()
    in_prompt, count = int((prompt_types == 1).sum()), 0
    while count < len(tokens) and sum(tokens[: count + 1]) <= in_prompt:
        count += 1
    grids = visual.pop("image_grid_thw")
    pixels = visual.pop("pixel_values")
    if count:
        visual["image_grid_thw"] = grids[:count]
        visual["pixel_values"] = pixels[: int(grids[:count].prod(-1).sum())]
    return visual


def token_counts(stage: Stage, teacher, batch, decodes: dict, dataset) -> torch.Tensor:
    """Scored tokens of each weighted loss (sorted by name) in one micro-batch: what the
    loss's mean divides by. (len(weighted losses),) float."""
    answers = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # kl and ce score the answers
    counts = {"kl": answers, "ce": answers, "hidden": batch["attention_mask"].sum()}
    if stage.losses.get("sequence", 0) > 0:
        with torch.no_grad():
            decoded = teacher_decode_batch(teacher, batch, decodes, dataset)["labels"]
        counts["sequence"] = (decoded[:, 1:] != IGNORE_INDEX).sum()
    weighted = sorted(name for name, weight in stage.losses.items() if weight > 0)
    return torch.stack([counts[name] for name in weighted]).float()


def shared_prompt_length(labels: torch.Tensor, stage: Stage) -> int:
    """The index of the first answer token, which every sample of the micro-batch must share
    (TransV takes one `transv_prompt_length` per call)."""
    lengths = {int((row != IGNORE_INDEX).nonzero()[0]) for row in labels}
    if len(lengths) != 1:
        raise ValueError(
            f"stage {stage.name!r} runs with TransV, which needs one prompt length per call, but "
            f"this micro-batch's prompts have lengths {sorted(lengths)}; use a per-process "
            "micro-batch of 1 (batch_size = gradient_accumulation x processes) or prompts of "
            "equal length"
        )
    return lengths.pop()


def student_inputs(
    stage: Stage, model, batch, transv: bool, feature_cache=None
) -> tuple[dict, torch.Tensor]:
    """(the student's model inputs, labels) of one micro-batch: the vision tower's outputs
    from `feature_cache` (as mm_encoder_outputs) when given, frames merged for a stage with
    tokens_per_frame, `transv_prompt_length` when the student runs TransV."""
    if feature_cache is not None:
        inputs = model_inputs(batch, pixels=False)
        inputs["mm_encoder_outputs"] = cached_video_features(model, batch, feature_cache)
    else:
        inputs = model_inputs(batch)
    if merges_frames(stage):
        from linvid.models.frame_tome import merged_video_batch

        inputs = merged_video_batch(model, inputs, stage.tokens_per_frame, stage.tome_keep_ratio)
    labels = inputs.pop("labels")
    if transv:
        inputs["transv_prompt_length"] = shared_prompt_length(labels, stage)
    return inputs, labels


def step_losses(
    stage: Stage, student, teacher, batch, accelerator, decodes: dict, dataset, transv=False
) -> dict[str, torch.Tensor]:
    """The stage's weighted losses on one micro-batch, each the mean over its scored tokens
    on this process (the caller rescales them to the whole optimizer step). transv: whether
    the student runs with TransV on (the teacher never does)."""
    unwrapped = accelerator.unwrap_model(student)
    unwrapped = getattr(unwrapped, "get_base_model", lambda: unwrapped)()
    inputs, labels = student_inputs(stage, unwrapped, batch, transv, dataset.feature_cache)
    logits = student(**inputs, use_cache=False).logits  # (B, L, V)
    inputs.pop("transv_prompt_length", None)  # the teacher's inputs below have no TransV
    weights = {name: weight for name, weight in stage.losses.items() if weight > 0}
    values = {}
    if "kl" in weights:
        with torch.no_grad():
            teacher_logits = teacher(**inputs, use_cache=False).logits
        scored = labels != IGNORE_INDEX  # (B, L), the answer tokens
        values["kl"] = token_kl(logits, teacher_logits, scored, temperature=stage.temperature)
    if "ce" in weights:
        values["ce"] = cross_entropy(logits, labels)
    if "hidden" in weights:
        model = accelerator.unwrap_model(student)
        model = getattr(model, "get_base_model", lambda: model)()
        values["hidden"] = hidden_alignment_loss(
            model, teacher, inputs, reduction=stage.hidden_reduction
        )[0]
    if "sequence" in weights:
        with torch.no_grad():
            sequence_inputs = teacher_decode_batch(teacher, batch, decodes, dataset)
        sequence_labels = sequence_inputs.pop("labels")
        sequence_logits = student(**sequence_inputs, use_cache=False).logits
        values["sequence"] = sequence_kd(sequence_logits, sequence_labels)
    return values


def run_stage(
    stage_index: int,
    stage: Stage,
    student,
    teacher,
    tokenizer,
    accelerator,
    options: RunOptions,
    resume_from: Path | None,
    state: dict,
    progress,
):
    """Train `student` through one stage; returns it (LoRA merged). `state` is updated."""
    from torch.utils.data import DataLoader

    if stage.lora is not None:
        from peft import get_peft_model

        student = get_peft_model(student, stage.lora.peft_config())
    freeze_for_stage(student, stage)
    transv = stage_transv(student, stage)
    # A sharded vision tower runs only inside the wrapped model's forward (`sharded_weights`).
    feature_cache = (
        None
        if sharded_weights(accelerator)
        else stage_feature_cache(stage, student, teacher, options)
    )
    dataset = make_dataset(options, stage, tokenizer, student.config, feature_cache)
    # Missing videos were reported before the run (check_videos): never read them.
    dataset.skip_known(missing_videos(dataset.samples))
    if len(dataset) < stage.batch_size:
        raise ValueError(
            f"stage {stage.name!r}: batch_size {stage.batch_size} exceeds the "
            f"{len(dataset)} samples of {stage_data_files(stage, options)}"
        )
    steps_per_epoch = len(dataset) // stage.batch_size
    total_steps = stage.total_steps(len(dataset))
    stage.micro_batch_size(accelerator.num_processes)  # checks divisibility
    accelerator.gradient_accumulation_steps = stage.gradient_accumulation
    optimizer = make_optimizer(student, stage)
    scheduler = lr_scheduler(optimizer, total_steps, stage)
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if resume_from is not None:
        load_training_state(resume_from, accelerator, model, optimizer, scheduler)
    else:
        state.update(stage_index=stage_index, stage_step=0)
    teacher.to(accelerator.device)
    slow = float(os.environ.get(SLOW_STEP_VARIABLE, "0"))
    decodes = TeacherDecodes(  # the teacher's greedy answers, for "sequence"
        Path(options.out) / "teacher_decodes" / stage_decodes_key(stage, options),
        accelerator.process_index,
    )
    weights = {name: weight for name, weight in sorted(stage.losses.items()) if weight > 0}

    while state["stage_step"] < total_steps:
        if options.max_steps is not None and state["global_step"] >= options.max_steps:
            break
        epoch, batch_index = divmod(state["stage_step"], steps_per_epoch)
        order = sample_order(len(dataset), options.seed, stage_index, epoch)
        order = order[batch_index * stage.batch_size : steps_per_epoch * stage.batch_size]
        loader = accelerator.prepare(
            DataLoader(
                dataset,
                batch_size=stage.batch_size // stage.gradient_accumulation,
                sampler=order,
                collate_fn=dataset.collate,
            )
        )
        micro_batches = iter(loader)
        for _ in range(steps_per_epoch - batch_index):
            if state["stage_step"] >= total_steps or (
                options.max_steps is not None and state["global_step"] >= options.max_steps
            ):
                break
            started = time.perf_counter()
            logged: dict[str, float] = {}
            batches = [next(micro_batches) for _ in range(stage.gradient_accumulation)]
            for batch in batches:
                dataset.record_skipped(batch)
            # A micro-batch where a process got only bad samples is skipped by every process.
            batches = [batch for batch in batches if not empty_on_any_process(accelerator, batch)]
            # Each loss is a mean over its scored tokens of the whole optimizer step (every
            # micro-batch, every process): one process with batch B and N processes with B/N,
            # with or without accumulation, take the same step. DDP averages gradients over
            # processes and accelerator.backward divides by the accumulation: undo both.
            counts = [token_counts(stage, teacher, batch, decodes, dataset) for batch in batches]
            local_total = torch.zeros(len(weights), device=accelerator.device)
            total = accelerator.reduce(sum(counts, local_total), reduction="sum")
            scale = accelerator.num_processes * stage.gradient_accumulation / total.clamp(min=1)
            for batch, local in zip(batches, counts, strict=True):
                values = step_losses(
                    stage, model, teacher, batch, accelerator, decodes, dataset, transv
                )
                values = {
                    name: values[name] * local[i] * scale[i] for i, name in enumerate(weights)
                }
                loss = weighted_total(values, weights)
                check_finite(loss, values, stage, state, accelerator)
                accelerator.backward(loss)
                for name, value in values.items():
                    share = accelerator.reduce(value.detach(), reduction="sum")
                    logged[name] = logged.get(name, 0.0) + float(share) / (
                        accelerator.num_processes * stage.gradient_accumulation
                    )
            learning_rate = scheduler.get_last_lr()[0]  # the default group's lr of this step
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["stage_step"] += 1
            state["global_step"] += 1
            state["epoch"], state["batch_index"] = divmod(state["stage_step"], steps_per_epoch)
            state["skipped"] = len(dataset.skipped)
            seconds = time.perf_counter() - started
            record = {
                "step": state["global_step"],
                "stage": stage.name,
                "stage_step": state["stage_step"],
                **logged,
                "lr": learning_rate,
                "samples_per_second": stage.batch_size / seconds,
                "processes": accelerator.num_processes,
                "skipped": state["skipped"],
            }
            if accelerator.is_main_process:
                with open(Path(options.out) / "metrics.jsonl", "a") as file:
                    file.write(json.dumps(record) + "\n")
                progress.set_postfix({key: f"{logged[key]:.4f}" for key in logged})
                progress.update(1)
            if options.checkpoint_every and state["global_step"] % options.checkpoint_every == 0:
                save_checkpoint(model, optimizer, scheduler, accelerator, options, state)
            if slow:
                time.sleep(slow)
        resume_from = None

    if feature_cache is not None:
        feature_cache.flush()
    if accelerator.is_main_process:
        plot_stage(Path(options.out), stage.name)
    student = accelerator.unwrap_model(model)
    accelerator.free_memory()
    if stage.lora is not None:
        student = student.merge_and_unload()
    return student


def sharded_weights(accelerator) -> bool:
    """Whether the run shards the student's weights (FSDP, DeepSpeed ZeRO-3): a layer's
    weights are then gathered only inside the wrapped model's forward."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    )


def check_process_group(accelerator) -> None:
    """Refuse a launch whose processes did not join one process group: each would train alone
    into the same --out. accelerate 1.16 forms none on CPU for an FSDP or DeepSpeed config
    (it shards on GPUs only), nor for any config without ACCELERATE_USE_CPU=true."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate "
            f"runs this one alone ({accelerator.distributed_type.value}), so each would train "
            "its own copy into the same --out; on CPU set ACCELERATE_USE_CPU=true (gloo, data "
            "parallel: accelerate runs FSDP and DeepSpeed on GPUs only)"
        )


def check_sharded_run(recipe: Recipe, accelerator) -> None:
    """Before any model loads, refuse the stages a sharded run cannot train: "hidden" and frame
    merging (tokens_per_frame, tome_keep_ratio) call layers outside the model's forward, and
    a LoRA stage would wrap an already sharded student in new, unsharded layers."""
    if not sharded_weights(accelerator):
        return
    for stage in recipe.stages:
        reasons = []
        if stage.losses.get("hidden", 0) > 0:
            reasons.append("weights 'hidden' (runs each converted layer on its own)")
        if merges_frames(stage):
            reasons.append("merges frames (runs the vision tower on its own)")
        if stage.lora is not None:
            reasons.append("trains LoRA adapters (new layers in a sharded student)")
        if reasons:
            raise ValueError(
                f"stage {stage.name!r} {' and '.join(reasons)}, which a run that shards the "
                f"weights ({accelerator.distributed_type.value}) cannot train; launch it "
                "data-parallel instead (accelerate launch --multi_gpu, or a DeepSpeed ZeRO-2 "
                "config)"
            )


def stage_transv(student, stage: Stage) -> bool:
    """Switch the student's TransV on or off for `stage` (`transv: false` turns it off, null or
    true leave it on); returns whether it is on. Refuses `transv: true` without TransV and
    losses TransV cannot serve."""
    from linvid.models.transv import has_transv, set_transv_enabled

    if not has_transv(student):
        if stage.transv:
            raise ValueError(
                f"stage {stage.name!r} sets 'transv: true' but the student has no TransV; give "
                "the recipe a 'transv' schedule or a --student with TransV"
            )
        return False
    on = stage.transv is not False
    set_transv_enabled(student, on)
    other = sorted(
        name for name, weight in stage.losses.items() if weight > 0 and name not in TRANSV_LOSSES
    )
    if on and other:
        raise ValueError(
            f"stage {stage.name!r} runs with TransV on and weights {other}; with TransV only "
            f"{list(TRANSV_LOSSES)} are supported (set 'transv: false' for it)"
        )
    return on


def empty_on_any_process(accelerator, batch) -> bool:
    """Whether some process's micro-batch holds no good sample (no "input_ids")."""
    empty = torch.tensor(float("input_ids" not in batch), device=accelerator.device)
    return bool(accelerator.reduce(empty, reduction="sum") > 0)


def check_finite(loss, values, stage: Stage, state: dict, accelerator) -> None:
    """Stop the run on a NaN/inf loss on any process, before it reaches the weights."""
    bad = torch.tensor(float(not torch.isfinite(loss.detach())), device=accelerator.device)
    if accelerator.reduce(bad, reduction="sum") > 0:
        parts = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in values.items())
        raise FloatingPointError(
            f"stage {stage.name!r}, step {state['global_step'] + 1} (step "
            f"{state['stage_step'] + 1} of the stage): the loss is not finite ({parts}); "
            + last_good(state)
        )


def last_good(state: dict) -> str:
    """Where a stopped run can go on from: the checkpoint this run last saved or resumed
    from (saved with finite weights, or verified when resumed), never one merely found on
    disk."""
    if state.get("checkpoint") is None:
        return "there is no checkpoint of this run yet"
    return f"the last good checkpoint is {state['checkpoint']}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint directory of a run, or None (not verified: see
    `usable_checkpoint`)."""
    checkpoints = run_checkpoints(Path(out))
    return checkpoints[0] if checkpoints else None


def save_checkpoint(
    model, optimizer, scheduler, accelerator, options: RunOptions, state: dict
) -> None:
    """Write the checkpoint of `state` atomically (temporary directory with its manifest, then
    rename) and keep only the newest `keep_checkpoints`; an older one is renamed to tmp-...
    before it is deleted. Weights that are not finite stop the run instead of being saved."""
    from safetensors.torch import save_file

    folder = Path(options.out) / CHECKPOINTS
    name = f"step-{state['global_step']:08d}"
    temporary = folder / f"tmp-{state['global_step']:08d}"
    unwrapped = accelerator.unwrap_model(model)
    broken = [
        key
        for key, value in unwrapped.named_parameters()
        if value.requires_grad and not bool(torch.isfinite(value.detach()).all())
    ]
    flag = torch.tensor(float(bool(broken)), device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum") > 0:
        raise FloatingPointError(
            f"step {state['global_step']}: the trained weights are not finite "
            f"({', '.join(broken[:5]) or 'on another process'}); no checkpoint is written for "
            f"this step; {last_good(state)}"
        )
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_training_state(temporary, accelerator, model, optimizer, scheduler)
    whole = full_model_state(accelerator, model)  # FSDP2: every process joins the gather
    accelerator.wait_for_everyone()  # every process's RNG files are in before the rename
    if accelerator.is_main_process:
        trainable = {
            key: whole[key] for key, value in unwrapped.named_parameters() if value.requires_grad
        }
        save_file(trainable, str(temporary / "student_trainable.safetensors"))
        saved = {key: value for key, value in state.items() if key not in RUN_ONLY_KEYS}
        (temporary / STATE_FILE).write_text(json.dumps(saved, indent=2))
        write_manifest(temporary)  # last: it records every file as saved
        # One written by an earlier attempt that was resumed is renamed aside, then removed.
        replace_path(temporary, folder / name)
        for old in sorted(folder.glob("step-*"))[: -options.keep_checkpoints]:
            doomed = folder / f"tmp-old-{old.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)  # never half-deleted under its own name
            shutil.rmtree(doomed)
    state["checkpoint"] = str(folder / name)
    accelerator.wait_for_everyone()


def plot_stage(out: Path, stage_name: str) -> None:
    """RUN_DIR/loss_<stage>.png: every logged loss of the stage against the global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["stage"] == stage_name]
    if not rows:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in LOSSES:
        if name in rows[0]:
            axis.plot([row["step"] for row in rows], [row[name] for row in rows], label=name)
    axis.set(xlabel="optimizer step", ylabel="loss", title=f"stage {stage_name}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / f"loss_{stage_name}.png")
    plt.close(figure)


def kept_metrics(metrics: Path, step: int) -> str:
    """The lines of metrics.jsonl up to `step` (a resumed run's), without a last line cut
    short by a kill."""
    kept = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    return "".join(kept)


def distill(recipe: Recipe, options: RunOptions) -> Path:
    """Run every stage of `recipe` (from the newest usable checkpoint with `options.resume`)
    and save the student to RUN_DIR/student, built beside it and renamed into place. Returns
    that directory.

    Before any model loads: the recipe, every stage's data file and video files
    (`check_videos`), the --teacher/--student directories and what --out may be used for
    (`check_run_directory`), and the checkpoint to resume from (`usable_checkpoint`)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm import tqdm

    check_recipe(recipe)
    for stage in recipe.stages:  # every stage's data, before any model is loaded
        stage_data_files(stage, options)
    check_model_directories(options)
    candidates = check_run_directory(options)
    out = Path(options.out)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.stages[0].gradient_accumulation,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    check_process_group(accelerator)
    check_sharded_run(recipe, accelerator)
    check_videos(recipe, options, report=accelerator.is_main_process)
    checkpoint = usable_checkpoint(candidates, accelerator)
    if options.resume and checkpoint is None and accelerator.is_main_process:
        warnings.warn(
            f"--resume: {out} holds no checkpoint yet; the run starts over from step 0",
            stacklevel=2,
        )
    set_seed(options.seed)
    teacher, student, tokenizer = build_models(options, recipe)
    state = {key: 0 for key in STATE_KEYS}
    if checkpoint is not None:
        state.update(read_trainer_state(checkpoint))
    state["out"] = str(out)
    state["checkpoint"] = None if checkpoint is None else str(checkpoint)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if options.overwrite and not options.resume:
            clear_earlier_run(out)
        for stale in (out / CHECKPOINTS).glob("tmp-*"):
            shutil.rmtree(stale)
        metrics = out / "metrics.jsonl"
        # Keep the lines up to the resumed step; a fresh run starts a new file.
        resumed = checkpoint is not None and metrics.exists()
        atomic_write_text(metrics, kept_metrics(metrics, state["global_step"]) if resumed else "")
    accelerator.wait_for_everyone()

    planned = sum(stage.steps or 0 for stage in recipe.stages) or None
    if options.max_steps is not None:
        planned = min(planned or options.max_steps, options.max_steps)
    progress = tqdm(
        total=planned,
        initial=state["global_step"],
        disable=not accelerator.is_main_process,
        desc="distill",
    )
    try:  # on Ctrl-C too, close the bar: the CLI's message starts on a line of its own
        for stage_index, stage in enumerate(recipe.stages):
            if stage_index < state["stage_index"]:
                continue
            resume_from = checkpoint if stage_index == state["stage_index"] else None
            student = run_stage(
                stage_index,
                stage,
                student,
                teacher,
                tokenizer,
                accelerator,
                options,
                resume_from,
                state,
                progress,
            )
            checkpoint = None
    finally:
        progress.close()
    destination = out / "student"
    # FSDP2: every process joins the gather of the sharded weights; None saves them as they are.
    gathered = full_model_state(accelerator, student) if accelerator.is_fsdp2 else None
    if accelerator.is_main_process:
        # Built beside it and renamed: an interrupted save leaves the earlier student whole.
        inputs = (options.teacher, options.student)
        with atomic_directory(destination, overwrite=True, inputs=inputs) as work:
            student.save_pretrained(work, state_dict=gathered)
            tokenizer.save_pretrained(work)
    accelerator.wait_for_everyone()
    return destination
