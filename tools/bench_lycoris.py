"""fxpeft vs HF PEFT for LoHa and LoKr: a train step (and unmerged inference) on ``tools/bench.py``'s default case.

The model, data, targets, loss, optimizer and the interleaved timing (``alternate``: rounds of A B / B A with the
order rotated, the ratio of each round's pair, their median) are ``bench.py``'s own, imported from it. Both sides
get the same adapter weights (a PEFT adapter saved with ``init_weights=False`` and loaded into the graph), and
their logits are checked equal before timing. The machine is shared: the load average is printed at start and
end.

    python tools/bench_lycoris.py                     # loha and lokr, train + infer, 7 pairs, 2 threads
    python tools/bench_lycoris.py --methods lokr --pairs 9 --measures train
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench import CASES, TARGETS, Trainer, alternate, summarize, timed, timed_inference  # noqa: E402

import fxpeft  # noqa: E402
from fxpeft.zoo import tiny_llama  # noqa: E402


def peft_config(method: str, r: int, alpha: int, **kw):
    import peft

    cls = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[method]
    return cls(r=r, alpha=alpha, target_modules=TARGETS, init_weights=False, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="loha,lokr")
    ap.add_argument("--measures", default="train,infer")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", default="default", choices=sorted(CASES))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft

    case = CASES[args.case]
    print(f"load average at start: {os.getloadavg()}; torch {torch.__version__}, {args.threads} threads; case "
          f"{case.name}: hidden {case.hidden}, {case.layers} layers, batch {case.batch}x{case.seq}, r={case.r}, "
          f"alpha={case.alpha}, targets {TARGETS}", flush=True)
    model, _, kw = tiny_llama(case.layers, case.hidden, case.vocab, case.batch, case.seq)
    ids = kw["input_ids"]
    base_gm = fxpeft.trace(model, (), kw)
    rows = []
    for method in args.methods.split(","):
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(model), peft_config(method, case.r, case.alpha))
        with tempfile.TemporaryDirectory() as d:
            pm.save_pretrained(d)
            gm = fxpeft.load_adapter(copy.deepcopy(base_gm), d)
        pm.eval(), gm.eval()
        with torch.no_grad():
            ref = pm(input_ids=ids, use_cache=False).logits
            got = gm(input_ids=ids).logits
        rel = ((got - ref).double().norm() / ref.double().norm()).item()
        n_fx, n_peft = fxpeft.get_nb_trainable_parameters(gm)[0], pm.get_nb_trainable_parameters()[0]
        print(f"[{method}] eval logits rel err vs PEFT {rel:.2e}; trainable params fxpeft {n_fx:,} PEFT {n_peft:,}",
              flush=True)
        if "train" in args.measures:
            gm.train(), pm.train()
            trainers = {"fxpeft": Trainer(gm, lambda i, g=gm: g(input_ids=i), ids),
                        "peft": Trainer(pm, lambda i, p=pm: p(input_ids=i, use_cache=False), ids)}
            times = alternate({k: timed(t.step) for k, t in trainers.items()}, args.pairs, args.warmup)
            rows.append((method, "train step", summarize(times, "fxpeft", "peft")))
        if "infer" in args.measures:
            gm.eval(), pm.eval()
            times = alternate({"fxpeft": timed_inference(lambda g=gm: g(input_ids=ids)),
                               "peft": timed_inference(lambda p=pm: p(input_ids=ids, use_cache=False))},
                              args.pairs, args.warmup)
            rows.append((method, "unmerged inference", summarize(times, "fxpeft", "peft")))
        for m, what, s in rows[-2:] if "train" in args.measures and "infer" in args.measures else rows[-1:]:
            print(f"[{m}] {what}: fxpeft {s['ms']['fxpeft']:.1f} ms, PEFT {s['ms']['peft']:.1f} ms, ratio "
                  f"{s['ratio']:.3f} [{s['ratio_min']:.2f}-{s['ratio_max']:.2f}] over {s['pairs']} pairs", flush=True)
    print("\n| method | measure | fxpeft | PEFT | ratio (median of pairs) [min-max] |\n|---|---|---:|---:|---:|")
    for m, what, s in rows:
        print(f"| {m} | {what} | {s['ms']['fxpeft']:.1f} ms | {s['ms']['peft']:.1f} ms | {s['ratio']:.3f} "
              f"[{s['ratio_min']:.2f}–{s['ratio_max']:.2f}] |")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
