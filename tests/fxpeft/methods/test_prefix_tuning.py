"""Prefix tuning against PEFT 0.21: with PEFT's prefix encoder weights copied in, the same logits and loss on a tiny
GQA Llama and GPT-2 (left and right padding, with and without prefix_projection), in every attention form the graph
can have (explicit mask, is_causal, enable_gqa, repeat_kv), files both ways, PEFT's trainable count, training,
dynamic batch and sequence, greedy decoding by re-running the graph, the base model exactly while disabled, and
typed refusals (merge, bad sizes, a file of another depth, a matmul-softmax attention) that leave the graph
unchanged."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import assert_unchanged, out_tensor, peft_counts, rel_err, snapshot, traced_base
from safetensors.torch import load_file

import fxpeft
from fxpeft import zoo
from fxpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fxpeft.methods.prefix_tuning import PrefixEncoder

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),  # deepcopy of an export graph
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # PEFT, transformers 5
              pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")]

NV = 3
SHARED = "fxpeft_shared_prefix_tuning_default"
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _batch() -> dict[str, torch.Tensor]:
    """Row 0 left-padded, row 1 right-padded; labels -100 on the padding."""
    torch.manual_seed(3)
    ids = torch.randint(1, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@functools.cache
def _traced(name: str, padded: bool = True, normalize: bool = True):
    """(model, graph) of a 2-layer zoo model, traced with the padded batch (or input_ids alone), once per module."""
    if not padded and normalize:  # the shared one: traced with input_ids alone
        return traced_base(name)[0], traced_base(name)[3]
    model = getattr(zoo, f"tiny_{name}")(layers=2)[0]
    kwargs = _batch() if padded else {"input_ids": _batch()["input_ids"]}
    return model, fxpeft.trace(model, (), {**kwargs, "use_cache": False}, normalize_attention=normalize)


def _cfg(**kw) -> peft.PrefixTuningConfig:
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV, **kw)


def _pair(name: str, padded: bool = True, normalize: bool = True, **kw):
    """(model, traced graph, prefix-tuned graph from a PEFT config object, PEFT's model with the same prefix)."""
    model, traced = _traced(name, padded, normalize)  # (always called with all three: one cache key per graph)
    torch.manual_seed(1)
    gm = fxpeft.rewrite(copy.deepcopy(traced), _cfg(**kw)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), _cfg(**kw)).eval()
    pm.prompt_encoder["default"].load_state_dict(gm.get_submodule(SHARED).state_dict())  # PEFT's names, all of them
    return model, traced, gm, pm


def _out(out):
    """(loss, logits) of a graph's or PEFT's output."""
    return (out["loss"], out["logits"]) if isinstance(out, dict) else (out.loss, out.logits)


