"""LoRA's ALF balanced conv (``conv_reshape="balanced"``): the two-conv graph equals the base conv with its weight
plus the documented ΔW (Conv1d/2d/3d, strides, dilations, string paddings), zero init is exact, merge is exact, the
parameter count, training, fxpeft's own file (bit-exact round trip, refused by PEFT), and typed refusals that leave
the graph unchanged."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import assert_unchanged, rel_err, run_model, snapshot
from conftest import traced_base as _base
from conftest import traced_copy as _graph
from safetensors.torch import load_file
from torch import nn

import fxpeft
from fxpeft.errors import AdapterFileError, ConfigError, UnsupportedSiteError
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.lora import LoraAdapter
from fxpeft.registry import PeftRegistry

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*dilated convolution:UserWarning"),  # cnn's conv2, PEFT's standard
              pytest.mark.filterwarnings("ignore:.*is fixed at:UserWarning")]

_CNN = ["conv1", "conv2", "conv3", "fc"]


def _cfg(**kw) -> fxpeft.LoraConfig:
    return fxpeft.LoraConfig(**{"r": 3, "lora_alpha": 6, "target_modules": _CNN, "conv_reshape": "balanced", **kw})


def _adapters(gm) -> dict[str, LoraAdapter]:
    return {m.site_name: m for m in gm.modules() if isinstance(m, LoraAdapter)}


def _randomise(gm, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in _adapters(gm).values():
            m.A.normal_(std=0.3), m.B.normal_(std=0.3)


def _alf_delta(m: LoraAdapter, conv: nn.Module) -> torch.Tensor:
    """The documented ΔW, written out independently: ``s·B@A`` [out·k0, in·K'] -> [out, k0, in, *k'] -> permute."""
    out, cin, k0, *rest = conv.weight.shape
    mat = (m.B.detach() @ m.A.detach()) * m.scaling
    return mat.reshape(out, k0, cin, *rest).transpose(1, 2)


class Convs(nn.Module):
    """One conv of each rank, with strides, dilations and string paddings."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(4, 5, (3, 2), padding="same", dilation=(1, 2))
        self.c3 = nn.Conv3d(5, 2, (2, 3, 2), stride=(1, 2, 1), padding="valid")

    def forward(self, x):
        y = torch.relu(self.c1(x))  # [N, 4, 6]
        y = torch.relu(self.c2(y.unsqueeze(-1).expand(-1, -1, -1, 5)))  # [N, 5, 6, 5]
        return self.c3(y.unsqueeze(2).expand(-1, -1, 3, -1, -1))  # [N, 2, 2, 2, 4]


def _convs():
    torch.manual_seed(0)
    model, x = Convs().eval(), torch.randn(2, 3, 11)
    return model, x, fxpeft.trace(model, (x,), {})


def test_zero_init_is_exactly_the_base():
    gm = fxpeft.rewrite(_graph("cnn"), _cfg())
    model, args, kwargs, _ = _base("cnn")
    assert torch.equal(gm(*args, **kwargs), run_model(model, "cnn"))
    assert "A_kernel" in gm.code and "B_kernel" in gm.code  # the two convs, named


@pytest.mark.parametrize("base", ["cnn", "convs"])
def test_graph_equals_the_conv_with_the_documented_delta(base):
    """The factored two-conv graph computes ``conv(x, W + ΔW)``, ΔW the documented permuted ``B @ A``."""
    if base == "cnn":
        model, args, kwargs, gm = _base("cnn")
        gm, targets = copy.deepcopy(gm), _CNN
    else:
        model, x, gm = _convs()
        args, kwargs, targets = (x,), {}, ["c1", "c2", "c3"]
    gm = fxpeft.rewrite(gm, _cfg(target_modules=targets)).eval()
    _randomise(gm)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in _adapters(gm).items():
            mod = ref.get_submodule(name)
            if isinstance(mod, nn.Linear):
                mod.weight += (m.B @ m.A) * m.scaling
            else:
                mod.weight += _alf_delta(m, mod)
        want, base_out = ref(*args, **kwargs), model(*args, **kwargs)
        got = gm(*args, **kwargs)
    assert rel_err(got, base_out) > 1e-2  # the adapters really change the outputs
    assert rel_err(got, want) <= 1e-5


