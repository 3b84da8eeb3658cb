"""Shared fixtures: the model zoo, PEFT as the reference, and graph-equality helpers."""

from __future__ import annotations

import copy
import functools
import os
import warnings

import torch
from torch import nn

# Two xdist workers on two cores: one intra-op thread each, or they fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| (fp32 tolerance checks)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def out_tensor(out):
    """The main tensor of a model output (HF ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def snapshot(gm: torch.nn.Module) -> tuple[str, dict]:
    """gm.code and a copy of its state: two graphs with equal snapshots are unchanged."""
    return gm.code, {k: v.detach().clone() for k, v in gm.state_dict().items()}


def assert_unchanged(gm: torch.nn.Module, snap: tuple[str, dict]) -> None:
    code, state = snap
    assert gm.code == code
    now = gm.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


def peft_counts(model: torch.nn.Module, peft_config) -> tuple[int, int]:
    """PEFT's (trainable, total) for the same config, on a deep copy (PEFT mutates the model)."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft_config)
    return pm.get_nb_trainable_parameters()


class Convs(nn.Module):
    """A Conv1d, a grouped Conv2d and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.g2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(6 * 5 + 8 * 4 * 4, 5)

    def forward(self, x, v):
        return self.head(torch.cat([torch.relu(self.c1(x)).flatten(1), torch.relu(self.g2(v)).flatten(1)], 1))


def convs():
    torch.manual_seed(0)
    return Convs().eval(), (torch.randn(2, 4, 5), torch.randn(2, 4, 4, 4)), {}


def _bases() -> dict:
    from fxpeft import zoo

    return {"llama": zoo.tiny_llama, "gpt2": zoo.tiny_gpt2, "bert": zoo.tiny_bert, "cnn": zoo.cnn, "convs": convs}


@functools.lru_cache(maxsize=None)
def traced_base(name: str):
    """(model, args, kwargs, traced graph) of a zoo model, built once per worker; tests use copies."""
    import fxpeft

    model, args, kwargs = _bases()[name]()
    return model, args, kwargs, fxpeft.trace(model, args, kwargs)


def traced_copy(name: str):
    """A fresh copy of :func:`traced_base`'s graph."""
    return copy.deepcopy(traced_base(name)[3])


def lm_train_losses(gm, name: str = "llama", steps: int = 4, lr: float = 1e-2) -> list[float]:
    """Train ``gm`` (a zoo LM's graph) in train mode with AdamW on next-token prediction of :func:`traced_base`'s
    ids; the loss of each step."""
    import torch.nn.functional as F

    ids = traced_base(name)[2]["input_ids"]
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    gm.train()
    losses = []
    for _ in range(steps):
        logits = gm(input_ids=ids).logits  # [B, T, V]: position t predicts token t+1
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def run_graph(gm, name: str) -> torch.Tensor:
    """A graph's main output on :func:`traced_base`'s inputs (``use_cache`` is the traced model's flag, not an input)."""
    _, args, kwargs, _ = traced_base(name)
    return out_tensor(gm(*args, **{k: v for k, v in kwargs.items() if k != "use_cache"}))


@torch.no_grad()
def run_model(model, name: str) -> torch.Tensor:
    """The eager model's main output on :func:`traced_base`'s inputs."""
    _, args, kwargs, _ = traced_base(name)
    return out_tensor(model.eval()(*args, **kwargs))


@torch.no_grad()
def greedy_rerun(step, ids: torch.Tensor, new: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by re-running ``step`` (ids -> logits ``[B, L, V]``) on the growing sequence, the next token
    read at the last position (the demo's way; for prompt methods PEFT's forward re-run is the reference, not its
    ``generate()``). The ids ``[B, T+new]`` and each step's last logits ``[B, new, V]``."""
    last = []
    for _ in range(new):
        last.append(step(ids)[:, -1])
        ids = torch.cat([ids, last[-1].argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(last, 1)
