"""DoRA (``LoraConfig(use_dora=True)``) against PEFT 0.21: files both ways, outputs per site kind (linear, GPT-2
``Conv1D``, conv 1d/2d/3d, embedding; with and without bias and dropout), merge and unmerge, training and gradients,
and the rules every fxpeft adapter keeps (zero-init is exact, off is exact, typed errors leave the graph unchanged)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import assert_unchanged, out_tensor, rel_err, snapshot
from torch import nn

import fxpeft
from fxpeft import Role, zoo
from fxpeft.tags import get_tag

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # deepcopy of an export graph


def _gpt2():
    """A 1-layer GPT-2 without dropout (its ``Conv1D`` sites have biases), so train-mode outputs are comparable."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval(), (), {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}


class _Convs(nn.Module):
    """Conv1d, Conv3d and a linear head, with biases and no dropout of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c3 = nn.Conv3d(2, 3, 3, padding=1, stride=2)
        self.head = nn.Linear(4 * 6 + 3 * 8, 5)

    def forward(self, x, v):
        a = torch.relu(self.c1(x)).flatten(1)
        b = torch.relu(self.c3(v)).flatten(1)
        return self.head(torch.cat([a, b], 1))


def _convs():
    torch.manual_seed(0)
    return _Convs().eval(), (torch.randn(2, 3, 6), torch.randn(2, 2, 4, 4, 4)), {}


_BASES = {"llama": zoo.tiny_llama, "gpt2": _gpt2, "cnn": zoo.cnn, "convs": _convs}
# cnn's conv2 is dilated: PEFT's lora_A ignores the dilation there (fxpeft warns), so it is left out
_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"],
            "cnn": ["conv1", "conv3", "fc"], "convs": ["c1", "c3", "head"]}


@functools.lru_cache(maxsize=None)
def _base(name: str):
    model, args, kwargs = _BASES[name]()
    return model, args, kwargs, fxpeft.trace(model, args, kwargs)


def _graph(name: str, symbolic: bool = False):
    model, *_ = _base(name)
    return fxpeft.trace(copy.deepcopy(model)) if symbolic else copy.deepcopy(_base(name)[3])


def _run(m, name: str, peft_model: bool = False) -> torch.Tensor:
    _, args, kwargs, _ = _base(name)
    if not peft_model:
        kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
    return out_tensor(m(*args, **kwargs))


def _peft_config(name: str, **kw):
    kw = {"target_modules": _TARGETS[name], "r": 4, "lora_alpha": 8, "init_lora_weights": False, "use_dora": True, **kw}
    return peft.LoraConfig(**kw)


def _fx_config(name: str, **kw):
    kw = {"target_modules": _TARGETS[name], "r": 4, "lora_alpha": 8, "init_lora_weights": False, "use_dora": True, **kw}
    return fxpeft.LoraConfig(**kw)


def _peft_layer(pm, site: str):
    return pm.base_model.model.get_submodule(site)


def _peft_params(pm, ad) -> dict[str, torch.Tensor]:
    """PEFT's A, B and magnitude at an fxpeft adapter's site (A, B in fxpeft's layout)."""
    layer = _peft_layer(pm, ad.site_name)
    if ad.kind == "embedding":
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return {"A": A, "B": B, "magnitude": layer.lora_magnitude_vector["default"].weight}


@torch.no_grad()
def _spread(magnitudes, seed: int = 0) -> None:
    """Move each magnitude away from the norm it was initialised to (as training would): m/||W + sBA|| != 1."""
    g = torch.Generator().manual_seed(seed)
    for m in magnitudes:
        m.mul_(1 + 0.3 * torch.randn(m.shape, generator=g))


def _peft_model(name: str, seed: int = 0, **kw):
    model = copy.deepcopy(_base(name)[0])
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, _peft_config(name, **kw))
    _spread([m.weight for m in pm.modules() if isinstance(m, peft.tuners.lora.dora.DoraLinearLayer)], seed)
    return pm


# ------------------------------------------------------------------------------------------ files both ways


