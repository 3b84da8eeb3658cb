"""Train a rewritten graph under FSDP2, sharded per decoder layer: a tiny HF Llama, traced, LoRA inserted, each layer
outlined into a module of its own and ``fully_shard``-ed, then the root.

    torchrun --nproc-per-node 2 examples/fsdp_train.py                 # gloo on CPU; NCCL when CUDA is there
    python examples/fsdp_train.py --world 1                            # the same global batches in one process
    torchrun --nproc-per-node 2 examples/fsdp_train.py --bf16          # frozen bf16 base, fp32 adapters
    torchrun --nproc-per-node 2 examples/fsdp_train.py --measure       # per-rank memory, 8 layers x hidden 512

Every rank builds the same graph (same seed). :func:`fxpeft.shard` outlines the repeated blocks
(``model.layers.<k>``) and shards each, then the root: a rank keeps ``1/world`` of every parameter, and a layer's
full weights exist only while that layer runs (forward, and again in backward).

Each step takes one *global* batch (the same on every rank) and gives rank ``k`` its rows ``k::world``. FSDP2
averages the ranks' gradients in its reduce-scatter, so a step is the single-process step on the global batch:
``run(world=1)`` and ``run(world=2)`` give the same loss curve (tests/examples/test_fsdp_train.py checks it to
rel ≤ 1e-5 in fp32).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxpeft
from fxpeft.zoo import tiny_llama

VOCAB, SEQ = 256, 16


def build(seed: int = 0, *, layers: int = 2, hidden: int = 64, dtype: torch.dtype = torch.float32,
          ) -> torch.fx.GraphModule:
    """The same rewritten graph on every rank: a tiny Llama (base in ``dtype``) traced with dynamic batch, LoRA on
    q/v (fp32 adapters on a bf16 base, PEFT's ``autocast_adapter_dtype``)."""
    model, _, kw = tiny_llama(layers=layers, hidden=hidden, vocab=VOCAB, batch=2, seq=SEQ, seed=seed)
    gm = fxpeft.trace(model.to(dtype), (), kw)
    torch.manual_seed(seed)  # the adapters' init
    return fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights="gaussian"))


def global_batches(steps: int, rows: int, seed: int = 1) -> list[torch.Tensor]:
    """``steps`` global batches of token ids ``[rows, SEQ]``, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, SEQ), generator=g) for _ in range(steps)]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # next-token prediction in fp32: logits [B, T, V] at t predict ids at t+1
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def local_param_bytes(gm: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards, for sharded parameters)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in gm.parameters())


def _rss_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``: the peak since the last reset) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _release_and_reset_peak() -> None:
    """Give freed heap back to the OS and restart the peak-RSS count (Linux), so the peak is the training step's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not glibc / not Linux: the peak then counts from the process start
        pass


def train(steps: int = 5, rows: int = 4, lr: float = 1e-2, gm: torch.fx.GraphModule | None = None,
          dtype: torch.dtype = torch.float32) -> list[float]:
    """Train ``gm`` (default: :func:`build`) for ``steps`` on this process's shard of each global batch; return the
    global mean loss per step. Sharded per layer with FSDP2 when a process group is initialised, else plain."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rows % world:
        raise ValueError(f"the global batch ({rows} rows) must split evenly over {world} processes")
    gm = build(dtype=dtype) if gm is None else gm
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else None
    if device is not None:
        gm = gm.to(device)
    gm.train()
    if dist.is_initialized():
        fxpeft.shard(gm)  # outline each decoder layer, fully_shard it, then the root
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids in global_batches(steps, rows):
        mine = ids[rank::world]  # [rows/world, SEQ]
        mine = mine.to(device) if device is not None else mine
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(gm(input_ids=mine).logits, mine)
        loss.backward()  # FSDP2: gradients reduce-scattered (averaged over the ranks) layer by layer
        opt.step()
        report = loss.detach().clone()
        if world > 1:
            dist.all_reduce(report)
            report /= world
        losses.append(report.item())
    return losses


def measure(steps: int = 2, layers: int = 8, hidden: int = 512) -> dict[str, float]:
    """Per-rank memory of a ``layers`` x ``hidden`` Llama over ``steps`` training steps: parameter bytes held at rest,
    the most parameter bytes materialised at once in a forward (the shards plus the gathered layers), RSS at rest
    after sharding and peak RSS while training (the build and trace before sharding are not counted)."""
    from fxpeft.passes.outline import outlined_blocks

    gm = build(layers=layers, hidden=hidden)
    full = local_param_bytes(gm)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        fxpeft.shard(gm)
    held = local_param_bytes(gm)
    most = [held]

    def count(module, args):  # runs after FSDP2's own pre-forward hook: this block's parameters are gathered now
        most[0] = max(most[0], local_param_bytes(gm))

    hooks = [b.register_forward_pre_hook(count) for b in outlined_blocks(gm).values()]
    _release_and_reset_peak()
    rest = _rss_mb("VmRSS")
    train(steps=steps, rows=2 * world, gm=gm)  # the same rows per rank at any world size
    for h in hooks:
        h.remove()
    return {"world": world, "model_MiB": full / 2**20, "params_held_MiB": held / 2**20,
            "params_peak_MiB": most[0] / 2**20, "rss_MiB": rest, "peak_rss_MiB": _rss_mb("VmHWM")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=4, help="global batch rows (split over the processes)")
    ap.add_argument("--world", type=int, default=None, help="1: run without a process group")
    ap.add_argument("--bf16", action="store_true", help="bf16 base weights (the adapters stay fp32)")
    ap.add_argument("--measure", action="store_true", help="per-rank memory of a bigger Llama (--layers, --hidden)")
    ap.add_argument("--layers", type=int, default=8, help="--measure: decoder layers")
    ap.add_argument("--hidden", type=int, default=512, help="--measure: hidden size")
    args = ap.parse_args(argv)
    distributed = args.world != 1 and "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        rank = dist.get_rank() if distributed else 0
        if args.measure:
            m = measure(layers=args.layers, hidden=args.hidden)
            print(f"rank {rank}/{m['world']}: model {m['model_MiB']:.1f} MiB of parameters, holds "
                  f"{m['params_held_MiB']:.1f} MiB, at most {m['params_peak_MiB']:.1f} MiB materialised; RSS at rest "
                  f"{m['rss_MiB']:.0f} MiB, training peak {m['peak_rss_MiB']:.0f} MiB",
                  flush=True)
        else:
            losses = train(args.steps, args.rows, dtype=torch.bfloat16 if args.bf16 else torch.float32)
            if rank == 0:
                print("losses:", " ".join(f"{v:.6f}" for v in losses))
    finally:
        if distributed:
            dist.barrier()  # no rank tears gloo down while its peer still has traffic in flight
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