def test_parameter_count_and_training():
    gm = fxpeft.rewrite(_graph("cnn"), _cfg()).train()
    r, conv = 3, {"conv1": (3, 16, 3, 3), "conv2": (16, 32, 3, 3), "conv3": (32, 32, 1, 1)}
    want = sum(r * (cin * kw + out * kh) for cin, out, kh, kw in conv.values()) + r * (32 + 10)
    trainable = [p for p in gm.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == want
    std = fxpeft.rewrite(_graph("cnn"), _cfg(conv_reshape="standard"))
    assert want < sum(p.numel() for p in std.parameters() if p.requires_grad)  # it saves parameters here
    _, args, _, _ = _base("cnn")
    target = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (gm(*args) - target).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_merge_is_exact_and_unmerges():
    gm = fxpeft.rewrite(_graph("cnn"), _cfg(lora_bias=True, init_lora_weights=False)).eval()
    _randomise(gm, 1)
    _, args, kwargs, _ = _base("cnn")
    with torch.no_grad():
        want = gm(*args, **kwargs)
        fxpeft.merge_adapter(gm)
        assert rel_err(gm(*args, **kwargs), want) <= 1e-5
        fxpeft.unmerge_adapter(gm)
        assert rel_err(gm(*args, **kwargs), want) <= 1e-6
        merged = fxpeft.merge(copy.deepcopy(gm))
        assert not _adapters(merged)
        assert rel_err(merged(*args, **kwargs), want) <= 1e-5


def test_files_round_trip_bit_exactly_and_peft_refuses_them(tmp_path):
    gm = fxpeft.rewrite(_graph("cnn"), _cfg(init_lora_weights=False)).eval()
    _randomise(gm, 2)
    model, args, kwargs, _ = _base("cnn")
    want = gm(*args, **kwargs)
    fxpeft.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["conv_reshape"] == "balanced" and config["peft_type"] == "LORA"
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["base_model.model.conv1.lora_A.weight"].shape == (3, 3 * 3)  # [r, in·kw]
    assert tensors["base_model.model.conv1.lora_B.weight"].shape == (16 * 3, 3)  # [out·kh, r]

    back = fxpeft.load_adapter(_graph("cnn"), tmp_path).eval()
    assert torch.equal(back(*args, **kwargs), want)
    fxpeft.save_adapter(back, tmp_path / "again")
    again = load_file(tmp_path / "again" / WEIGHTS_NAME)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)

    with pytest.warns(UserWarning, match="conv_reshape"), pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))


def test_linear_sites_stay_peft_lora(tmp_path):
    """On a model without convs the option changes nothing: the file is PEFT's LoRA, read by PEFT as such."""
    gm = fxpeft.rewrite(_graph("llama"), _cfg(target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    fxpeft.save_adapter(gm, tmp_path)
    assert "conv_reshape" not in json.loads((tmp_path / CONFIG_NAME).read_text())
    model, args, kwargs, _ = _base("llama")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    got = gm(*args, **{k: v for k, v in kwargs.items() if k != "use_cache"})
    assert rel_err(run_model(pm, "llama"), got.logits if hasattr(got, "logits") else got[0]) <= 1e-5


@pytest.mark.parametrize("fields, match", [
    (dict(conv_reshape="diagonal"), "conv_reshape='diagonal'"),
    (dict(use_dora=True), "use_dora"),
])
def test_bad_configs_are_typed_errors_with_the_graph_unchanged(fields, match):
    gm = _graph("cnn")
    snap = snapshot(gm)
    with pytest.raises(ConfigError, match=match):
        fxpeft.rewrite(gm, _cfg(**fields))
    assert_unchanged(gm, snap)


def test_mixed_batch_weighted_merge_and_hotswap_are_refused(tmp_path):
    gm = fxpeft.rewrite(_graph("cnn"), _cfg(target_modules=["conv1"]))
    fxpeft.rewrite(gm, _cfg(target_modules=["conv1"]), adapter_name="other")
    with pytest.raises(UnsupportedSiteError, match="balanced"):
        fxpeft.mixed_batch(gm)
    snap = snapshot(gm)
    with pytest.raises(ConfigError, match="balanced"):
        fxpeft.add_weighted_adapter(gm, ["default", "other"], [1.0, 1.0], "sum", combination_type="cat")
    assert_unchanged(gm, snap)
    std = fxpeft.rewrite(_graph("cnn"), _cfg(target_modules=["conv1"], conv_reshape="standard"))
    fxpeft.save_adapter(std, tmp_path)
    with pytest.raises(AdapterFileError, match="conv_reshape"):
        fxpeft.hotswap_adapter(gm, tmp_path, "default")
    assert_unchanged(gm, snap)


def test_file_marker_is_read_back_into_the_config(tmp_path):
    gm = fxpeft.rewrite(_graph("cnn"), _cfg(target_modules=["conv2"]))
    fxpeft.save_adapter(gm, tmp_path)
    config = PeftRegistry.get("lora").config_from_peft(json.loads((tmp_path / CONFIG_NAME).read_text()))
    assert config.conv_reshape == "balanced"
    assert math.prod(_adapters(gm)["conv2"].B.shape) == 32 * 3 * 3


def test_peft_config_object_gives_peft_conv_lora():
    """A PEFT config object has no conv_reshape: it converts to the standard conv LoRA, PEFT's shapes."""
    gm = fxpeft.rewrite(_graph("cnn"), peft.LoraConfig(r=2, target_modules=["conv1"]))
    m = _adapters(gm)["conv1"]
    assert not m.balanced and m.A.shape == (2, 3, 3, 3) and m.B.shape == (16, 2, 1, 1)
