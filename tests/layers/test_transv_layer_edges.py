"""TransV's token choice (paper 002 eq. 5) at its input check: scores that are not (B, N) get a
message naming what was given. Written for the surviving mutants of issue 18's mutation run."""

import torch
from test_layer_edges import raises_exactly

from linvid.layers.transv import attention_keep


def test_attention_keep_names_the_shape_of_scores_that_are_not_two_dimensional():
    with raises_exactly("scores must be (B, N), got shape (6,)"):
        attention_keep(torch.rand(6), 0.5)
    with raises_exactly("scores must be (B, N), got shape (1, 2, 6)"):
        attention_keep(torch.rand(1, 2, 6), 0.5)
