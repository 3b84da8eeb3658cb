"""LoRA on parameters (``target_parameters``, :mod:`fxpeft.methods.lora_parameters`) against PEFT 0.21: a tiny
Qwen3-MoE (transformers 5 ships its experts as 3-D parameters read through ``grouped_mm``) with files both ways,
PEFT's nested ``base_layer`` key layout, exact merge, training; 2-D parameters on Llama and on a CNN's head; the
transposed-experts layout; nn.MultiheadAttention as PEFT adapts it (self/cross, batch_first, add_bias_kv), out_proj
alone and separate q/k/v weights adapted but refused on save; the sweep's weights no module swap reaches (Mamba's
conv1d/dt_proj, a sliced in_proj, a viewed positional table, a conv weight) against eager; and typed refusals that
leave the graph unchanged."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import assert_unchanged, out_tensor, peft_counts, rel_err, snapshot
from conftest import run_graph as _run
from conftest import run_model as _run_model
from conftest import traced_base as _base
from conftest import traced_copy as _graph
from safetensors.torch import load_file
from torch import nn

import fxpeft
from fxpeft.errors import ConfigError, TargetError, UnsupportedSiteError
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              pytest.mark.filterwarnings("ignore:trace.*is fixed at:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*rank_pattern keys did not match:RuntimeWarning")]

_EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@functools.cache
def _moe():
    """(model, input_ids, traced graph): one layer, 4 experts (gate_up_proj [4, 16, 16], down_proj [4, 16, 8])."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                      use_cache=False)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 6))
    return model, ids, fxpeft.trace(model, (ids,))


def _moe_graph():
    return copy.deepcopy(_moe()[2])


@torch.no_grad()
def _logits(m) -> torch.Tensor:
    out = m(_moe()[1])
    return out.logits if hasattr(out, "logits") else out[0]


def _peft_model(config, model=None):
    torch.manual_seed(1)
    return peft.get_peft_model(copy.deepcopy(model if model is not None else _moe()[0]), config).eval()


def test_moe_peft_file_loads_with_peft_outputs(tmp_path):
    """PEFT's own file (experts and the 2-D router, beside a module target) loads with PEFT's outputs."""
    pm = _peft_model(peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                                     target_parameters=[*_EXPERTS, "mlp.gate.weight"]))
    ref = _logits(pm)
    assert rel_err(ref, _logits(_moe()[0])) > 1e-2  # the adapter changes the outputs
    pm.save_pretrained(tmp_path)
    gm = fxpeft.load_adapter(_moe_graph(), tmp_path)
    assert rel_err(_logits(gm), ref) <= 1e-5
    kinds = {s.name: s.kind for s in fxpeft.find_sites(gm, {"linear", "parameter"}).values()}
    adapted = {m.site_name for m in fxpeft.adapters(gm).values()}
    assert {kinds[n] for n in adapted} == {"linear", "parameter"} and len(adapted) == 4


