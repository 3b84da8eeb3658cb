"""tools/draw_reach.py draws the README's parameter-site picture: the packed in_proj adapted before its three slices."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import fxpeft

_SPEC = importlib.util.spec_from_file_location("draw_reach", Path(__file__).parents[2] / "tools" / "draw_reach.py")
draw_reach = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(draw_reach)


def test_draws_the_sliced_in_proj_picture_and_no_module_swap_reaches_it(tmp_path):
    model = draw_reach.SlicedCrossAttention()
    gm = fxpeft.trace(model, (torch.randn(2, 5, 8), torch.randn(2, 3, 8)))
    assert "in_proj" in fxpeft.sites.unreached_weights(gm)  # no call site reads it whole
    out = draw_reach.main(str(tmp_path / "reach.dot"))
    text = out.read_text()
    assert "in_proj" in text and text.count("slice") >= 3 and "LoRA" in text
