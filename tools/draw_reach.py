"""Draw docs/parameter_sites.png: a cross-attention whose packed ``in_proj`` is read through three slices, adapted
as one parameter site (the README's "Sites PEFT does not reach"). Run: ``python tools/draw_reach.py``."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

import fxpeft


class SlicedCrossAttention(nn.Module):
    """One packed ``in_proj`` [3E, E] sliced into q / k / v, each applied with ``F.linear``: no nn.Linear to swap."""

    def __init__(self, e: int = 8) -> None:
        super().__init__()
        self.in_proj = nn.Parameter(torch.randn(3 * e, e) / 3)
        self.out = nn.Linear(e, e)
        self.e = e

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        e = self.e
        q = nn.functional.linear(x, self.in_proj[:e])
        k = nn.functional.linear(mem, self.in_proj[e:2 * e])
        v = nn.functional.linear(mem, self.in_proj[2 * e:])
        return self.out(torch.softmax(q @ k.transpose(1, 2) / e ** 0.5, -1) @ v)


def main(out: str = "docs/parameter_sites.png") -> Path:
    torch.manual_seed(0)
    model = SlicedCrossAttention().eval()
    gm = fxpeft.trace(model, (torch.randn(2, 5, 8), torch.randn(2, 3, 8)))
    before = copy.deepcopy(gm)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=[], target_parameters=["in_proj"]))
    fxpeft.draw(gm, out, before=before)
    return Path(out)


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
