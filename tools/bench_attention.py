#!/usr/bin/env python
"""Attention normalisation on vs off: the traced tiny Llama of ``tools/bench.py``, in one process.

Two graphs of one model: ``fxpeft.trace(...)`` (NormalizeAttention ran: ``is_causal`` and ``enable_gqa``) and
``fxpeft.trace(..., normalize_attention=False)``, each with the same LoRA (r=16, all 7 projections, dropout
0), timed alternately (A B, B A, ...) after warm-ups, like ``tools/bench.py``. Reported: median times and the
median of the per-pair ratios on/off (< 1: the pass is faster).

Usage:
  python tools/bench_attention.py                     # the default case, 2 threads
  python tools/bench_attention.py --case large --pairs 8 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench import CASES, Trainer, alternate, fx_config, summarize, timed, timed_inference  # noqa: E402

import fxpeft  # noqa: E402
from fxpeft.zoo import tiny_llama  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="default", choices=sorted(CASES))
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = CASES[args.case]
    model, _, kw = tiny_llama(case.layers, case.hidden, case.vocab, case.batch, case.seq)
    ids = kw["input_ids"]
    graphs = {}
    for name, flag in (("on", True), ("off", False)):
        gm = fxpeft.trace(model, (), kw, normalize_attention=flag)
        graphs[name] = fxpeft.rewrite(copy.deepcopy(gm), fx_config(case, 0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same non-zero adapters in both graphs
        for (_, a), (_, b) in zip(graphs["on"].named_parameters(), graphs["off"].named_parameters()):
            if a.requires_grad:
                a.copy_(torch.randn(a.shape, generator=g) * 0.02)
                b.copy_(a)
    out = {}
    trainers = {k: Trainer(gm.train(), lambda x, gm=gm: gm(input_ids=x), ids) for k, gm in graphs.items()}
    times = alternate({k: timed(t.step) for k, t in trainers.items()}, args.pairs, args.warmup)
    out["train"] = summarize(times, "on", "off")
    for gm in graphs.values():
        gm.eval()
    times = alternate({k: timed_inference(lambda gm=gm: gm(input_ids=ids)) for k, gm in graphs.items()},
                      args.pairs * 2, args.warmup)
    out["infer"] = summarize(times, "on", "off")
    for measure, s in out.items():
        print(f"{case.name} {measure:5s} on {s['ms']['on']:8.1f} ms  off {s['ms']['off']:8.1f} ms  "
              f"ratio on/off {s['ratio']:.3f} (min {s['ratio_min']:.3f}, max {s['ratio_max']:.3f}, "
              f"{s['pairs']} pairs, {args.threads} threads)")
    return out


if __name__ == "__main__":
    main()
