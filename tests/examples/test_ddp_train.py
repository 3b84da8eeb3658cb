"""examples/ddp_train.py: a rewritten graph under DDP with 2 gloo processes follows the single-process loss curve,
and only adapter parameters get gradients (``find_unused_parameters=False``)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.heavy, pytest.mark.filterwarnings("ignore")]


def _example():
    spec = importlib.util.spec_from_file_location("fxpeft_example_ddp", ROOT / "examples" / "ddp_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import fxpeft

        ex = _example()
        gm = ex.build()
        losses = ex.train(steps=5, rows=4, gm=gm)
        adapter_params = {id(p) for m in fxpeft.adapters(gm).values() for p in m.parameters()}
        with_grad = [n for n, p in gm.named_parameters() if p.grad is not None]
        stray = [n for n, p in gm.named_parameters() if p.grad is not None and id(p) not in adapter_params]
        # the adapters stayed equal across ranks (DDP averaged their gradients)
        flat = torch.cat([p.detach().flatten() for m in fxpeft.adapters(gm).values() for p in m.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        torch.save({"losses": losses, "with_grad": len(with_grad), "stray": stray,
                    "same": all(torch.equal(gathered[0], g) for g in gathered)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path):
    torch.manual_seed(0)
    single = _example().train(steps=5, rows=4)
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for res in ranks:
        assert res["stray"] == [] and res["with_grad"] > 0  # only adapter parameters were trained
        assert res["same"]
        got, want = torch.tensor(res["losses"]), torch.tensor(single)
        assert ((got - want).abs() / want.abs()).max() <= 1e-5, (res["losses"], single)
    assert single[-1] < single[0]  # it trains


def test_the_example_runs_as_a_script_in_one_process():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "ddp_train.py"), "--world", "1", "--steps", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.split("losses:")[1].split()) == 2