def test_moe_fxpeft_file_loads_in_peft_and_merges_exactly(tmp_path):
    """fxpeft's file (per-parameter rank) is PEFT's layout: PEFT loads it with the same outputs; merge is exact."""
    config = fxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
                               target_parameters=_EXPERTS, rank_pattern={"down_proj": 3})
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_moe_graph(), config)
    out = _logits(gm)
    assert rel_err(out, _logits(_moe()[0])) > 1e-2
    fxpeft.save_adapter(gm, tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["target_modules"] == [] and sorted(saved["target_parameters"]) == [
        "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / WEIGHTS_NAME).items()}
    pre = "base_model.model.model.layers.0.mlp.experts."
    # PEFT nests the wrappers in registration order: gate_up_proj (first) under base_layer; B's columns are r·E
    assert shapes == {pre + "base_layer.lora_A.weight": (8, 16), pre + "base_layer.lora_B.weight": (16, 8),
                      pre + "lora_A.weight": (12, 8), pre + "lora_B.weight": (16, 12)}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(_moe()[0]), tmp_path).eval()
    assert rel_err(_logits(pm), out) <= 1e-5
    assert rel_err(_logits(fxpeft.load_adapter(_moe_graph(), tmp_path)), out) == 0.0
    # merge: W + ΔW written in place, as PEFT's merge_and_unload writes it
    merged = fxpeft.merge(copy.deepcopy(gm))
    assert rel_err(_logits(merged), out) <= 1e-5
    plain = pm.merge_and_unload()
    for name in ("gate_up_proj", "down_proj"):
        ours = merged.get_parameter(f"model.layers.0.mlp.experts.{name}")
        theirs = getattr(plain.model.layers[0].mlp.experts, name)
        assert rel_err(ours, theirs) <= 1e-6


def test_moe_counts_zero_init_training_and_peft_config():
    """PEFT's trainable count; the default init gives exactly the base; training lowers the loss; a PEFT config."""
    pc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=_EXPERTS)
    gm = fxpeft.rewrite(_moe_graph(), pc)  # PEFT's config object, converted
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    assert trainable == peft_counts(_moe()[0], pc)[0] == (8 * 16 + 16 * 8) + (8 * 8 + 16 * 8)  # A, B per parameter
    assert torch.equal(_logits(gm), _logits(_moe()[2]))  # B = 0: exactly the base
    ids = _moe()[1]
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        logits = gm(ids)
        logits = logits.logits if hasattr(logits, "logits") else logits[0]
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in gm.named_parameters() if not p.requires_grad)


def test_llama_2d_parameters_both_ways(tmp_path):
    """2-D parameters of Llama's linears (one of them also read by no module target): PEFT's outputs both ways."""
    model = _base("llama")[0]
    config = fxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
                               target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"])
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("llama"), config)
    out = _run(gm, "llama")
    fxpeft.save_adapter(gm, tmp_path / "fx")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fx")
    assert rel_err(_run_model(pm, "llama"), out) <= 1e-5
    pm2 = _peft_model(peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
                                      target_parameters=["o_proj.weight"]), model)
    pm2.save_pretrained(tmp_path / "peft")
    assert rel_err(_run(fxpeft.load_adapter(_graph("llama"), tmp_path / "peft"), "llama"), _run_model(pm2, "llama")) <= 1e-5


def test_cnn_head_parameter_and_conv_weight_view(tmp_path):
    """A CNN: the head's 2-D weight round-trips with PEFT; a 4-D conv weight (which PEFT refuses) adapts through conv
    LoRA's ``[out, in·k·k]`` view, as an eager ``W + s·(B·A).view(W.shape)``, merges, and is not saved for PEFT."""
    model = _base("cnn")[0]
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("cnn"), fxpeft.LoraConfig(r=2, target_modules=[], target_parameters=["fc.weight"],
                                                         init_lora_weights=False))
    fxpeft.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert rel_err(_run_model(pm, "cnn"), _run(gm, "cnn")) <= 1e-5
    torch.manual_seed(0)
    gm = fxpeft.rewrite(_graph("cnn"), fxpeft.LoraConfig(r=2, target_modules=[], target_parameters=["conv1.weight"],
                                                         init_lora_weights=False))
    (a,) = fxpeft.adapters(gm).values()
    assert tuple(a.A.shape) == (2, model.conv1.weight[0].numel()) and tuple(a.B.shape) == (model.conv1.out_channels, 2)
    out = _run(gm, "cnn")
    _assert_eager_and_merge(model, gm, out, lambda m: _run_model(m, "cnn"))
    with pytest.raises(fxpeft.AdapterFileError, match="conv weight"):
        fxpeft.save_adapter(gm, tmp_path / "conv")
    assert not (tmp_path / "conv" / CONFIG_NAME).exists()


