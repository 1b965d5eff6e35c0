"""linvid: linear-time long-video LLMs (conversion, distillation, token compression, runtime).

The plan and the math conventions of the public API are in DESIGN.md; the math lives in
`linvid.ops`. Importing linvid registers its student models with transformers' Auto classes.
"""

__version__ = "0.1.0"

from linvid.models.convert import convert, load  # noqa: E402
from linvid.models.plan import PRESETS, ConversionPlan  # noqa: E402
from linvid.models.transv import apply_transv  # noqa: E402

__all__ = ["PRESETS", "ConversionPlan", "__version__", "apply_transv", "convert", "load"]
