"""Make the README's picture (``docs/llama_lora.png``) and measure drawing a 16-layer rewritten Llama.

Usage::

    python tools/readme_pictures.py                 # picture + figures, printed
    python tools/readme_pictures.py --write-readme  # also put the figures into README.md (viz-figures markers)

The drawing itself is :func:`fxpeft.draw`; this script only drives it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import fxpeft
from fxpeft import zoo

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def picture(out: Path, dpi: int) -> Path:
    """The README picture: a 2-layer tiny Llama with LoRA on q_proj and v_proj (fused, as rewrite does)."""
    ex = zoo.tiny_llama(layers=2)
    gm = fxpeft.trace(ex.model, ex.args, ex.kwargs)
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return fxpeft.draw(gm, out, dpi=dpi)


def measure(layers: int, repeats: int) -> dict:
    """Render time (first call, and best of ``repeats``) and SVG size of a rewritten ``layers``-layer Llama."""
    ex = zoo.tiny_llama(layers=layers)
    gm = fxpeft.trace(ex.model, ex.args, ex.kwargs)
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    figures = {"layers": layers, "fx_nodes": len(gm.graph.nodes), "sites": len(fxpeft.adapters(gm))}
    with tempfile.TemporaryDirectory() as tmp:
        for key, kw in (("folded", {}), ("unfolded", {"fold_repeats": False})):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                path = fxpeft.draw(gm, os.path.join(tmp, f"{key}.svg"), **kw)
                times.append(time.perf_counter() - t)
            figures[key] = {"first_s": times[0], "best_s": min(times), "svg_kB": path.stat().st_size / 1e3}
    return figures


def table(f: dict) -> str:
    cpu = f"{os.cpu_count()} CPU cores, torch {torch.__version__.split('+')[0]}, {torch.get_num_threads()} threads"
    rows = [f"Drawing `tiny_llama(layers={f['layers']})` after LoRA on {', '.join(TARGETS)} "
            f"({f['sites']} sites, {f['fx_nodes']} FX nodes) to SVG ({cpu}; `python tools/readme_pictures.py`):",
            "", "| `fxpeft.draw` | render time (first call / best of 3) | SVG size |", "|---|---|---|"]
    for key, label in (("folded", f"default (the {f['layers']} layers drawn once, ×{f['layers']})"),
                       ("unfolded", "`fold_repeats=False`")):
        x = f[key]
        rows.append(f"| {label} | {x['first_s']:.2f} s / {x['best_s']:.2f} s | {x['svg_kB']:.0f} kB |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "llama_lora.png"))
    p.add_argument("--dpi", type=int, default=80)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--write-readme", action="store_true")
    args = p.parse_args(argv)
    path = picture(Path(args.out), args.dpi)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    text = table(measure(args.layers, repeats=3))
    print(text)
    if args.write_readme:
        readme = ROOT / "README.md"
        src = readme.read_text()
        start, end = "<!-- viz-figures:start -->\n", "<!-- viz-figures:end -->"
        if start not in src or end not in src:
            print("README.md has no viz-figures markers; not written", file=sys.stderr)
            return 1
        i, j = src.index(start) + len(start), src.index(end)
        readme.write_text(src[:i] + text + src[j:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
