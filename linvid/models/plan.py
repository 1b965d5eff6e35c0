"""Which decoder layers a conversion replaces, with what, and how the new mixers start.

`ConversionPlan` is plain data: it is stored in a converted model's config (`linvid_plan`) so
that `from_pretrained` can rebuild the same structure, and it is what recipes and the CLI name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from linvid.layers.cross_attention import GATES
from linvid.layers.mmate import BRANCHES

MIXERS = ("rwkv6", "rwkv6_hybrid", "mamba2", "mmate")
PLACEMENTS = ("early", "middle", "late")
INITS = ("transfer", "random")


@dataclass(frozen=True)
class ConversionPlan:
    """A student architecture relative to its teacher.

    mixer: "rwkv6" (RWKV-6 time mixing, paper 000/001), "rwkv6_hybrid" (RWKV-6 plus gated
        cross-attention to scene tokens, paper 000 Fig. 1), "mamba2" (paper 002), "mmate"
        (Flex-MA + Local-Swin, paper 003).
    layers: explicit decoder layer indices to replace; or
    fraction + placement: replace round(fraction * n) evenly spaced layers, stride n / count,
        each at the start ("early"), middle or end ("late") of its stride block. fraction 1.0
        replaces every layer.
    init: "transfer" initialises the mixers from the attention weights (W_Q, W_K, W_V, W_O);
        "random" draws the sequence mixer's projections anew instead (an ablation baseline):
        the RWKV-6 time mix, Mamba-2 or both M-MATE branches. The scene cross-attention of
        "rwkv6_hybrid" still starts from the attention (paper 000 Table 4 ablates the RWKV
        initialisation only).
    gate: "rwkv6_hybrid"'s cross-attention gate, "dynamic" (g_d * g_s, paper 000 eq. 12) or
        "static" (g_s alone, Table 4's ablation).
    branches: "mmate"'s branches, "both" (paper 003 Algorithm 1), "flex" or "swin" alone
        (paper 003 Table 4's ablations).
    max_scenes, scene_threshold: scene segmentation for "rwkv6_hybrid" (paper 000 §4.1,
        K = 15 boundaries, tau = 0.6).
    window, swin_shift: Local-Swin window (T, H, W) for "mmate" (paper 003: 16 x 4 x 4).
    """

    mixer: str
    layers: tuple[int, ...] | None = None
    fraction: float | None = None
    placement: str = "late"
    init: str = "transfer"
    max_scenes: int = 16
    scene_threshold: float = 0.6
    window: tuple[int, int, int] = (16, 4, 4)
    gate: str = "dynamic"
    branches: str = "both"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; expected one of {MIXERS}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; expected one of {PLACEMENTS}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}")
        if (self.layers is None) == (self.fraction is None):
            raise ValueError(
                "a plan needs exactly one of layers (explicit indices) or fraction, "
                f"got layers={self.layers!r}, fraction={self.fraction!r}"
            )
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(index) for index in self.layers))
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers has duplicates: {self.layers}")
        object.__setattr__(self, "window", tuple(int(size) for size in self.window))
        if self.max_scenes < 1:
            raise ValueError(f"max_scenes must be >= 1, got {self.max_scenes}")
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; expected one of {GATES}")
        if self.gate != "dynamic" and self.mixer != "rwkv6_hybrid":
            raise ValueError(
                f"gate {self.gate!r} applies to the rwkv6_hybrid mixer's cross-attention only, "
                f"not to {self.mixer!r}"
            )
        if self.branches not in BRANCHES:
            raise ValueError(f"unknown branches {self.branches!r}; expected one of {BRANCHES}")
        if self.branches != "both" and self.mixer != "mmate":
            raise ValueError(
                f"branches {self.branches!r} applies to the mmate mixer only, not to {self.mixer!r}"
            )

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The decoder layers this plan replaces in a model with `num_layers` layers."""
        if self.layers is not None:
            bad = [index for index in self.layers if not 0 <= index < num_layers]
            if bad:
                raise ValueError(
                    f"layer indices {bad} are out of range for a model with {num_layers} "
                    f"decoder layers (valid: 0..{num_layers - 1})"
                )
            return tuple(sorted(self.layers))
        count = max(1, round(self.fraction * num_layers))
        stride = num_layers / count
        offset = {"early": 0.0, "middle": (stride - 1) / 2, "late": stride - 1}[self.placement]
        return tuple(min(num_layers - 1, math.floor(i * stride + offset)) for i in range(count))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        data["window"] = list(self.window)
        return data

    @staticmethod
    def from_dict(data: dict) -> ConversionPlan:
        known = {item.name for item in dataclasses.fields(ConversionPlan)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown conversion plan fields {unknown}; expected {sorted(known)}")
        return ConversionPlan(**data)


PRESETS = {
    # paper 000: 25% / 50% of the decoder layers, late placement, hybrid RWKV layers.
    "qwen-rwkv-vl-25": ConversionPlan(mixer="rwkv6_hybrid", fraction=0.25, placement="late"),
    "qwen-rwkv-vl-50": ConversionPlan(mixer="rwkv6_hybrid", fraction=0.5, placement="late"),
    # paper 002: a Mamba-2 / attention hybrid (Nemotron-Nano-v2 keeps ~1/8 attention; here 25%
    # of a Transformer's layers become Mamba-2, late, to start from a strong teacher).
    "mamba2-hybrid-25": ConversionPlan(mixer="mamba2", fraction=0.25, placement="late"),
    # paper 003: every attention layer becomes an M-MATE block.
    "linmu": ConversionPlan(mixer="mmate", fraction=1.0),
    # paper 001: an all-RWKV-6 language model.
    "rwkv6-all": ConversionPlan(mixer="rwkv6", fraction=1.0),
}


def resolve_plan(plan: ConversionPlan | str | dict) -> ConversionPlan:
    """A plan from a preset name, a dict (a saved config) or a plan."""
    if isinstance(plan, ConversionPlan):
        return plan
    if isinstance(plan, str):
        if plan not in PRESETS:
            raise ValueError(f"unknown preset {plan!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[plan]
    if isinstance(plan, dict):
        return ConversionPlan.from_dict(plan)
    raise ValueError(f"plan must be a ConversionPlan, a preset name or a dict, got {type(plan)}")
