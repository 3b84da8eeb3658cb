"""Shared fixtures: the model zoo, PEFT as the reference, and graph-equality helpers."""

from __future__ import annotations

import copy
import os
import warnings

import torch

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
