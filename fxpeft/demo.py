"""The main job: trace a tiny Llama → LoRA rewrite → train a few steps → merge → export → draw.

Run it with ``fxpeft demo`` (or ``python -m fxpeft.demo``). It needs ``transformers`` (the ``test`` extra).
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["run_demo", "tiny_llama"]


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 256, seed: int = 0):
    """A randomly initialised tiny HF Llama built from a config (no hub access) and example inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, vocab, (2, 16))
    return model, {"input_ids": ids, "use_cache": False}


def run_demo(out_dir: str = "fxpeft-demo", steps: int = 30, draw: bool = True) -> dict:
    """Run the whole pipeline on a tiny Llama, print what each stage did, and return the figures.

    Example:
        >>> from fxpeft.demo import run_demo
        >>> r = run_demo("/tmp/fxpeft-demo", steps=3, draw=False)  # doctest: +SKIP
    """
    import fxpeft

    os.makedirs(out_dir, exist_ok=True)
    model, kwargs = tiny_llama()
    ids = kwargs["input_ids"]
    report: dict = {}

    t = time.perf_counter()
    gm = fxpeft.trace(model, kwargs=kwargs)
    report["trace_s"] = time.perf_counter() - t
    sites = fxpeft.list_sites(gm)
    print(f"[trace]   torch.export captured {type(model).__name__}: {len(gm.graph.nodes)} nodes, "
          f"{len(sites)} targetable sites ({report['trace_s']:.2f}s)")

    config = fxpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    t = time.perf_counter()
    gm = fxpeft.rewrite(gm, config)
    report["rewrite_s"] = time.perf_counter() - t
    adapters = fxpeft.adapters(gm)
    print(f"[rewrite] LoRA r=8 (all-linear) on {len(adapters)} sites ({report['rewrite_s'] * 1e3:.1f} ms); ", end="")
    fxpeft.print_trainable_parameters(gm)
    with torch.no_grad():
        gm.eval()
        same = torch.equal(gm(input_ids=ids).logits, model(**kwargs).logits)
    print(f"[rewrite] outputs at init identical to the eager model: {same}")

    # A small task the adapter can learn: counting (each next token is the current one plus one).
    torch.manual_seed(1)
    data = (torch.randint(0, 256, (8, 1)) + torch.arange(33)) % 256
    base_before = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    losses = []
    for step in range(steps):
        logits = gm(input_ids=data[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            print(f"[train]   step {step:3d}  loss {loss.item():.4f}")
    gm.eval()
    base_same = all(torch.equal(p, base_before[n]) for n, p in gm.named_parameters() if n in base_before)
    print(f"[train]   loss {losses[0]:.3f} -> {losses[-1]:.3f}; base weights bit-identical: {base_same}")
    report["losses"] = losses

    with torch.no_grad():
        unmerged = gm(input_ids=data[:, :-1]).logits
    t = time.perf_counter()
    merged = fxpeft.merge(gm)
    report["merge_s"] = time.perf_counter() - t
    with torch.no_grad():
        after = merged(input_ids=data[:, :-1]).logits
    rel = ((after - unmerged).norm() / unmerged.norm()).item()
    report["merge_rel_err"] = rel
    print(f"[merge]   folded {len(adapters)} adapters in {report['merge_s'] * 1e3:.1f} ms; adapter modules left: "
          f"{len(fxpeft.adapters(merged))}; merged vs unmerged rel err {rel:.2e}")

    path = os.path.join(out_dir, "model.pt2")
    fxpeft.export(merged, path, kwargs=kwargs)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        reloaded = loaded(input_ids=data[:, :-1], use_cache=False).logits
    report["export_max_abs"] = (reloaded - after).abs().max().item()
    print(f"[export]  wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB); torch.export.load(...).module() "
          f"matches: max abs diff {report['export_max_abs']:.1e}")

    if draw:
        _draw(out_dir, report)
    return report


def _draw(out_dir: str, report: dict) -> None:
    """Draw the rewritten graph of a fresh tiny Llama (the visualiser lives in :mod:`fxpeft.viz`)."""
    import fxpeft

    try:
        from fxpeft import draw  # type: ignore[attr-defined]
    except ImportError:
        print("[draw]    skipped: this fxpeft has no visualiser")
        return
    model, kwargs = tiny_llama()
    gm = fxpeft.rewrite(fxpeft.trace(model, kwargs=kwargs),
                        fxpeft.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    path = os.path.join(out_dir, "graph.svg")
    try:
        draw(gm, path)
        print(f"[draw]    wrote {path}")
        report["draw"] = path
    except Exception as e:  # the visualiser names the fix (e.g. install Graphviz); the demo still ends well
        print(f"[draw]    {type(e).__name__}: {e}")


if __name__ == "__main__":
    run_demo()
