"""Train a rewritten graph under DDP: a tiny HF Llama, traced, LoRA inserted, data-parallel over processes.

    torchrun --nproc-per-node 2 examples/ddp_train.py            # gloo on CPU; NCCL when CUDA is there
    python examples/ddp_train.py --world 1                       # the same global batches in one process

Every rank builds the same graph (same seed), so the adapters start equal on every rank: DDP checks that, then
keeps them equal by averaging gradients. Only the adapter parameters require a gradient, so DDP registers only
them, and ``find_unused_parameters=False`` holds: every adapter is used by every forward.

Each step takes one *global* batch (the same on every rank, from a shared seed) and gives rank ``k`` its rows
``k::world``. DDP averages the ranks' gradients, so with equal shards a step is the single-process step on the
global batch; the printed loss is the global batch's mean (the ranks' losses averaged with an all-reduce).
``run(world=1)`` and ``run(world=2)`` therefore give the same loss curve (tests/examples/test_ddp_train.py checks
it to rel ≤ 1e-5).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fxpeft
from fxpeft.zoo import tiny_llama

VOCAB, SEQ = 256, 16


def build(seed: int = 0) -> torch.fx.GraphModule:
    """The same rewritten graph on every rank: a tiny Llama traced with dynamic batch, LoRA on q/v."""
    model, _, kw = tiny_llama(layers=2, hidden=64, vocab=VOCAB, batch=2, seq=SEQ, seed=seed)
    gm = fxpeft.trace(model, (), kw)
    torch.manual_seed(seed)  # the adapters' init
    return fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights="gaussian"))


def global_batches(steps: int, rows: int, seed: int = 1) -> list[torch.Tensor]:
    """``steps`` global batches of token ids ``[rows, SEQ]``, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, SEQ), generator=g) for _ in range(steps)]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # next-token prediction: logits [B, T, V] at t predict ids at t+1
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(steps: int = 5, rows: int = 4, lr: float = 1e-2, gm: torch.fx.GraphModule | None = None) -> list[float]:
    """Train ``gm`` (default: :func:`build`) for ``steps`` on this process's shard of each global batch; return the
    global mean loss per step. Runs under DDP when a process group is initialised (any size), else plainly.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rows % world:
        raise ValueError(f"the global batch ({rows} rows) must split evenly over {world} processes")
    gm = build() if gm is None else gm
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else None
    if device is not None:
        gm = gm.to(device)
    gm.train()
    model = DDP(gm, device_ids=None if device is None else [device], find_unused_parameters=False) if world > 1 else gm
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for ids in global_batches(steps, rows):
        mine = ids[rank::world].to(device) if device is not None else ids[rank::world]  # [rows/world, SEQ]
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(input_ids=mine).logits, mine)
        loss.backward()  # DDP: the gradient is averaged over the ranks here
        opt.step()
        report = loss.detach().clone()
        if world > 1:
            dist.all_reduce(report)
            report /= world
        losses.append(report.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=4, help="global batch rows (split over the processes)")
    ap.add_argument("--world", type=int, default=None, help="1: run without a process group")
    args = ap.parse_args(argv)
    distributed = args.world != 1 and "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        losses = train(args.steps, args.rows)
        if not distributed or dist.get_rank() == 0:
            print("losses:", " ".join(f"{v:.6f}" for v in losses))
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