@torch.no_grad()
def _assert_eager_and_merge(model, gm, out, run) -> None:
    """``out`` (the adapted graph's) is the eager model with each adapted parameter replaced by ``W + s·ΔW``
    (``ΔW = B·A`` in the parameter's shape), differs from the base, and merging gives it back (fp32 rel <= 1e-5)."""
    ref = copy.deepcopy(model)
    sites = fxpeft.find_sites(gm, {"linear", "conv", "embedding", "parameter"})
    for a in fxpeft.adapters(gm).values():
        w = ref.get_parameter(sites[a.site_name].weight)
        w += (a.scaling * (a.B @ a.A)).view(w.shape)
    assert rel_err(out, run(model)) > 1e-3  # the adapter acts
    assert rel_err(run(ref), out) <= 1e-5
    assert rel_err(run(fxpeft.merge(copy.deepcopy(gm))), out) <= 1e-5


class _TransposedExperts(nn.Module):
    """Experts stored [E, in, out] (``is_transposed``), applied per expert with ``bmm``."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5, 4))  # [E, in, out]

    def forward(self, x):  # x [E, T, in]
        return torch.bmm(x, self.w)


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = _TransposedExperts()

    def forward(self, x):
        return self.experts(x)


def test_transposed_experts_against_peft(tmp_path):
    """``is_transposed``: A [r·E, in], B [out, r·E], ΔW[e] = (B_e·A_e)ᵀ; PEFT's outputs both ways."""
    torch.manual_seed(0)
    model, x = _Holder().eval(), torch.randn(3, 2, 5)
    gm = fxpeft.trace(model, (x,))
    (site,) = [s for s in fxpeft.find_sites(gm, {"parameter"}).values()]
    assert site.fan_in_fan_out and (site.in_features, site.out_features) == (5, 4)
    torch.manual_seed(1)
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=[], target_parameters=["experts.w"],
                                              init_lora_weights=False))
    fxpeft.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        assert rel_err(pm(x), gm(x)) <= 1e-5
        assert rel_err(fxpeft.merge(copy.deepcopy(gm))(x), gm(x)) <= 1e-5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_parameters=["experts.nope"]), TargetError, "matches no parameter"),
    (dict(target_parameters=["input_layernorm.weight"]), UnsupportedSiteError, "1 dimension"),
    (dict(target_parameters=_EXPERTS, lora_dropout=0.1), ConfigError, "lora_dropout"),
    (dict(target_parameters=_EXPERTS, fan_in_fan_out=True), ConfigError, "fan_in_fan_out"),
    (dict(target_parameters=_EXPERTS, lora_bias=True), ConfigError, "lora_bias"),
    (dict(target_parameters=_EXPERTS, use_dora=True), ConfigError, "use_dora"),
    (dict(target_parameters=_EXPERTS, init_lora_weights="pissa"), ConfigError, "init_lora_weights"),
    (dict(target_parameters="experts.down_proj"), ConfigError, "list of parameter names"),
    (dict(target_parameters=["mlp.gate.weight"], target_modules=["gate"]), TargetError, "target_modules adapts too"),
    (dict(target_modules=["experts.down_proj"]), TargetError, "target_parameters"),
])
def test_typed_errors_leave_the_graph_unchanged(kwargs, error, match):
    gm = _moe()[2]  # refused before any change: the shared graph itself
    snap = snapshot(gm)
    kwargs.setdefault("target_modules", [])
    with pytest.raises(error, match=match):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(**kwargs))
    assert_unchanged(gm, snap)


class _Attention(nn.Module):
    """An nn.MultiheadAttention (self- or cross-attention) and a linear head."""

    def __init__(self, batch_first: bool = True, cross: bool = False, **kwargs) -> None:
        super().__init__()
        self.cross = cross
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kwargs)
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):
        kv = y if self.cross else x
        return self.head(self.attn(x, kv, kv, need_weights=False)[0])


def _attention(**kwargs):
    torch.manual_seed(0)
    model = _Attention(**kwargs).eval()
    x, y = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    if not kwargs.get("batch_first", True):
        x, y = x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous()
    return model, (x, y), fxpeft.trace(model, (x, y))


