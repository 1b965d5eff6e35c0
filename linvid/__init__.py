"""linvid: linear-time long-video LLMs (conversion, distillation, token compression, runtime).

The plan and the math conventions of the public API are in DESIGN.md; the math lives in
`linvid.ops`.
"""

__version__ = "0.1.0"
