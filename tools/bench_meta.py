"""Rewrite before loading: a 70B-shaped Llama traced and rewritten on the meta device, and a ~1 GB checkpoint
streamed into a graph traced on meta weights, with the peak memory of each step.

    python tools/bench_meta.py                  # both parts; prints a markdown table
    python tools/bench_meta.py --part 70b       # only the meta-device trace + rewrite

Each part runs in a fresh process, so its peak RSS (``ru_maxrss``) is its own. The streaming part first saves a
real model (its own process), then a second process builds the same config under ``fxpeft.empty_weights``, traces
it and calls ``fxpeft.load_weights``; its goal is a peak RSS within the model's size plus one shard (plus the
interpreter and libraries, measured as the RSS before loading).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

LLAMA_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8)
ONE_GB = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=4)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part_70b() -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxpeft

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_70B)).eval()
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    t = time.perf_counter()
    gm = fxpeft.trace(model, (), {"input_ids": ids, "use_cache": False})
    trace_s = time.perf_counter() - t
    t = time.perf_counter()
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=16, target_modules="all-linear"))
    rewrite_s = time.perf_counter() - t
    n = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    return {"part": "70b", "trace_s": trace_s, "rewrite_s": rewrite_s, "adapter_params": n, "peak_rss_mb": _peak_mb()}


def part_save(directory: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ONE_GB)).eval()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="200MB")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"part": "save", "model_mb": size / 2**20}


def part_load(directory: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxpeft

    with fxpeft.empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**ONE_GB)).eval()
    gm = fxpeft.trace(model, (), {"input_ids": torch.zeros(1, 16, dtype=torch.long), "use_cache": False})
    before = _rss_mb()
    t = time.perf_counter()
    fxpeft.load_weights(gm, directory)
    load_s = time.perf_counter() - t
    shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    biggest = max(os.path.getsize(os.path.join(directory, f)) for f in shards) / 2**20
    with torch.no_grad():
        gm(input_ids=torch.zeros(1, 8, dtype=torch.long))
    return {"part": "load", "load_s": load_s, "rss_before_load_mb": before, "peak_rss_mb": _peak_mb(),
            "largest_shard_mb": biggest, "shards": len(shards)}


def _child(part: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", part, *extra], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["70b", "stream", "all"], default="all")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        fn = {"70b": part_70b, "save": part_save, "load": part_load}[args.child]
        print(json.dumps(fn(*args.rest)))
        return 0
    rows = []
    if args.part in ("70b", "all"):
        r = _child("70b")
        rows.append(f"| 70B-shaped Llama on meta (80 layers, hidden 8192) | trace {r['trace_s']:.1f} s, rewrite "
                    f"(LoRA r16, all-linear) {r['rewrite_s']:.2f} s | peak RSS {r['peak_rss_mb']:.0f} MB |")
    if args.part in ("stream", "all"):
        with tempfile.TemporaryDirectory() as d:
            s = _child("save", d)
            r = _child("load", d)
        budget = r["rss_before_load_mb"] + s["model_mb"] + r["largest_shard_mb"]
        rows.append(f"| stream a {s['model_mb']:.0f} MB checkpoint ({r['shards']} shards, largest "
                    f"{r['largest_shard_mb']:.0f} MB) into a meta-traced graph | load {r['load_s']:.1f} s | peak RSS "
                    f"{r['peak_rss_mb']:.0f} MB (RSS before loading {r['rss_before_load_mb']:.0f} MB + model + one "
                    f"shard = {budget:.0f} MB: {'within' if r['peak_rss_mb'] <= budget else 'over'}) |")
    print("| case | time | memory |\n|---|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
