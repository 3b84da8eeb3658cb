"""examples/fsdp_train.py: a rewritten graph sharded per decoder layer with FSDP2 (fxpeft.shard) on 2 gloo processes
follows the single-process loss curve in fp32; a frozen bf16 base with fp32 adapters in one sharded layer trains;
a graph that was not outlined, and a graph edit on a sharded graph, are refused."""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.heavy, pytest.mark.filterwarnings("ignore")]


def _example():
    spec = importlib.util.spec_from_file_location("fxpeft_example_fsdp", ROOT / "examples" / "fsdp_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _refusals(flat) -> list[str]:
    """The typed errors: fully_shard per layer on a flat graph (outline=False), and a file save on a sharded graph."""
    import fxpeft

    errors = []
    try:
        fxpeft.shard(flat, outline=False)
    except fxpeft.ConfigError as e:
        errors.append("outline" if "not outlined" in str(e) else str(e))
    fxpeft.shard(flat)
    try:
        fxpeft.save_adapter(flat, "/nonexistent/never-written")
    except fxpeft.ConfigError as e:
        errors.append("sharded" if "sharded" in str(e) else str(e))
    return errors


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fxpeft.passes.outline import is_sharded, outlined_blocks

        import fxpeft

        ex = _example()
        gm = ex.build()
        flat = copy.deepcopy(gm)
        losses = ex.train(steps=5, rows=4, gm=gm)
        blocks = outlined_blocks(gm)
        adapter_params = {id(p) for m in fxpeft.adapters(gm).values() for p in m.parameters()}
        stray = [n for n, p in gm.named_parameters() if p.grad is not None and id(p) not in adapter_params]
        sharded = is_sharded(gm) and len(blocks) == 2 and all(is_sharded(b) for b in blocks.values())
        bf16 = ex.build(dtype=torch.bfloat16)
        bf16_losses = ex.train(steps=5, rows=4, gm=bf16)
        layer = outlined_blocks(bf16)["model.layers.0"]
        adapter_ids = {id(p) for m in fxpeft.adapters(layer).values() for p in m.parameters()}
        dtypes = sorted({(id(p) in adapter_ids, str(p.dtype), p.grad is not None and str(p.grad.dtype))
                         for p in layer.parameters()})
        torch.save({"losses": losses, "stray": stray, "sharded": sharded, "bf16_losses": bf16_losses,
                    "dtypes": dtypes, "refusals": _refusals(flat)}, f"{out}.{rank}")
        dist.barrier()  # no rank tears gloo down while its peer still has traffic in flight (a SIGABRT otherwise)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_sharded_per_layer_follow_the_single_process_loss_curve(tmp_path):
    single = _example().train(steps=5, rows=4)  # one process: the flat graph, no sharding
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(f"{out}.{r}", weights_only=True)
        assert res["sharded"] and res["stray"] == []  # every layer sharded; only adapters got gradients
        got, want = torch.tensor(res["losses"]), torch.tensor(single)
        assert ((got - want).abs() / want.abs()).max() <= 1e-5, (res["losses"], single)
        # one sharded layer holds a frozen bf16 base and fp32 adapters with fp32 gradients, and it trains
        assert res["dtypes"] == [(False, "torch.bfloat16", False), (True, "torch.float32", "torch.float32")]
        assert res["bf16_losses"][-1] < res["bf16_losses"][0]
        assert res["refusals"] == ["outline", "sharded"]
    assert single[-1] < single[0]
