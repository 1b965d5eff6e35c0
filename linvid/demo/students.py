"""The demo's four students and how each one is run once distilled.

Each preset is distilled with the scaled-down recipe of its paper (`linvid/recipes/demo_*`),
and is then evaluated the way that recipe trained it: the prompt style of its last stage,
its per-frame ToMe (tokens_per_frame or tome_keep_ratio) and TransV when the recipe put it
on the student.
"""

from __future__ import annotations

from linvid.distill.recipe import Recipe, load_recipe
from linvid.eval.student_view import InferenceSettings, StudentView

__all__ = ["STUDENTS", "InferenceSettings", "StudentView", "inference_settings", "student_recipe"]

# preset -> (shipped demo recipe, paper it follows)
STUDENTS = {
    "qwen-rwkv-vl-25": ("demo_qwen_rwkv_vl", "000 (hybrid RWKV-6 + scene cross-attention)"),
    "mamba2-hybrid-25": ("demo_timeviper", "002 (TimeViper: Mamba-2 hybrid, TransV, ToMe)"),
    "linmu": ("demo_linmu", "003 (LinMU: every layer M-MATE)"),
    "rwkv6-all": ("demo_auroralong", "001 (AuroraLong: all RWKV-6, sorted ToMe, sandwich)"),
}


def inference_settings(recipe: Recipe) -> InferenceSettings:
    """What the recipe's last stage trained the student for."""
    last = recipe.stages[-1]
    return InferenceSettings(
        prompt_style=last.prompt_style,
        tokens_per_frame=last.tokens_per_frame,
        keep_ratio=last.tome_keep_ratio,
        transv=recipe.transv is not None and last.transv is not False,
    )


def student_recipe(preset: str) -> Recipe:
    if preset not in STUDENTS:
        raise ValueError(f"unknown demo student {preset!r}; expected one of {list(STUDENTS)}")
    return load_recipe(STUDENTS[preset][0])
