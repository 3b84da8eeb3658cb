"""LoRA initialisations against PEFT 0.21 (orthogonal, PiSSA, randomised PiSSA, OLoRA, MiCA): the same factors and
residual base weight from the same seed, the same outputs once the factors move, files both ways, PEFT's conversion
to a plain LoRA on the original base (``path_initial_model_for_weight_conversion``) and fxpeft's own, merge, training,
MiCA's frozen factor; and the typed refusals: inits and sites PEFT rejects or silently bends, and every LoRA-variant
field of PEFT's ``LoraConfig`` fxpeft does not implement (enumerated, so that a new PEFT field cannot be ignored)."""

from __future__ import annotations

import copy
import dataclasses
import json
import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import (
    assert_unchanged,
    out_tensor,
    rel_err,
    snapshot,
)
from conftest import (
    run_graph as _run,
)
from conftest import (
    run_model as _run_model,
)
from conftest import (
    traced_base as _base,
)
from conftest import (
    traced_copy as _graph,
)
from safetensors.torch import load_file

import fxpeft
from fxpeft.errors import AdapterFileError, ConfigError, UnsupportedSiteError
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.lora import _VARIANT_FIELDS, Lora, LoraConfig

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*changes the base weights:UserWarning")]

_T = ["q_proj", "v_proj", "down_proj"]


def _pair(base: str, fields: dict, seed: int = 3, peft_object: bool = False):
    """PEFT's model and fxpeft's graph for one config, each initialised right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(_base(base)[0]), peft.LoraConfig(**fields)).eval()
    torch.manual_seed(seed)
    config = peft.LoraConfig(**fields) if peft_object else LoraConfig(**fields)
    return pm, fxpeft.rewrite(_graph(base), config).eval()


def _peft_param(pm, site: str, key: str) -> torch.nn.Parameter:
    return pm.get_parameter(f"base_model.model.{site}.{key}")


@torch.no_grad()
def _perturb(pm, gm, seed: int = 5) -> None:
    """The same random step on both sides' factors (the trained state of a test)."""
    torch.manual_seed(seed)
    for m in fxpeft.adapters(gm).values():
        a, b = ("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding" else ("lora_A.default.weight",
                                                                                      "lora_B.default.weight")
        a, b = (f"{a}.default", f"{b}.default") if m.kind == "embedding" else (a, b)
        dA, dB = torch.randn_like(m.A) * 0.1, torch.randn_like(m.B) * 0.1
        m.A.add_(dA), m.B.add_(dB)
        _peft_param(pm, m.site_name, a).add_(dA), _peft_param(pm, m.site_name, b).add_(dB)


CASES = {  # name: (base, LoraConfig fields, pass PEFT's own config object to fxpeft.rewrite)
    "pissa": ("llama", dict(r=4, lora_alpha=8, target_modules=_T, init_lora_weights="pissa"), False),
    "pissa-rslora-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=_T, init_lora_weights="pissa", use_rslora=True,
                                            rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}), True),
    "pissa_niter_2": ("llama", dict(r=4, lora_alpha=8, target_modules=_T, init_lora_weights="pissa_niter_2"), False),
    "olora": ("llama", dict(r=4, lora_alpha=16, target_modules=_T, init_lora_weights="olora"), True),
    "orthogonal": ("llama", dict(r=4, lora_alpha=8, target_modules=_T, init_lora_weights="orthogonal"), False),
    "mica": ("llama", dict(r=4, lora_alpha=8, target_modules=_T, init_lora_weights="mica"), True),
    "gpt2-conv1d-pissa": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                       init_lora_weights="pissa"), False),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_init_matches_peft_then_files_both_ways(case, tmp_path):
    base, fields, as_object = CASES[case]
    pm, gm = _pair(base, fields, peft_object=as_object)
    before = _run_model(_base(base)[0], base)
    # the same factors and the same residual base weight, to the bit (SVD signs included: same LAPACK call)
    for m in fxpeft.adapters(gm).values():
        site = m.site_name
        assert torch.equal(m.A, _peft_param(pm, site, "lora_A.default.weight"))
        assert torch.equal(m.B, _peft_param(pm, site, "lora_B.default.weight"))
        assert torch.equal(gm.get_parameter(f"{site}.weight"), _peft_param(pm, site, "base_layer.weight"))
    # at init the model is the base model (W_res + s·B·A = W; MiCA's A = 0, orthogonal's B·A = 0)
    init_out = _run(gm, base)
    assert rel_err(init_out, before) <= 1e-5
    if fields["init_lora_weights"] == "mica":
        assert torch.equal(init_out, before)
    assert fxpeft.get_nb_trainable_parameters(gm) == pm.get_nb_trainable_parameters()

    _perturb(pm, gm)
    ref = _run_model(pm, base)
    got = _run(gm, base)
    assert rel_err(got, before) > 1e-2 and rel_err(got, ref) <= 1e-5

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT: PEFT re-runs the init on the original base
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    init = fields["init_lora_weights"]
    assert config["init_lora_weights"] == (True if init == "orthogonal" else init)
    if init == "pissa_niter_2":
        return  # re-running a randomised SVD on load gives another residual (in PEFT too): see the converted test
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(_base(base)[0]), str(tmp_path / "fx"))
    assert rel_err(_run_model(pm2, base), got) <= 1e-5
    pm.save_pretrained(str(tmp_path / "peft"))  # PEFT -> fxpeft
    loaded = fxpeft.load_adapter(_graph(base), tmp_path / "peft").eval()
    assert rel_err(_run(loaded, base), ref) <= 1e-5
    ours, theirs = load_file(tmp_path / "fx" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("init, extra", [("pissa_niter_2", dict(use_rslora=True)),  # PEFT refuses rsLoRA + patterns
                                         ("olora", dict(rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}))])
