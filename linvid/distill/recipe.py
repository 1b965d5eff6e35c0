"""Distillation recipes: a recipe is a list of stages, and a stage is plain data.

A stage says which parameters train (regexes on parameter names; everything else is frozen),
which losses with which weights, which data, and the optimiser and schedule. One short loop
(the trainer) consumes it, torchtune-style. Recipes are YAML files; the shipped ones
(`linvid/recipes/*.yaml`, one per paper plus small `demo_*` variants) cite where each number
comes from.

YAML layout::

    name: qwen_rwkv_vl
    description: ...
    student: qwen-rwkv-vl-25        # a conversion preset (linvid.models.plan.PRESETS)
    transv: null                    # a TransV schedule for apply_transv ("paper"), or null
    defaults: {...}                 # stage fields shared by every stage (a stage overrides)
    stages:
      - name: rwkv
        trainable: ['\\.self_attn\\.mixer\\.']
        losses: {kl: 1.0}
        ...

Trainable and parameter-group patterns are searched (`re.search`) in parameter names, so they
also match inside a peft-wrapped model. `{converted}` in a pattern stands for the decoder layer
indices the model's conversion plan replaced, e.g. `layers\\.{converted}\\.` is every
converted decoder layer.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from linvid.distill.losses import HIDDEN_REDUCTIONS
from linvid.eval.prompts import PROMPT_STYLES

LOSSES = ("kl", "hidden", "sequence", "ce")
SCHEDULES = ("cosine", "constant")
CONVERTED = "{converted}"
# Stage fields of video / image sampling -> whether each is an integer (all must be > 0).
SAMPLING_FIELDS = {
    "fps": False,
    "max_frames": True,
    "min_pixels": True,
    "max_pixels": True,
    "image_max_pixels": True,
}


def _stage_error(stage: str, name: str, expected: str, given) -> ValueError:
    return ValueError(f"stage {stage!r}: field {name!r} must be {expected}, got {given!r}")


def _number(stage: str, name: str, value, *, integer: bool = False) -> float | int:
    """A YAML scalar as a number; strings like '1e-4' (YAML 1.1 reads them as text) parse too."""
    expected = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise _stage_error(stage, name, expected, value)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _stage_error(stage, name, expected, value) from None
    if not isinstance(value, int | float):
        raise _stage_error(stage, name, expected, value)
    if integer:
        if value != int(value):
            raise _stage_error(stage, name, expected, value)
        return int(value)
    return float(value)


def _pattern(stage: str, name: str, pattern) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise _stage_error(stage, name, "a non-empty regex string", pattern)
    try:
        re.compile(pattern.replace(CONVERTED, "0"))
    except re.error as error:
        raise _stage_error(stage, name, f"a valid regex ({error})", pattern) from None
    return pattern


def _reject_unknown(stage: str, what: str, data: dict, known) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"stage {stage!r}: unknown {what} fields {unknown}; expected some of {sorted(known)}"
        )


@dataclass(frozen=True)
class AdamW:
    """torch.optim.AdamW settings. Weight decay applies to >= 2-D parameters only."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    @staticmethod
    def from_dict(stage: str, data) -> AdamW:
        if not isinstance(data, dict):
            raise _stage_error(stage, "optimizer", "a mapping {betas, eps, weight_decay}", data)
        _reject_unknown(stage, "optimizer", data, [f.name for f in dataclasses.fields(AdamW)])
        betas = data.get("betas", AdamW.betas)
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise _stage_error(stage, "optimizer.betas", "two numbers [beta1, beta2]", betas)
        betas = tuple(_number(stage, "optimizer.betas", beta) for beta in betas)
        if not all(0 <= beta < 1 for beta in betas):
            raise _stage_error(stage, "optimizer.betas", "two numbers in [0, 1)", betas)
        eps = _number(stage, "optimizer.eps", data.get("eps", AdamW.eps))
        if eps <= 0:
            raise _stage_error(stage, "optimizer.eps", "> 0", eps)
        decay = _number(stage, "optimizer.weight_decay", data.get("weight_decay", 0.0))
        if decay < 0:
            raise _stage_error(stage, "optimizer.weight_decay", ">= 0", decay)
        return AdamW(betas=betas, eps=eps, weight_decay=decay)


