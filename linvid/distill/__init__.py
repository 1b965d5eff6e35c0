"""Distillation engine: losses, stage recipes, data and the training loop (DESIGN.md, distill/)."""
