"""``fxpeft merge BASE ADAPTER OUT`` end to end: a PEFT adapter on an HF model directory, merged, loaded back
with ``from_pretrained`` and from the ``.pt2``, against PEFT's ``merge_and_unload``."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import rel_err

from fxpeft.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.heavy
def test_merge_command_matches_peft(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                   target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 9))
    expected = pm.merge_and_unload()(input_ids=ids).logits

    status = main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--pt2"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "[5/5]" in captured.err and "model.safetensors" in captured.out
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert rel_err(merged(input_ids=ids).logits, expected) <= 1e-5
    exported = torch.export.load(tmp_path / "out" / "model.pt2").module()
    assert rel_err(exported(input_ids=ids, use_cache=False).logits, expected) <= 1e-5  # called as traced


def test_merge_command_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv in (["merge", "fxpeft.zoo:cnn", str(tmp_path / "nowhere"), str(tmp_path / "out")],
                 ["merge", "fxpeft.zoo:cnn", str(tmp_path), str(tmp_path / "file")]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("fxpeft merge: error:") and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("tied", [False, True])
def test_merge_command_streams_unless_the_merge_unties_a_weight(tmp_path, capsys, tied):
    # without --pt2 each merged weight is computed as its shard is written; a LoRA on a tied lm_head unties it, which
    # streaming refuses, so that merge runs first: the files are the same either way
    import fxpeft

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "lm_head"] if tied else ["q_proj", "down_proj"]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, init_lora_weights=False, target_modules=targets))
    pm.save_pretrained(tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "[3/3] merging" in err and "while writing" in err and ("[4/4] writing" in err) == tied
    ids = torch.randint(0, 128, (2, 9))
    gm = fxpeft.trace(copy.deepcopy(model), (), {"input_ids": ids, "use_cache": False})
    fxpeft.load_adapter(gm, tmp_path / "adapter")
    with pytest.warns(UserWarning, match="tied") if tied else contextlib.nullcontext():
        fxpeft.merge(gm)
    fxpeft.save_merged(gm, tmp_path / "ref", config=model.config)
    for f in sorted(p.name for p in (tmp_path / "ref").iterdir() if not p.name.startswith(".")):  # not the manifest
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
