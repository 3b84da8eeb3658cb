"""A new PEFT method in one file, written against fxpeft's public API only: bias tuning.

Bias tuning (BitFit-style, per site) learns a vector ``delta`` added to a linear site's output:
``y = base(x) + delta``. It folds exactly into the base bias. The method says everything about itself here:
its config, which sites it adapts, the nodes it inserts, its fold and unfold, and its file format.

Run it: ``python examples/custom_method.py`` (it asserts its own results and prints a summary).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from torch import nn

import fxpeft
from fxpeft import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry, Role, Site

aten = torch.ops.aten


@dataclass
class BiasTuningConfig(PeftConfigBase):
    """Bias tuning: ``target_modules`` as in PEFT; ``init_scale`` > 0 starts the deltas random (for tests)."""

    init_scale: float = 0.0


class BiasDelta(AdapterModule):
    """The learned output offset of one site."""

    method = "bias_tuning"

    def __init__(self, site: Site, adapter_name: str, weight: torch.Tensor, init_scale: float) -> None:
        super().__init__(site.name, adapter_name)
        self.delta = nn.Parameter(torch.randn(site.out_features, dtype=weight.dtype, device=weight.device) * init_scale)

    def effective(self) -> torch.Tensor:
        return self.delta.detach().float()


@PeftRegistry.register("bias_tuning")
class BiasTuning(Method):
    config_cls = BiasTuningConfig
    display_name = "BiasTuning"
    color = ("#e5dbff", "#5f3dc4")
    site_kinds = frozenset({"linear"})
    spec_aliases = {"init": "init_scale"}

    @classmethod
    def validate_config(cls, config: BiasTuningConfig) -> None:
        if not (isinstance(config.init_scale, (int, float)) and config.init_scale >= 0):
            raise fxpeft.ConfigError(f"init_scale must be a number >= 0, got {config.init_scale!r}")

    @classmethod
    def check_site(cls, site: Site, config: BiasTuningConfig) -> str | None:
        if site.bias is None:
            return "bias tuning folds into the site's bias, and this site has none"
        return super().check_site(site, config)

    @classmethod
    def build(cls, site: Site, config: BiasTuningConfig, adapter_name: str, weight: torch.Tensor) -> BiasDelta:
        return BiasDelta(site, adapter_name, weight, config.init_scale)

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: BiasDelta) -> None:
        delta = emit.op(aten.mul.Tensor, emit.param("delta", Role.PARAM), emit.param("gate", Role.PARAM))
        out = emit.op(aten.add.Tensor, emit.call.node, delta, role=Role.OUT, replaces=0)  # y + delta
        emit.replace_output(out)

    @classmethod
    def fold(cls, adapter: BiasDelta, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight, bias + adapter.effective()

    @classmethod
    def unfold(cls, adapter: BiasDelta, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight, bias - adapter.effective()

    # The file format: one tensor per site, ``base_model.model.<site>.bias_delta``.
    @classmethod
    def site_shapes(cls, config: BiasTuningConfig, site: Site) -> dict[str, tuple[int, ...]]:
        return {"bias_delta": (site.out_features,)}

    @classmethod
    def site_tensors(cls, adapter: BiasDelta, site: Site) -> dict[str, torch.Tensor]:
        return {"bias_delta": adapter.delta.detach()}

    @classmethod
    def load_site_tensors(cls, adapter: BiasDelta, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            adapter.delta.copy_(tensors["bias_delta"])


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x, target = torch.randn(64, 16), torch.randn(64, 4)
    gm = fxpeft.trace(model, (x[:8],))
    base_out = gm(x).detach()

    gm = fxpeft.rewrite(gm, BiasTuningConfig(target_modules=["0", "2"]))
    assert torch.equal(gm(x), base_out), "a zero-initialised delta must give exactly the base outputs"
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == 32 + 4
    print("rewritten graph:\n" + "\n".join(line for line in gm.code.splitlines() if "delta" in line))

    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(gm(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    print(f"training: loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    trained = gm(x).detach()
    directory = tempfile.mkdtemp()
    fxpeft.save_adapter(gm, directory)
    again = fxpeft.load_adapter(fxpeft.trace(model, (x[:8],)), directory)  # a fresh graph of the same model
    assert torch.equal(again(x), trained), "save -> load must be bit-exact"

    merged = fxpeft.merge(gm)
    assert not fxpeft.adapters(merged)
    rel = ((merged(x) - trained).norm() / trained.norm()).item()
    assert rel <= 1e-6, rel
    print(f"save -> load bit-exact; merged vs unmerged rel {rel:.1e}; merged graph has no adapter nodes")


if __name__ == "__main__":
    main()