@dataclass(frozen=True)
class ParameterGroup:
    """Trainable parameters whose names match `pattern` use `learning_rate` (e.g. TransV)."""

    pattern: str
    learning_rate: float


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters inserted before the stage (paper 003 §3.2.2 eq. 12).

    target_modules: a regex full-matched against module names (peft's rule for a string).
    The adapters' own parameters (`lora_` in their names) train in addition to `trainable`.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: str = ""

    def peft_config(self):
        """This LoRA as a peft.LoraConfig."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
        )


@dataclass(frozen=True)
class Stage:
    """One distillation stage (see the module docstring for the YAML form).

    trainable: regexes on parameter names; a parameter trains iff one matches. Each must
        match something (checked against the model by `freeze_for_stage`).
    losses: loss name ("kl", "hidden", "sequence", "ce") -> weight; weight 0 keeps a term
        documented but off.
    temperature: softmax temperature of the "kl" loss (paper 003 eq. 7).
    learning_rate: peak lr of every trainable parameter not in a `parameter_groups` entry.
    warmup_ratio: fraction of the stage's steps with linear warmup from 0 (in [0, 1)).
    schedule: "cosine" (decay to `min_learning_rate_ratio` * peak at the last step) or
        "constant" (after warmup).
    steps or epochs: the stage length, exactly one of them.
    batch_size: samples per optimizer step over all processes (the papers' "batch size");
        split into `gradient_accumulation` micro-batches per process.
    max_sequence_length: longest tokenised sample; longer ones are truncated or skipped by
        the data loader.
    data: the name or path of the stage's data, resolved by linvid.distill's data loading.
    tome_keep_ratio / tokens_per_frame: video token compression during the stage (at most
        one): the fraction of ViT tokens kept (paper 001) or tokens per frame (paper 002).
    transv: TransV on (True) or off (False) for this stage; None leaves the model as built.
    fail_on_bad_samples: raise on an undecodable sample instead of skipping and counting it.
    hidden_reduction: the "hidden" loss's scale: "paper" (paper 003 eq. 6: squared distance
        summed over channels, mean over tokens and layers) or "mean" (also divided by the
        hidden size; see `hidden_mse`).
    prompt_style: "standard" (video, then question) or "sandwich" (question, video,
        question; paper 001 §3.2.3) for the turn holding the video.
    fps / max_frames: video frame sampling (qwen-vl-utils' rule: `fps` frames per second,
        at most `max_frames`, uniformly spread over the video when it is longer); None keeps
        the data loader's default (1 fps, at most 768 frames).
    min_pixels / max_pixels: bounds on each sampled video frame's area (H x W, before
        patching); None keeps Qwen2.5-VL's video defaults (128 and 768 x 28 x 28).
    image_max_pixels: the largest area of an image of an image conversation; None keeps the
        teacher processor's image bound (transformers' default 1280 x 28 x 28).
    `linvid distill --fps/--max-frames/--num-frames/--min-pixels/--max-pixels` override the
    video fields for every stage (`video_sampling`). The training dtype is not a stage field:
    accelerate's mixed_precision (configs/accelerate/*.yaml: bf16 on GPUs, as the papers
    train) decides it for the whole run.
    """

    name: str
    trainable: tuple[str, ...]
    losses: dict[str, float]
    learning_rate: float
    batch_size: int
    data: str
    steps: int | None = None
    epochs: float | None = None
    temperature: float = 1.0
    optimizer: AdamW = field(default_factory=AdamW)
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    min_learning_rate_ratio: float = 0.0
    parameter_groups: tuple[ParameterGroup, ...] = ()
    gradient_accumulation: int = 1
    max_sequence_length: int | None = None
    lora: LoRA | None = None
    tome_keep_ratio: float | None = None
    tokens_per_frame: int | None = None
    transv: bool | None = None
    fail_on_bad_samples: bool = True
    prompt_style: str = "standard"
    hidden_reduction: str = "paper"
    fps: float | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    image_max_pixels: int | None = None

    @staticmethod
    def from_dict(data) -> Stage:
        """A validated stage from its YAML mapping; ValueErrors name the stage and field."""
        if not isinstance(data, dict):
            raise ValueError(f"a stage must be a mapping, got {data!r}")
        stage = data.get("name")
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"every stage needs a non-empty string 'name', got {stage!r}")
        known = [f.name for f in dataclasses.fields(Stage)]
        _reject_unknown(stage, "stage", data, known)
        for required in ("trainable", "losses", "learning_rate", "batch_size", "data"):
            if required not in data:
                raise ValueError(f"stage {stage!r}: missing required field {required!r}")
        values = dict(data)

        trainable = data["trainable"]
        if isinstance(trainable, str) or not isinstance(trainable, list) or not trainable:
            raise _stage_error(stage, "trainable", "a non-empty list of regexes", trainable)
        values["trainable"] = tuple(_pattern(stage, "trainable", item) for item in trainable)

        losses = data["losses"]
        if not isinstance(losses, dict) or not losses:
            raise _stage_error(stage, "losses", f"a mapping from {LOSSES} to weights", losses)
        unknown = sorted(set(losses) - set(LOSSES))
        if unknown:
            raise _stage_error(stage, "losses", f"loss names among {LOSSES}", unknown)
        values["losses"] = {name: _number(stage, f"losses.{name}", w) for name, w in losses.items()}
        if any(weight < 0 for weight in values["losses"].values()):
            raise _stage_error(stage, "losses", "non-negative weights", losses)
        if not any(weight > 0 for weight in values["losses"].values()):
            raise _stage_error(stage, "losses", "at least one positive weight", losses)

        def positive(name, integer=False):
            value = _number(stage, name, data[name], integer=integer)
            if value <= 0:
                raise _stage_error(stage, name, "> 0", data[name])
            values[name] = value

        positive("learning_rate")
        positive("batch_size", integer=True)
        for name, integer in (("gradient_accumulation", True), ("temperature", False)):
            if name in data:
                positive(name, integer)
        if values.get("batch_size") % values.get("gradient_accumulation", 1):
            raise _stage_error(
                stage,
                "gradient_accumulation",
                f"a divisor of batch_size {values['batch_size']}",
                values.get("gradient_accumulation"),
            )
        if not isinstance(data["data"], str) or not data["data"]:
            raise _stage_error(stage, "data", "a non-empty dataset name or path", data["data"])

        if (data.get("steps") is None) == (data.get("epochs") is None):
            raise ValueError(
                f"stage {stage!r}: needs exactly one of 'steps' or 'epochs', got "
                f"steps={data.get('steps')!r}, epochs={data.get('epochs')!r}"
            )
        for name, integer in (("steps", True), ("epochs", False), ("max_sequence_length", True)):
            if data.get(name) is not None:
                positive(name, integer)

        if "optimizer" in data:
            values["optimizer"] = AdamW.from_dict(stage, data["optimizer"])
        if "warmup_ratio" in data:
            warmup = _number(stage, "warmup_ratio", data["warmup_ratio"])
            if not 0 <= warmup < 1:
                raise _stage_error(stage, "warmup_ratio", "in [0, 1)", data["warmup_ratio"])
            values["warmup_ratio"] = warmup
        if data.get("schedule", "cosine") not in SCHEDULES:
            raise _stage_error(stage, "schedule", f"one of {SCHEDULES}", data.get("schedule"))
        if "min_learning_rate_ratio" in data:
            ratio = _number(stage, "min_learning_rate_ratio", data["min_learning_rate_ratio"])
            if not 0 <= ratio <= 1:
                raise _stage_error(stage, "min_learning_rate_ratio", "in [0, 1]", ratio)
            values["min_learning_rate_ratio"] = ratio

        groups = data.get("parameter_groups") or []
        if not isinstance(groups, list):
            raise _stage_error(
                stage, "parameter_groups", "a list of {pattern, learning_rate}", groups
            )
        parsed = []
        for group in groups:
            if not isinstance(group, dict) or set(group) != {"pattern", "learning_rate"}:
                raise _stage_error(
                    stage, "parameter_groups", "entries with exactly pattern, learning_rate", group
                )
            rate = _number(stage, "parameter_groups.learning_rate", group["learning_rate"])
            if rate <= 0:
                raise _stage_error(stage, "parameter_groups.learning_rate", "> 0", rate)
            parsed.append(
                ParameterGroup(_pattern(stage, "parameter_groups", group["pattern"]), rate)
            )
        values["parameter_groups"] = tuple(parsed)

        if data.get("lora") is not None:
            values["lora"] = _lora(stage, data["lora"])

        if data.get("hidden_reduction", "paper") not in HIDDEN_REDUCTIONS:
            raise _stage_error(
                stage,
                "hidden_reduction",
                f"one of {HIDDEN_REDUCTIONS}",
                data.get("hidden_reduction"),
            )
        if data.get("prompt_style", "standard") not in PROMPT_STYLES:
            raise _stage_error(
                stage, "prompt_style", f"one of {PROMPT_STYLES}", data.get("prompt_style")
            )

        for name, integer in SAMPLING_FIELDS.items():
            if data.get(name) is not None:
                positive(name, integer)
        if values.get("max_frames") is not None and values["max_frames"] < 2:
            # Qwen2.5-VL patches frames in pairs (temporal_patch_size 2): 1 frame cannot fill one.
            raise _stage_error(stage, "max_frames", "an integer >= 2", data["max_frames"])
        low, high = values.get("min_pixels"), values.get("max_pixels")
        if low is not None and high is not None and low > high:
            raise _stage_error(stage, "max_pixels", f">= min_pixels ({low})", high)
        if values.get("image_max_pixels") is not None and values["image_max_pixels"] < 56 * 56:
            # Qwen2VLImageProcessor's smallest image area (its size["shortest_edge"]).
            raise _stage_error(
                stage, "image_max_pixels", "an integer >= 3136 (56 x 56)", data["image_max_pixels"]
            )

        if data.get("tome_keep_ratio") is not None and data.get("tokens_per_frame") is not None:
            raise ValueError(
                f"stage {stage!r}: set at most one of 'tome_keep_ratio' and 'tokens_per_frame'"
            )
        if data.get("tome_keep_ratio") is not None:
            ratio = _number(stage, "tome_keep_ratio", data["tome_keep_ratio"])
            if not 0 < ratio <= 1:
                raise _stage_error(stage, "tome_keep_ratio", "in (0, 1]", ratio)
            values["tome_keep_ratio"] = ratio
        if data.get("tokens_per_frame") is not None:
            positive("tokens_per_frame", integer=True)
        if data.get("transv") is not None and not isinstance(data["transv"], bool):
            raise _stage_error(stage, "transv", "true, false or null", data["transv"])
        if not isinstance(data.get("fail_on_bad_samples", True), bool):
            raise _stage_error(
                stage, "fail_on_bad_samples", "true or false", data["fail_on_bad_samples"]
            )
        return Stage(**values)

    def video_sampling(
        self,
        *,
        fps: float | None = None,
        num_frames: int | None = None,
        max_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> dict:
        """`VideoConversationDataset` sampling keywords for this stage: its own fields, each
        replaced by the matching argument that is not None (the command line's overrides).
        A `num_frames` override drops the stage's fps (they exclude each other); fields left
        None are left out, so the data loader's defaults apply. image_max_pixels comes along
        (no override)."""
        chosen = {
            "fps": self.fps if num_frames is None else None,
            "max_frames": self.max_frames,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "image_max_pixels": self.image_max_pixels,
        }
        overrides = {
            "fps": fps,
            "num_frames": num_frames,
            "max_frames": max_frames,
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
        }
        chosen.update({name: value for name, value in overrides.items() if value is not None})
        low, high = chosen.get("min_pixels"), chosen.get("max_pixels")
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"stage {self.name!r}: max_pixels {high} is below min_pixels {low} (after the "
                "command line's overrides); expected max_pixels >= min_pixels"
            )
        return {name: value for name, value in chosen.items() if value is not None}

    def micro_batch_size(self, world_size: int = 1) -> int:
        """Samples per forward pass on one process."""
        parts = self.gradient_accumulation * world_size
        if self.batch_size % parts:
            raise ValueError(
                f"stage {self.name!r}: batch_size {self.batch_size} is not divisible by "
                f"gradient_accumulation {self.gradient_accumulation} x {world_size} processes"
            )
        return self.batch_size // parts

    def total_steps(self, dataset_size: int | None = None) -> int:
        """Optimizer steps in the stage: `steps`, or `epochs` over `dataset_size` samples."""
        if self.steps is not None:
            return self.steps
        if not dataset_size:
            raise ValueError(
                f"stage {self.name!r} is measured in epochs; its step count needs the dataset "
                f"size, got {dataset_size!r}"
            )
        return max(1, math.ceil(self.epochs * dataset_size / self.batch_size))


def _lora(stage: str, data) -> LoRA:
    if not isinstance(data, dict):
        raise _stage_error(stage, "lora", "a mapping {rank, alpha, dropout, target_modules}", data)
    _reject_unknown(stage, "lora", data, [f.name for f in dataclasses.fields(LoRA)])
    for required in ("rank", "alpha", "target_modules"):
        if required not in data:
            raise ValueError(f"stage {stage!r}: field 'lora' is missing {required!r}")
    rank = _number(stage, "lora.rank", data["rank"], integer=True)
    alpha = _number(stage, "lora.alpha", data["alpha"])
    dropout = _number(stage, "lora.dropout", data.get("dropout", 0.0))
    if rank <= 0:
        raise _stage_error(stage, "lora.rank", "> 0", rank)
    if alpha <= 0:
        raise _stage_error(stage, "lora.alpha", "> 0", alpha)
    if not 0 <= dropout < 1:
        raise _stage_error(stage, "lora.dropout", "in [0, 1)", dropout)
    target = _pattern(stage, "lora.target_modules", data["target_modules"])
    return LoRA(rank=rank, alpha=alpha, dropout=dropout, target_modules=target)


@dataclass(frozen=True)
class Recipe:
    """A named sequence of stages run in order on one student.

    student: the conversion preset the stages' patterns are written for (PRESETS key).
    transv: TransV schedule applied to the student before stage 1 (`apply_transv`), or None.
    """

    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    student: str | None = None
    transv: str | None = None

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(
            f"recipe {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}"
        )

    @staticmethod
    def from_dict(data) -> Recipe:
        """A validated recipe from its YAML mapping (stage fields in `defaults` are shared)."""
        from linvid.models.plan import PRESETS

        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be a mapping, got {type(data).__name__}")
        known = ("name", "description", "student", "transv", "defaults", "stages")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown recipe fields {unknown}; expected some of {list(known)}")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a recipe needs a non-empty string 'name', got {name!r}")
        student = data.get("student")
        if student is not None and student not in PRESETS:
            raise ValueError(
                f"recipe {name!r}: student {student!r} is not a conversion preset; "
                f"expected one of {sorted(PRESETS)}"
            )
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise ValueError(f"recipe {name!r}: 'defaults' must be a mapping, got {defaults!r}")
        if "name" in defaults:
            raise ValueError(f"recipe {name!r}: 'defaults' cannot set a stage 'name'")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ValueError(f"recipe {name!r}: 'stages' must be a non-empty list")
        parsed = []
        for entry in stages:
            merged = entry
            if isinstance(entry, dict):
                merged = {**defaults, **entry}
                # A stage's own length replaces the default one, whichever unit each uses.
                for own, other in (("steps", "epochs"), ("epochs", "steps")):
                    if own in entry and other not in entry:
                        merged.pop(other, None)
            parsed.append(Stage.from_dict(merged))
        names = [stage.name for stage in parsed]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {name!r}: stage names must be unique, got {names}")
        transv = data.get("transv")
        if transv is not None and not isinstance(transv, str):
            raise ValueError(f"recipe {name!r}: 'transv' must be a schedule name, got {transv!r}")
        return Recipe(
            name=name,
            stages=tuple(parsed),
            description=str(data.get("description", "")).strip(),
            student=student,
            transv=transv,
        )


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in linvid/recipes."""
    folder = importlib.resources.files("linvid") / "recipes"
    return sorted(item.name[:-5] for item in folder.iterdir() if item.name.endswith(".yaml"))


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A validated Recipe from a YAML file path or a shipped recipe name ("linmu")."""
    path = Path(path_or_name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"recipe file not found: {path}")
        text = path.read_text()
    else:
        resource = importlib.resources.files("linvid") / "recipes" / f"{path_or_name}.yaml"
        if not resource.is_file():
            raise ValueError(
                f"unknown recipe {str(path_or_name)!r}: not a file and not a shipped recipe; "
                f"shipped: {shipped_recipes()}"
            )
        text = resource.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {str(path_or_name)!r} is not valid YAML: {error}") from None
    return Recipe.from_dict(data)


def _converted_layers(model) -> str:
    """The `{converted}` alternation, e.g. '(?:2|3)', from the model's conversion plan."""
    from linvid.models.plan import resolve_plan

    config = getattr(model, "config", None)
    plan = getattr(config, "linvid_plan", None)
    if plan is None:
        raise ValueError(
            f"a pattern uses {CONVERTED}, but the model has no conversion plan "
            "(config.linvid_plan); convert it with linvid.convert first"
        )
    text_config = getattr(config, "text_config", config)
    indices = resolve_plan(plan).layer_indices(text_config.num_hidden_layers)
    return "(?:" + "|".join(str(index) for index in indices) + ")"


def _compile(pattern: str, model) -> re.Pattern:
    if CONVERTED in pattern:
        pattern = pattern.replace(CONVERTED, _converted_layers(model))
    return re.compile(pattern)


def _no_match(stage: Stage, what: str, pattern: str, names: list[str]) -> ValueError:
    shapes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", name) for name in names))
    plain = re.sub(r"[\\^$()|?*+\[\]{}]", "", pattern)
    hint = difflib.get_close_matches(plain, shapes, n=5, cutoff=0.0) or shapes[:5]
    return ValueError(
        f"stage {stage.name!r}: {what} pattern {pattern!r} matches no parameter of the model; "
        f"parameter names look like {hint} (N = a layer index)"
    )


def trainable_parameters(model, stage: Stage) -> list[tuple[str, object]]:
    """(name, parameter) pairs that train in `stage`: names matching a `trainable` regex, plus
    LoRA adapter parameters when the stage has `lora`. Every pattern must match something."""
    named = list(model.named_parameters())
    names = [name for name, _ in named]
    chosen = set()
    for pattern in stage.trainable:
        regex = _compile(pattern, model)
        matches = {name for name in names if regex.search(name)}
        if not matches:
            raise _no_match(stage, "trainable", pattern, names)
        chosen |= matches
    if stage.lora is not None:
        adapters = {name for name in names if "lora_" in name}
        if not adapters:
            raise ValueError(
                f"stage {stage.name!r} has lora but the model has no LoRA parameters; insert "
                "them first (e.g. peft.get_peft_model(model, stage.lora.peft_config()))"
            )
        chosen |= adapters
    return [(name, parameter) for name, parameter in named if name in chosen]


def freeze_for_stage(model, stage: Stage) -> list[tuple[str, object]]:
    """Set requires_grad: True exactly for `trainable_parameters(model, stage)`; returns them."""
    trainable = trainable_parameters(model, stage)
    chosen = {name for name, _ in trainable}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    return trainable


def parameter_groups(model, stage: Stage) -> list[dict]:
    """torch optimizer param groups for the stage's trainable parameters.

    Each parameter takes the lr of the first `parameter_groups` entry whose pattern matches
    its name (else `stage.learning_rate`). As is standard (GPT-2/nanoGPT, HF Trainer), weight
    decay applies only to parameters with >= 2 dimensions: biases, norm weights and other
    1-D/scalar parameters (gates, decays, mixing coefficients) get weight_decay 0. Each group
    carries a "group" label for logging; empty groups are left out.
    """
    trainable = trainable_parameters(model, stage)
    regexes = [(_compile(group.pattern, model), group) for group in stage.parameter_groups]
    for regex, group in regexes:
        if not any(regex.search(name) for name, _ in trainable):
            raise _no_match(stage, "parameter_groups", group.pattern, [n for n, _ in trainable])
    buckets: dict[tuple[str, float, bool], list] = {}
    for name, parameter in trainable:
        label, rate = "default", stage.learning_rate
        for regex, group in regexes:
            if regex.search(name):
                label, rate = group.pattern, group.learning_rate
                break
        decay = parameter.ndim >= 2
        buckets.setdefault((label, rate, decay), []).append(parameter)
    return [
        {
            "params": params,
            "lr": rate,
            "weight_decay": stage.optimizer.weight_decay if decay else 0.0,
            "group": f"{label} ({'decay' if decay else 'no decay'})",
        }
        for (label, rate, decay), params in buckets.items()
    ]


def make_optimizer(model, stage: Stage):
    """torch.optim.AdamW over `parameter_groups(model, stage)` with the stage's betas/eps."""
    import torch

    return torch.optim.AdamW(
        parameter_groups(model, stage),
        lr=stage.learning_rate,
        betas=stage.optimizer.betas,
        eps=stage.optimizer.eps,
    )


def learning_rate_factor(step: int, total_steps: int, stage: Stage) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total_steps`.

    Linear warmup from 0 over ceil(warmup_ratio * total_steps) steps, then "constant" 1, or
    "cosine": min + (1 - min) * (1 + cos(pi * progress)) / 2 with progress going 0 -> 1 from
    the end of warmup to step `total_steps`, min = stage.min_learning_rate_ratio.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = math.ceil(stage.warmup_ratio * total_steps)
    if step < warmup:
        return step / warmup
    if stage.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    low = stage.min_learning_rate_ratio
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate_at(step: int, total_steps: int, stage: Stage) -> float:
    """The default group's lr at `step` (peak `stage.learning_rate` times the schedule)."""
    return stage.learning_rate * learning_rate_factor(step, total_steps, stage)


def lr_scheduler(optimizer, total_steps: int, stage: Stage):
    """torch LambdaLR applying `learning_rate_factor` to every group's own peak lr."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, stage)
    )