@pytest.mark.parametrize("name", list(_BASES))
def test_peft_dora_file_loads_with_peft_outputs(name, tmp_path):
    pm = _peft_model(name).eval()
    pm.save_pretrained(tmp_path)
    gm = fxpeft.load_adapter(_graph(name), tmp_path).eval()
    gm.graph.lint()
    with torch.no_grad():
        theirs, ours = _run(pm, name, True), _run(gm, name)
        assert rel_err(theirs, _run(_base(name)[0], name, True)) > 1e-3  # DoRA really changes the outputs
    assert rel_err(ours, theirs) <= 1e-5
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == pm.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("name", ["llama", "gpt2", "convs"])
def test_fxpeft_dora_file_loads_in_peft_with_the_same_outputs(name, tmp_path):
    torch.manual_seed(1)
    gm = fxpeft.rewrite(_graph(name), _fx_config(name)).eval()
    _spread([ad.magnitude for ad in fxpeft.adapters(gm).values()])
    fxpeft.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(_base(name)[0]), tmp_path).eval()
    assert pm.peft_config["default"].use_dora
    with torch.no_grad():
        assert rel_err(_run(gm, name), _run(pm, name, True)) <= 1e-5
    again = fxpeft.load_adapter(_graph(name), tmp_path)  # and back: bit-exact
    for (n, a), (_, b) in zip(sorted(fxpeft.adapters(gm).items()), sorted(fxpeft.adapters(again).items())):
        assert torch.equal(a.magnitude, b.magnitude) and torch.equal(a.A, b.A), n


# ------------------------------------------------------------------------------------------ train mode, gradients