@pytest.mark.parametrize("name,projection", [("llama", False), ("llama", True), ("gpt2", False)])
def test_same_logits_as_peft_with_padding_and_files_both_ways(name, projection, tmp_path):
    kw = {"prefix_projection": True, "encoder_hidden_size": 24} if projection else {}
    model, traced, gm, pm = _pair(name, **kw)
    batch = _batch()
    assert fxpeft.get_nb_trainable_parameters(gm) == peft_counts(model, _cfg(**kw))
    with torch.no_grad():
        ref_loss, ref = _out(pm(**batch))
        loss, logits = _out(gm(**batch))
        base = model(**batch).logits
    assert logits.shape == ref.shape == (2, 10, 256)  # PEFT's layout: no virtual positions
    assert rel_err(logits, ref) <= 1e-5 and rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(logits, base) > 1e-3  # the prefix really changes the outputs

    fxpeft.save_adapter(gm, tmp_path / "fx")  # fxpeft -> PEFT: the encoder's output, as PEFT writes it
    saved = load_file(str(tmp_path / "fx" / WEIGHTS_NAME))
    token_dim = 32 if name == "llama" else 64  # Llama: head_dim 16 x 2 KV heads (GQA), as PEFT sets it
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (NV, 2 * 2 * token_dim)}
    config = json.loads((tmp_path / "fx" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is projection
    assert (config["num_layers"], config["token_dim"], config.get("target_modules")) == (2, token_dim, None)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        assert rel_err(_out(back(**batch))[1], ref) <= 1e-5

    pm.save_pretrained(str(tmp_path / "peft"))  # PEFT -> fxpeft
    assert torch.allclose(load_file(str(tmp_path / "peft" / WEIGHTS_NAME))["prompt_embeddings"],
                          saved["prompt_embeddings"], atol=1e-6)
    if projection:
        with pytest.warns(UserWarning, match="encoder's output"):
            loaded = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft").eval()
    else:
        loaded = fxpeft.load_adapter(copy.deepcopy(traced), tmp_path / "peft").eval()
    with torch.no_grad():
        l_loss, l_logits = _out(loaded(**batch))
    assert rel_err(l_logits, ref) <= 1e-5 and rel_err(l_loss, ref_loss) <= 1e-5


@pytest.mark.parametrize("normalize", [True, False])
def test_every_attention_form_dynamic_shapes_and_greedy_decoding_match_peft(normalize):
    """Traced from input_ids alone: SDPA with is_causal and enable_gqa (normalised), or with the causal mask and
    repeat_kv's expanded K/V (not normalised)."""
    _, traced, gm, pm = _pair("llama", padded=False, normalize=normalize)
    args = [n.args for n in gm.graph.nodes if n.target is _SDPA]
    assert len(args) == 2 and all((a[3] is None and a[5] is True) is normalize for a in args)
    torch.manual_seed(5)
    with torch.no_grad():
        ids = torch.randint(1, 256, (2, 6))
        with fxpeft.disable_adapters(gm):  # no prefix rows: the base model, bit for bit
            assert torch.equal(out_tensor(gm(input_ids=ids)), out_tensor(traced(input_ids=ids)))
        for shape in [(3, 7), (1, 12)]:  # other batch sizes and sequence lengths than traced
            ids = torch.randint(1, 256, shape)
            assert rel_err(out_tensor(gm(input_ids=ids)), pm(input_ids=ids).logits) <= 1e-5
        seq = ref = torch.randint(1, 256, (2, 5))
        for _ in range(4):  # greedy: re-run on the growing sequence, as PEFT's forward re-run the same way
            seq = torch.cat([seq, out_tensor(gm(input_ids=seq))[:, -1:].argmax(-1)], 1)
            ref = torch.cat([ref, pm(input_ids=ref).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(seq, ref) and seq.shape == (2, 9)


def test_training_lowers_the_loss_disabling_gives_the_base_and_removal_the_code():
    _, traced, gm, _ = _pair("gpt2", prefix_projection=True)
    batch = _batch()
    assert "layer1_key_with_prefix" in gm.code and "mask_with_prefix" in gm.code  # the edit, as it reads
    assert isinstance(gm.get_submodule(SHARED), PrefixEncoder)
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(SHARED + ".") for n in trained)  # only the prefix encoder trains
    opt = torch.optim.Adam(trained.values(), lr=1e-2)
    losses = []
    gm.train()
    for _ in range(4):
        loss = _out(gm(**batch))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in gm.named_parameters() if n in frozen)
    gm.eval()
    with torch.no_grad(), fxpeft.disable_adapters(gm):  # no prefix rows: the base model, bit for bit
        off_loss, off = _out(gm(**batch))
        base_loss, base = _out(traced(**batch))
    assert torch.equal(off, base) and torch.equal(off_loss, base_loss)
    fxpeft.delete_adapter(gm, "default")  # the encoder goes with it
    assert gm.code == traced.code and not any(isinstance(m, PrefixEncoder) for m in gm.modules())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_is_refused_with_the_graph_unchanged(name):
    gm = fxpeft.rewrite(copy.deepcopy(_traced(name, True, True)[1]), fxpeft.PrefixTuningConfig(num_virtual_tokens=2))
    snap = snapshot(gm)
    with pytest.raises(fxpeft.errors.MergeError, match="nothing to fold"):
        fxpeft.merge(gm)
    assert_unchanged(gm, snap)


def test_typed_refusals_leave_the_graph_unchanged(tmp_path):
    gm = copy.deepcopy(_traced("llama", True, True)[1])
    snap = snapshot(gm)
    bad = [({"num_virtual_tokens": 0}, "positive"),
           ({"num_virtual_tokens": -2}, "positive"),
           ({}, "num_virtual_tokens"),
           ({"num_virtual_tokens": 2, "token_dim": 64}, "token_dim=64 does not match"),  # PEFT's value without GQA
           ({"num_virtual_tokens": 2, "num_attention_heads": 4}, "num_attention_heads=4 does not match"),
           ({"num_virtual_tokens": 2, "num_layers": 3}, "num_layers=3 does not match the graph"),
           ({"num_virtual_tokens": 2, "num_transformer_submodules": 2}, "encoder-decoder"),
           ({"num_virtual_tokens": 2, "init_weights": "ones"}, "init_weights")]
    for fields, match in bad:
        with pytest.raises(fxpeft.ConfigError, match=match):
            fxpeft.rewrite(gm, fxpeft.PrefixTuningConfig(**fields))
        assert_unchanged(gm, snap)

    other = fxpeft.rewrite(copy.deepcopy(gm), fxpeft.PrefixTuningConfig(num_virtual_tokens=2))
    fxpeft.save_adapter(other, tmp_path)  # a file of a 3-layer model: its layers do not map to the graph's
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "num_layers": 3}))
    (tmp_path / ".fxpeft-manifest.json").unlink()  # the edit is on purpose
    with pytest.raises(fxpeft.errors.FxPeftError, match="num_layers=3 does not match"):
        fxpeft.load_adapter(gm, tmp_path)
    assert_unchanged(gm, snap)

    snap = snapshot(other)
    with pytest.raises(fxpeft.errors.UnsupportedSiteError, match="one prefix per graph"):
        fxpeft.rewrite(other, fxpeft.PrefixTuningConfig(num_virtual_tokens=2), adapter_name="b")
    assert_unchanged(other, snap)