def test_converted_files_apply_to_the_original_base(init, extra, tmp_path):
    """PEFT converts with ``path_initial_model_for_weight_conversion``; fxpeft with the same argument, or from the
    initial factors the graph kept. Each side's converted file (a rank-2r plain LoRA) loads on the *original* base of
    the other and gives the fine-tuned model. Different seeds on each side: the randomised SVD need not agree."""
    fields = dict(r=4, lora_alpha=8, target_modules=_T, init_lora_weights=init, **extra)
    model = _base("llama")[0]
    torch.manual_seed(11)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter is saved as plain LoRA
    pm.save_pretrained(str(tmp_path / "peft_init"))
    pm.peft_config["default"].init_lora_weights = init
    torch.manual_seed(12)
    gm = fxpeft.rewrite(_graph("llama"), LoraConfig(**fields)).eval()
    fxpeft.save_adapter(gm, tmp_path / "fx_init")
    with torch.no_grad():  # "training": a random step on each side
        for p in [*(p for n, p in pm.named_parameters() if "lora_" in n), *gm.parameters()]:
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ref, got = _run_model(pm.eval(), "llama"), _run(gm, "llama")

    pm.save_pretrained(str(tmp_path / "peft_conv"), path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    fxpeft.save_adapter(gm, tmp_path / "fx_conv", convert_to_original_base=True)
    fxpeft.save_adapter(gm, tmp_path / "fx_conv2", path_initial_model_for_weight_conversion=tmp_path / "fx_init")
    a, b = load_file(tmp_path / "fx_conv" / WEIGHTS_NAME), load_file(tmp_path / "fx_conv2" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # both fxpeft forms: the same file
    theirs = json.loads((tmp_path / "peft_conv" / CONFIG_NAME).read_text())
    ours = json.loads((tmp_path / "fx_conv" / CONFIG_NAME).read_text())
    for k in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert ours[k] == pytest.approx(theirs[k]), k
    assert ours["r"] == 8 and ours["lora_alpha"] == pytest.approx(8 * 2 ** 0.5 if "use_rslora" in extra else 16)

    if init.startswith("pissa_niter"):  # the unconverted file would re-randomise the residual on load: a warning
        pm.save_pretrained(str(tmp_path / "peft_raw"))
        with pytest.warns(UserWarning, match="randomised SVD"):
            fxpeft.load_adapter(_graph("llama"), tmp_path / "peft_raw")
    on_original = fxpeft.load_adapter(_graph("llama"), tmp_path / "peft_conv").eval()  # PEFT's file, fxpeft
    assert rel_err(_run(on_original, "llama"), ref) <= 1e-5
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx_conv"))  # fxpeft's file, PEFT
    assert rel_err(_run_model(pm2, "llama"), got) <= 1e-5
    # a converted file is plain LoRA: PEFT loads it without touching the original base weight
    assert torch.equal(pm2.get_parameter("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"),
                       model.get_parameter("model.layers.0.self_attn.q_proj.weight"))
    with pytest.raises(AdapterFileError, match="kept no initial tensors"):  # a plain LoRA has nothing to convert
        fxpeft.save_adapter(fxpeft.rewrite(_graph("llama"), LoraConfig(r=2, target_modules=["q_proj"])),
                            tmp_path / "x", convert_to_original_base=True)
    with pytest.raises(AdapterFileError, match="do not fit"):  # an initial adapter of other ranks
        fxpeft.save_adapter(gm, tmp_path / "x", path_initial_model_for_weight_conversion=_other_rank_init(tmp_path))


def _other_rank_init(tmp_path):
    gm = fxpeft.rewrite(_graph("llama"), LoraConfig(r=6, target_modules=_T, init_lora_weights="olora"))
    fxpeft.save_adapter(gm, tmp_path / "other")
    return tmp_path / "other"


@pytest.mark.filterwarnings("ignore")
def test_merge_and_train_pissa_and_mica():
    """merge ≈ unmerged, unmerge gives the residual back; a few steps lower the loss; MiCA's B stays frozen."""
    for init in ("pissa", "mica"):
        gm = fxpeft.rewrite(_graph("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=_T, init_lora_weights=init))
        residual = gm.get_parameter("model.layers.0.self_attn.q_proj.weight").detach().clone()
        _, args, kwargs, _ = _base("llama")
        ids = kwargs["input_ids"]
        opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
        frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if n.endswith(".B")}
        losses = []
        gm.train()
        for _ in range(4):
            logits = out_tensor(gm(input_ids=ids))
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad(), loss.backward(), opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        b_moved = any(not torch.equal(p, frozen[n]) for n, p in gm.named_parameters() if n in frozen)
        assert b_moved == (init != "mica")
        gm.eval()
        out = _run(gm, "llama")
        fxpeft.merge_adapter(gm)
        assert rel_err(_run(gm, "llama"), out) <= 1e-5
        fxpeft.unmerge_adapter(gm)
        assert rel_err(gm.get_parameter("model.layers.0.self_attn.q_proj.weight"), residual) <= 1e-6
        merged = fxpeft.merge(copy.deepcopy(gm))
        assert not fxpeft.adapters(merged) and rel_err(_run(merged, "llama"), out) <= 1e-5
    # MiCA's frozen B: set_adapter switches only A back on
    fxpeft.set_adapter(gm, "default")
    assert sorted(n.rsplit(".", 1)[-1] for n, p in gm.named_parameters() if p.requires_grad) == ["A"] * 6


@pytest.mark.parametrize("fields, error, match", [
    (dict(r=40, target_modules=["k_proj"], init_lora_weights="pissa"), UnsupportedSiteError, "rank bound"),
    (dict(r=4, rank_pattern={"k_proj": 33}, target_modules=["k_proj"], init_lora_weights="olora"),
     UnsupportedSiteError, "min\\(64, 32\\)"),
    (dict(r=40, target_modules=["k_proj"], init_lora_weights="mica"), UnsupportedSiteError, "rank bound"),
    (dict(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"), ConfigError, "even"),
    (dict(r=4, target_modules=["q_proj"], init_lora_weights="pisa"), ConfigError, "'pisa' is not supported"),
    (dict(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_x"), ConfigError, "not supported"),
    (dict(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_1000000"), ConfigError, "k <= 100"),
    (dict(r=4, target_modules=["q_proj"], init_lora_weights="corda"), ConfigError, "calibration activations"),
    (dict(r=4, target_modules=["q_proj"], init_lora_weights="eva"), ConfigError, "initialize_lora_eva_weights"),
    (dict(r=4, target_modules=["q_proj"], init_lora_weights="loftq"), ConfigError, "path_initial_model"),
    (dict(r=4, target_modules=["q_proj"], init_lora_weights="pissa", use_dora=True), ConfigError, "use_dora"),
    (dict(r=4, target_modules=["embed_tokens"], init_lora_weights="pissa"), UnsupportedSiteError, "linear layers"),
])
def test_bad_inits_are_refused_and_the_graph_is_unchanged(fields, error, match):
    gm = _graph("llama")
    snap = snapshot(gm)
    with pytest.raises(error, match=match):
        fxpeft.rewrite(gm, LoraConfig(**fields))
    assert_unchanged(gm, snap)


def test_refusals_on_other_site_kinds():
    for base, fields, match in (("gpt2", dict(target_modules=["c_attn"], init_lora_weights="olora"), "stored \\[in, out\\]"),
                                ("cnn", dict(target_modules=["conv1"], init_lora_weights="pissa"), "conv"),
                                ("cnn", dict(target_modules=["conv1"], init_lora_weights="orthogonal"), "conv")):
        gm = _graph(base)
        snap = snapshot(gm)
        with pytest.raises(UnsupportedSiteError, match=match):
            fxpeft.rewrite(gm, LoraConfig(r=2, **fields))
        assert_unchanged(gm, snap)


def test_a_failed_rewrite_puts_the_base_weight_back(monkeypatch):
    """The residual is written inside the rewrite's transaction: a failure after it restores the original weight."""
    gm = _graph("llama")
    snap = snapshot(gm)
    monkeypatch.setattr(Lora, "insert", classmethod(lambda cls, *a: (_ for _ in ()).throw(RuntimeError("boom"))))
    with pytest.raises(RuntimeError, match="boom"):
        fxpeft.rewrite(gm, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert_unchanged(gm, snap)


def test_zero_init_mica_on_an_embedding_matches_peft():
    pm, gm = _pair("llama", dict(r=4, target_modules=["embed_tokens"], init_lora_weights="mica"))
    assert torch.equal(_run(gm, "llama"), _run_model(_base("llama")[0], "llama"))  # A = 0: exactly the base
    (m,) = fxpeft.adapters(gm).values()
    assert torch.equal(m.B, _peft_param(pm, m.site_name, "lora_embedding_B.default"))
    assert fxpeft.get_nb_trainable_parameters(gm) == pm.get_nb_trainable_parameters()
    _perturb(pm, gm)
    assert rel_err(_run(gm, "llama"), _run_model(pm, "llama")) <= 1e-5


# ------------------------------------------------------------------------------ every PEFT LoraConfig field
#: fields of every PEFT config that do not change what an adapter computes (bookkeeping)
_BOOKKEEPING = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "layers_pattern", "fan_in_fan_out"}
#: fields that only matter together with a refused one, or that only place memory
_NEUTRAL = {"megatron_core": "megatron_config", "qalora_group_size": "use_qalora",
            "runtime_config": "ephemeral_gpu_offload: where adapter weights live, not what they compute"}
#: a non-default value for each refused field (JSON, as a file holds it)
_SAMPLES = {"megatron_config": {"tensor_model_parallel_size": 2}, "loftq_config": {"loftq_bits": 4},
            "eva_config": {"rho": 2.0}, "corda_config": {"corda_method": "kpm"}, "lora_ga_config": {"bsz": 2},
            "velora_config": {"rank": 2}, "alora_invocation_tokens": [1, 2], "use_qalora": True,
            "monteclora_config": {"n_samples": 2}, "layer_replication": [[0, 1]],
            "target_parameters": ["mlp.experts.down_proj"], "use_bdlora": {"nblocks": 2}, "arrow_config": {"top_k": 2},
            "kasa_config": {"alpha": 1.0}, "ensure_weight_tying": True}


def test_every_peft_lora_field_is_implemented_or_refused(tmp_path):
    own = {f.name for f in dataclasses.fields(LoraConfig)}
    refused = set(_VARIANT_FIELDS) - own
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unaccounted = peft_fields - own - _BOOKKEEPING - set(_NEUTRAL) - refused
    assert not unaccounted, f"PEFT LoraConfig fields fxpeft neither implements nor refuses: {sorted(unaccounted)}"
    assert refused <= set(_SAMPLES)
    gm = fxpeft.rewrite(_graph("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    fxpeft.save_adapter(gm, tmp_path / "a")
    (tmp_path / "a" / ".fxpeft-manifest.json").unlink()  # the configs below are rewritten on purpose
    good = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    target = _graph("llama")
    snap = snapshot(target)
    for name in sorted(refused):
        bad = {**good, name: _SAMPLES[name]}
        with pytest.raises(AdapterFileError, match=name):  # from a PEFT config's fields (rewrite's path) ...
            fxpeft.config_from_peft(type("Cfg", (), {"to_dict": lambda self, b=bad: b})())
        (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(bad))
        with pytest.raises(AdapterFileError, match=name):  # ... and from a file
            fxpeft.load_adapter(target, tmp_path / "a")
        assert_unchanged(target, snap)
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(good))
    fxpeft.load_adapter(target, tmp_path / "a")  # the untouched file loads


def test_peft_config_objects_with_variants_are_refused_by_rewrite():
    gm = _graph("llama")
    snap = snapshot(gm)
    for kw in (dict(layer_replication=[[0, 1]]), dict(use_qalora=True),
               dict(ensure_weight_tying=True), dict(init_lora_weights="corda"), dict(init_lora_weights="eva")):
        with pytest.raises(AdapterFileError, match=next(iter(kw.values())) if "init_lora_weights" in kw
                           else next(iter(kw))):
            fxpeft.rewrite(gm, peft.LoraConfig(r=2, target_modules=["q_proj"], **kw))
        assert_unchanged(gm, snap)


def test_every_peft_init_is_implemented_or_refused():
    """PEFT's ``init_lora_weights`` values (its annotation, plus LoRA-GA) each build, or are refused with a typed
    error before anything changes; a value PEFT adds later fails here until it is handled."""
    annotation = next(f.type for f in dataclasses.fields(peft.LoraConfig) if f.name == "init_lora_weights")
    values = {v for part in typing.get_args(annotation) for v in typing.get_args(part)} or set(
        __import__("re").findall(r"'([^']+)'", str(annotation)))
    values = {"pissa_niter_3" if v.startswith("pissa_niter") else v for v in values} | {"lora_ga", True, False}
    implemented = {True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_3", "olora", "mica"}
    assert values - implemented <= {"eva", "corda", "loftq", "lora_ga"}, sorted(map(str, values - implemented))
    for v in values:
        config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=v)
        if v in implemented:
            Lora.validate_config(config)
        else:
            with pytest.raises(ConfigError, match=str(v)):
                Lora.validate_config(config)


@pytest.mark.filterwarnings("ignore")
def test_pissa_on_a_bf16_base_matches_peft():
    """Factors and residual computed in fp32, the residual cast to bf16, the factors rounded through bf16 and
    kept in fp32 (PEFT's autocast): the same bits."""
    model = copy.deepcopy(_base("llama")[0]).to(torch.bfloat16)
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa")
    pm = peft.get_peft_model(model, peft.LoraConfig(**fields))
    gm = fxpeft.rewrite(_graph("llama").to(torch.bfloat16), LoraConfig(**fields))  # the weights are what counts
    for m in fxpeft.adapters(gm).values():
        assert m.A.dtype == torch.float32
        assert torch.equal(m.A, _peft_param(pm, m.site_name, "lora_A.default.weight"))
        assert torch.equal(m.B, _peft_param(pm, m.site_name, "lora_B.default.weight"))
        assert torch.equal(gm.get_parameter(f"{m.site_name}.weight"), _peft_param(pm, m.site_name, "base_layer.weight"))


def test_hotswap_keeps_the_base_so_residual_inits_must_agree(tmp_path):
    fields = dict(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    gm = fxpeft.rewrite(_graph("llama"), LoraConfig(**fields)).eval()
    with torch.no_grad():
        for m in fxpeft.adapters(gm).values():
            m.B.mul_(1.5)
    fxpeft.save_adapter(gm, tmp_path / "p")
    plain = fxpeft.rewrite(_graph("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    snap = snapshot(plain)
    with pytest.raises(AdapterFileError, match="hot-swap keeps the base"):  # its base is no residual
        fxpeft.hotswap_adapter(plain, tmp_path / "p")
    assert_unchanged(plain, snap)
    same = fxpeft.rewrite(_graph("llama"), LoraConfig(**fields)).eval()  # the same deterministic residual
    fxpeft.hotswap_adapter(same, tmp_path / "p")
    assert rel_err(_run(same, "llama"), _run(gm, "llama")) <= 1e-6


@given(st.lists(st.integers(1, 9), min_size=2, max_size=5), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_kaiming_init_draws_what_nn_init_draws(shape, seed):
    import math

    from fxpeft.methods.lora import _kaiming_uniform

    want, got = torch.empty(shape), torch.empty(shape)
    torch.manual_seed(seed)
    torch.nn.init.kaiming_uniform_(want, a=math.sqrt(5))
    torch.manual_seed(seed)
    _kaiming_uniform(got)
    assert torch.equal(got, want)
    _kaiming_uniform(torch.empty(4, 0))  # empty (fan-in 0): left as it is, as nn.init does