@pytest.mark.parametrize("name,symbolic", [("llama", False), ("gpt2", False), ("convs", False), ("convs", True)],
                         ids=["llama", "gpt2-conv1d", "conv1d-conv3d-export", "conv1d-conv3d-symbolic"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_train_mode_outputs_and_gradients_match_peft(name, symbolic, dropout, tmp_path):
    """One training forward/backward with the same weights. Behind a dropout PEFT's DoRA takes its base term from the
    dropped-out input (a second base matmul): the dropouts are made the identity (p=0, still not ``nn.Identity``)
    so that the two are comparable, and that branch is what is compared."""
    pm = _peft_model(name, lora_dropout=dropout)
    pm.save_pretrained(tmp_path)
    gm = fxpeft.load_adapter(_graph(name, symbolic), tmp_path)
    for m in list(pm.modules()) + list(gm.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    assert any(hasattr(ad, "dora_base") for ad in fxpeft.adapters(gm).values()) == (dropout > 0)
    pm.train(), gm.train()
    theirs, ours = _run(pm, name, True), _run(gm, name)
    assert rel_err(ours, theirs) <= 1e-5
    (theirs.square().mean()).backward()
    (ours.square().mean()).backward()
    for ad in fxpeft.adapters(gm).values():
        for k, p in _peft_params(pm, ad).items():
            mine = getattr(ad, k).grad
            assert mine is not None and rel_err(mine.reshape(p.shape), p.grad) <= 1e-4, (ad.site_name, k)


def test_weight_norm_is_detached_as_in_peft():
    """DoRA §4.3: no gradient flows through ||W + s·BA||; the graph's norm reads A and B detached."""
    gm = fxpeft.rewrite(_graph("llama"), _fx_config("llama", target_modules=["q_proj"]))
    norms = [n for n in gm.graph.nodes if (t := get_tag(n)) is not None and t.role is Role.WEIGHT_NORM]
    assert len(norms) == 2  # one per layer
    reads = [n for n in gm.graph.nodes if (t := get_tag(n)) is not None and t.role is Role.NORM_TERM
             and n.target in (torch.ops.aten.detach.default, torch.detach)]
    assert len(reads) == 4  # A and B, per site


def test_training_lowers_the_loss_with_peft_trainable_counts():
    _, _, kwargs, _ = _base("llama")
    ids = kwargs["input_ids"]
    cfg = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    gm = fxpeft.rewrite(_graph("llama"), fxpeft.LoraConfig(**cfg)).train()
    pm = peft.get_peft_model(copy.deepcopy(_base("llama")[0]), peft.LoraConfig(**cfg))
    assert fxpeft.get_nb_trainable_parameters(gm) == pm.get_nb_trainable_parameters()
    params = [p for p in gm.parameters() if p.requires_grad]
    assert sum(p.numel() for n, p in gm.named_parameters() if n.endswith("magnitude")) > 0
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        logits = gm(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(ad.magnitude.grad is not None for ad in fxpeft.adapters(gm).values())


# ------------------------------------------------------------------------------------------ merge, unmerge


@pytest.mark.parametrize("name", ["llama", "gpt2", "cnn", "convs"])
def test_merge_is_exact_and_unmerge_restores_the_base(name):
    torch.manual_seed(2)
    gm = fxpeft.rewrite(_graph(name), _fx_config(name)).eval()
    _spread([ad.magnitude for ad in fxpeft.adapters(gm).values()])
    with torch.no_grad():  # PEFT's random embedding init (N(0, 1) A and B) makes s·BA ~200x the 0.02-scale table:
        for ad in fxpeft.adapters(gm).values():  # fp32 cannot give W back to 1e-6 then, plain LoRA neither
            if ad.kind == "embedding":
                ad.B.mul_(0.01)
    sites = fxpeft.find_sites(gm)
    weights = {s.weight: gm.get_parameter(s.weight).detach().clone() for n, s in sites.items()
               if any(ad.site_name == n for ad in fxpeft.adapters(gm).values())}
    with torch.no_grad():
        unmerged = _run(gm, name)
        fxpeft.merge_adapter(gm)
        assert rel_err(_run(gm, name), unmerged) <= 1e-5
        fxpeft.unmerge_adapter(gm)
        for w, before in weights.items():
            assert rel_err(gm.get_parameter(w), before) <= 1e-6, w
        assert rel_err(_run(gm, name), unmerged) <= 1e-5
        merged = fxpeft.merge(copy.deepcopy(gm))
        assert not fxpeft.adapters(merged)
        assert rel_err(_run(merged, name), unmerged) <= 1e-5


def test_merged_weights_are_peft_merged_weights(tmp_path):
    pm = _peft_model("gpt2")
    pm.save_pretrained(tmp_path)
    gm = fxpeft.merge(fxpeft.load_adapter(_graph("gpt2"), tmp_path))
    theirs = pm.merge_and_unload()
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"):
        w = fxpeft.find_sites(gm)[name].weight
        assert rel_err(gm.get_parameter(w), theirs.get_submodule(name).weight) <= 1e-6, name


# ------------------------------------------------------------------------------------------ the fxpeft rules


@pytest.mark.parametrize("name,symbolic", [("llama", False), ("gpt2", False), ("cnn", False), ("convs", True)])
def test_zero_init_gives_exactly_the_base_outputs(name, symbolic):
    gm = _graph(name, symbolic).eval()
    with torch.no_grad():
        base = _run(gm, name)
        fxpeft.rewrite(gm, _fx_config(name, init_lora_weights=True, lora_dropout=0.1))
        assert torch.equal(_run(gm, name), base)
        gm.train()
        if name != "cnn":  # the CNN's own dropout
            assert torch.equal(_run(gm, name), _run(gm.eval(), name))


def test_off_disabled_and_set_adapter_are_exact():
    gm = _graph("llama").eval()
    with torch.no_grad():
        base = _run(gm, "llama")
        torch.manual_seed(3)
        fxpeft.rewrite(gm, _fx_config("llama"), adapter_name="a")
        fxpeft.rewrite(gm, _fx_config("llama", target_modules=["q_proj", "k_proj"]), adapter_name="b")
        _spread([ad.magnitude for ad in fxpeft.adapters(gm).values()])
        a = _run(gm, "llama")
        with fxpeft.disable_adapters(gm):
            assert torch.equal(_run(gm, "llama"), base)
        assert torch.equal(_run(gm, "llama"), a)
        fxpeft.set_adapter(gm, "b")
        b = _run(gm, "llama")
        alone = copy.deepcopy(gm)
        fxpeft.delete_adapter(alone, "a")
        assert torch.equal(_run(alone, "llama"), b)
        fxpeft.set_adapter(gm, "a")
        assert torch.equal(_run(gm, "llama"), a)
        fxpeft.merge_adapter(gm)  # merged: the graph adds nothing (g = 1, no LoRA branch)
        assert rel_err(_run(gm, "llama"), a) <= 1e-5


def test_zero_norm_row_is_a_typed_error_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[1].zero_()
    gm = fxpeft.trace(model)
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match=r"(?s)'0'.*all-zero weights \(the first: output 1\).*NaN"):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert_unchanged(gm, snap)
    assert not fxpeft.adapters(gm)


def test_mixed_batch_refuses_dora_and_changes_nothing():
    gm = fxpeft.rewrite(_graph("llama"), _fx_config("llama", target_modules=["q_proj"]), adapter_name="a")
    fxpeft.rewrite(gm, _fx_config("llama", target_modules=["q_proj"], use_dora=False), adapter_name="b")
    snap = snapshot(gm)
    with pytest.raises(fxpeft.UnsupportedSiteError, match="(?s)'a'.*DoRA.*mixed-batch"):
        fxpeft.mixed_batch(gm)
    assert_unchanged(gm, snap)


def test_weighted_merge_and_hotswap_keep_to_what_dora_allows(tmp_path):
    gm = fxpeft.rewrite(_graph("convs"), _fx_config("convs"), adapter_name="a")
    fxpeft.rewrite(gm, _fx_config("convs"), adapter_name="b")
    with pytest.raises(fxpeft.ConfigError, match="DoRA"):
        fxpeft.add_weighted_adapter(gm, ["a", "b"], [0.5, 0.5], "ab")
    torch.manual_seed(4)
    src = fxpeft.rewrite(_graph("convs"), _fx_config("convs"))
    _spread([ad.magnitude for ad in fxpeft.adapters(src).values()])
    fxpeft.save_adapter(src, tmp_path / "dora")
    fxpeft.save_adapter(fxpeft.rewrite(_graph("convs"), _fx_config("convs", use_dora=False)), tmp_path / "lora")
    target = fxpeft.rewrite(_graph("convs"), _fx_config("convs", init_lora_weights=True)).eval()
    code = target.code
    fxpeft.hotswap_adapter(target, tmp_path / "dora")
    with torch.no_grad():
        assert target.code == code and torch.equal(_run(target, "convs"), _run(src.eval(), "convs"))
    snap = snapshot(target)
    with pytest.raises(fxpeft.AdapterFileError, match="use_dora"):
        fxpeft.hotswap_adapter(target, tmp_path / "lora")
    assert_unchanged(target, snap)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_fusion_of_dora_siblings(dropout):
    """q/k/v share one down matmul (and one dropout mask) with DoRA too; behind a dropout DoRA's base term reads the
    shared dropped-out input. Unfusing gives each site its own chain back."""
    from fxpeft.passes import UnfuseLowRankSiblings

    cfg = dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=dropout)
    fused = fxpeft.rewrite(_graph("llama"), _fx_config("llama", **cfg))
    unfused = fxpeft.rewrite(_graph("llama"), _fx_config("llama", **cfg), fuse=False)
    unfused.load_state_dict(fused.state_dict())
    cats = [n for n in fused.graph.nodes if (t := get_tag(n)) is not None and t.role is Role.DOWN_CAT]
    assert len(cats) == 2  # one per layer
    for m in list(fused.modules()) + list(unfused.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # the same outputs in training: DoRA's base term behind the (identity) dropout
    for mode in ("eval", "train"):
        getattr(fused, mode)(), getattr(unfused, mode)()
        want = _run(unfused, "llama")
        assert rel_err(_run(fused, "llama"), want) <= 1e-6, mode
    UnfuseLowRankSiblings()(fused)
    fused.graph.lint()
    assert not [n for n in fused.graph.nodes if (t := get_tag(n)) is not None and t.fused]
    assert rel_err(_run(fused, "llama"), want) <= 1e-6
    _run(fused, "llama").square().mean().backward()


@pytest.mark.parametrize("keep_base_dtype", [False, True], ids=["fp32-adapters", "keep-base-dtype"])
def test_bf16_base(keep_base_dtype, tmp_path):
    model = copy.deepcopy(_base("llama")[0]).to(torch.bfloat16)
    _, args, kwargs, _ = _base("llama")
    gm = fxpeft.trace(model, args, kwargs)
    fresh = copy.deepcopy(gm)
    with torch.no_grad():
        base = out_tensor(gm(input_ids=kwargs["input_ids"]))
    fxpeft.rewrite(gm, _fx_config("llama", init_lora_weights=True, keep_base_dtype=keep_base_dtype))
    want = torch.bfloat16 if keep_base_dtype else torch.float32
    assert {ad.magnitude.dtype for ad in fxpeft.adapters(gm).values()} == {want}
    with torch.no_grad():
        assert torch.equal(out_tensor(gm(input_ids=kwargs["input_ids"])), base)  # zero-init: exact, in bf16 too
    if keep_base_dtype:
        return
    pm = _peft_model("llama")
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()  # fp32 adapters on the bf16 base
    ours = fxpeft.load_adapter(fresh, tmp_path).eval()
    with torch.no_grad():
        a, b = _run(ours, "llama"), _run(theirs, "llama", True)
    assert a.dtype == b.dtype == torch.bfloat16
    assert rel_err(a.float(), b.float()) <= 1e-2


def test_torch_compile_trains_without_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    gm = fxpeft.rewrite(fxpeft.trace(model, (x,)), fxpeft.LoraConfig(r=2, target_modules=["0", "2"], use_dora=True,
                                                                     init_lora_weights=False))
    _spread([ad.magnitude for ad in fxpeft.adapters(gm).values()])
    eager = copy.deepcopy(gm)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, backend=counter)
    got, want = compiled(x), eager(x)
    assert rel_err(got, want) <= 1e-5
    got.sum().backward(), want.sum().backward()
    for (n, p), (_, q) in zip(gm.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            assert rel_err(p.grad, q.grad) <= 1e-5, n
    for ad in fxpeft.adapters(gm).values():  # off: the base outputs, and no recompile
        ad.set_active(False)
    assert torch.equal(compiled(x), model(x))
    assert counter.frame_count == 1