class _MatmulAttention(torch.nn.Module):
    """A one-head LM whose attention is matmul + softmax (as HF's eager attention), not SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.qkv = torch.nn.Linear(8, 24)
        self.head = torch.nn.Linear(8, 32)

    def forward(self, input_ids):
        q, k, v = self.qkv(self.embed(input_ids)).chunk(3, -1)  # [B, T, 8] each
        return self.head(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


def test_matmul_softmax_attention_and_models_without_embedding_are_refused_by_name():
    torch.manual_seed(0)
    eager = fxpeft.trace(_MatmulAttention(), (torch.randint(0, 32, (2, 6)),))
    snap = snapshot(eager)
    with pytest.raises(fxpeft.errors.UnsupportedSiteError, match="matmul \\+ softmax .*attn_implementation='sdpa'"):
        fxpeft.rewrite(eager, fxpeft.PrefixTuningConfig(num_virtual_tokens=2))
    assert_unchanged(eager, snap)

    cnn = fxpeft.trace(*zoo.cnn()[:2])  # no embedding node
    snap = snapshot(cnn)
    with pytest.raises(fxpeft.errors.UnsupportedSiteError, match="no embedding node"):
        fxpeft.rewrite(cnn, fxpeft.PrefixTuningConfig(num_virtual_tokens=2))
    assert_unchanged(cnn, snap)


@pytest.mark.heavy
def test_compiled_graph_and_a_pt2_match_peft(tmp_path):
    model, _, gm, pm = _pair("llama")
    batch = _batch()
    compiled = torch.compile(gm, fullgraph=True)  # the on/off switch is a guarded Python flag: no graph break
    with torch.no_grad():
        loss, logits = _out(compiled(**batch))
        ref_loss, ref = _out(pm(**batch))
    assert rel_err(logits, ref) <= 1e-5 and rel_err(loss, ref_loss) <= 1e-5
    with fxpeft.disable_adapters(gm), torch.no_grad():  # the toggle recompiles to the base model
        assert rel_err(_out(compiled(**batch))[1], model(**batch).logits) <= 1e-5
    path = tmp_path / "prefix.pt2"
    fxpeft.export(gm, path, kwargs={**batch, "use_cache": False})  # unmerged: the prefix encoder is in the file
    loaded = torch.export.load(str(path)).module()
    torch.manual_seed(5)
    other = {"input_ids": torch.randint(1, 256, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    other["labels"] = other["input_ids"]
    with torch.no_grad():
        got, want = _out(loaded(**other, use_cache=False))[1], _out(pm(**other))[1]
    assert got.shape == (3, 7, 256) and rel_err(got, want) <= 1e-5  # dynamic dims kept, the prefix in