@pytest.mark.parametrize("kwargs", [dict(batch_first=True), dict(batch_first=False), dict(add_bias_kv=True),
                                    dict(cross=True), dict(cross=True, batch_first=False),
                                    dict(cross=True, batch_first=False, add_bias_kv=True)],
                         ids=["batch-first", "seq-first", "bias-kv", "cross", "cross-seq-first", "cross-seq-bias-kv"])
def test_mha_as_a_whole_both_ways(kwargs, tmp_path):
    """PEFT's MHA LoRA (in_proj_weight [3E, E] and out_proj, PEFT applying out_proj's update twice): files both ways
    with the same outputs, PEFT's trainable count, exact merge."""
    model, args, gm = _attention(**kwargs)
    pc = peft.LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False)
    pm = _peft_model(pc, model)
    with torch.no_grad():
        ref = pm(*args)
    assert rel_err(ref, model(*args)) > 1e-2
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(fxpeft.load_adapter(copy.deepcopy(gm), tmp_path / "peft")(*args), ref) <= 1e-5
    torch.manual_seed(2)
    ours = fxpeft.rewrite(copy.deepcopy(gm), fxpeft.LoraConfig(r=2, target_modules=["attn", "head"],
                                                               init_lora_weights=False))
    fxpeft.save_adapter(ours, tmp_path / "fx")
    assert sorted(json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())["target_modules"]) == ["attn", "head"]
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fx").eval()
    with torch.no_grad():
        out = ours(*args)
        assert rel_err(back(*args), out) <= 1e-5
        assert rel_err(fxpeft.merge(copy.deepcopy(ours))(*args), out) <= 1e-5
    trainable = sum(p.numel() for p in fxpeft.rewrite(copy.deepcopy(gm), pc).parameters() if p.requires_grad)
    assert trainable == peft_counts(model, pc)[0]


def test_mha_out_proj_alone_adapts_but_is_not_saved_for_peft(tmp_path):
    """``out_proj`` alone: fxpeft adapts the call inside the MHA (PEFT never would), and refuses to write the file."""
    from fxpeft.errors import AdapterFileError

    model, args, gm = _attention()
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["out_proj"], init_lora_weights=False))
    with torch.no_grad():
        assert rel_err(gm(*args), model(*args)) > 1e-3
    with pytest.raises(AdapterFileError, match="out_proj of an nn.MultiheadAttention"):
        fxpeft.save_adapter(gm, tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_with_separate_qkv_weights_adapts_merges_and_is_not_saved_for_peft(batch_first, tmp_path):
    """kdim != embed_dim (which PEFT refuses): LoRA on q/k/v_proj_weight and out_proj, as eager W + s·B·A, exact
    merge; save_adapter refuses it (PEFT's format cannot say it), writing nothing."""
    from fxpeft.errors import AdapterFileError

    torch.manual_seed(0)
    model = _Attention(batch_first=batch_first, cross=True, kdim=6, vdim=6).eval()
    x, y = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    args = (x, y) if batch_first else (x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous())
    gm = fxpeft.rewrite(fxpeft.trace(model, args), fxpeft.LoraConfig(r=2, target_modules=["attn"],
                                                                     init_lora_weights=False))
    sites = fxpeft.find_sites(gm, {"linear", "parameter"})
    assert sorted(sites[a.site_name].weight for a in fxpeft.adapters(gm).values()) == [
        "attn.k_proj_weight", "attn.out_proj.weight", "attn.q_proj_weight", "attn.v_proj_weight"]
    with torch.no_grad():
        out = gm(*args)
    _assert_eager_and_merge(model, gm, out, lambda m: m(*args))
    with pytest.raises(AdapterFileError, match="separate q/k/v"):
        fxpeft.save_adapter(gm, tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


# ------------------------------------------------------------------ the sweep's weights no module swap reaches


@functools.cache
def _mamba():
    """A tiny transformers Mamba: its slow path reads ``conv1d.weight`` through a squeeze and ``dt_proj.weight`` on
    the left of a matmul, so PEFT's module LoRA on them never applies."""
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
                                   conv_kernel=4, time_step_rank=4, use_cache=False)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    return model, ids, fxpeft.trace(model, (ids,))


def test_mamba_conv1d_and_dt_proj_weights_against_eager(tmp_path):
    """Mamba's depthwise ``conv1d`` (3-D, through conv LoRA's ``[out, in·k]`` view) and ``dt_proj`` (a matmul with
    the weight on the left): adapted, as eager; merge; the conv view is not saved for PEFT (it reads experts)."""
    model, ids, base = _mamba()
    unreached = fxpeft.sites.unreached_weights(base)
    assert {"backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.dt_proj.weight"} <= set(unreached)
    torch.manual_seed(1)
    gm = fxpeft.rewrite(copy.deepcopy(base), fxpeft.LoraConfig(
        r=2, target_modules=[], target_parameters=["mixer.conv1d.weight", "mixer.dt_proj.weight"],
        init_lora_weights=False))
    shapes = sorted((tuple(a.A.shape), tuple(a.B.shape)) for a in fxpeft.adapters(gm).values())
    assert shapes == [((2, 4), (32, 2)), ((2, 4), (32, 2))]  # conv1d [32, 1, 4] -> [32, 1·4]; dt_proj [32, 4]

    def run(m):
        return out_tensor(m(ids))

    _assert_eager_and_merge(model, gm, run(gm), run)
    with pytest.raises(fxpeft.AdapterFileError, match="conv weight"):
        fxpeft.save_adapter(gm, tmp_path)


class _SlicedCrossAttention(nn.Module):
    """Cross-attention with one packed ``in_proj`` [3E, E] sliced into q / k / v, each applied with ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Parameter(torch.randn(24, 8) / 3)
        self.out = nn.Linear(8, 8)

    def forward(self, x, mem):
        q = nn.functional.linear(x, self.in_proj[:8])
        k = nn.functional.linear(mem, self.in_proj[8:16])
        v = nn.functional.linear(mem, self.in_proj[16:])
        att = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1)
        return self.out(att @ v)


class _PositionalView(nn.Module):
    """A learned positional table read through a view, ``pos[:T]``, added to the token embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(32, 8)
        self.pos = nn.Parameter(torch.randn(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.tok(ids) + self.pos[: ids.shape[1]])


@pytest.mark.parametrize("case", ["sliced-in-proj", "positional-view"])
def test_sliced_and_viewed_weights_against_eager(case):
    """A cross-attention ``in_proj`` used through slices, a positional table through a view: unreached by any call
    site, adapted as parameters (one update before all uses), as eager; merge."""
    torch.manual_seed(0)
    if case == "sliced-in-proj":
        model, args, target = _SlicedCrossAttention().eval(), (torch.randn(2, 5, 8), torch.randn(2, 3, 8)), "in_proj"
    else:
        model, args, target = _PositionalView().eval(), (torch.randint(0, 32, (2, 6)),), "pos"
    base = fxpeft.trace(model, args)
    assert target in fxpeft.sites.unreached_weights(base)
    torch.manual_seed(1)
    gm = fxpeft.rewrite(base, fxpeft.LoraConfig(r=2, target_modules=[], target_parameters=[target],
                                                init_lora_weights=False))
    with torch.no_grad():
        out = gm(*args)
    _assert_eager_and_merge(model, gm, out, lambda m: m(*args))


def test_parameter_adapters_refuse_what_mixes_experts():
    """Weighted merges, hot-swaps and mixed batches would mix the (expert, rank) blocks: typed refusals."""
    gm = _graph("cnn")
    for name in ("a", "b"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=[], target_parameters=["fc.weight"]), name)
    snap = snapshot(gm)
    with pytest.raises(UnsupportedSiteError, match="add_weighted_adapter"):
        fxpeft.add_weighted_adapter(gm, ["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    with pytest.raises(UnsupportedSiteError, match="hot-swapping"):
        fxpeft.prepare_for_hotswap(gm, target_rank=4)
    assert_unchanged(gm, snap)
    with pytest.raises(UnsupportedSiteError, match="mixed-batch"):
        fxpeft.mixed_batch(gm)
