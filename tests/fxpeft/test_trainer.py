"""fxpeft.trainer: transformers.Trainer checkpoints a rewritten graph as PEFT adapter directories and resumes."""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from conftest import assert_unchanged, rel_err, snapshot

import fxpeft
from fxpeft.trainer import restore_adapters, save_adapters
from fxpeft.zoo import tiny_llama

transformers = pytest.importorskip("transformers")
from fxpeft.trainer import FxPeftTrainer  # noqa: E402  (needs transformers)

VOCAB, SEQ, STEPS = 64, 8, 6


@functools.lru_cache(maxsize=1)
def _base():
    """A tiny Llama and its graph traced with the keywords Trainer's batches carry (labels: the graph's loss)."""
    model, _, kw = tiny_llama(layers=1, hidden=32, vocab=VOCAB, batch=2, seq=SEQ)
    ids = kw["input_ids"]
    gm = fxpeft.trace(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                                  "use_cache": False})
    return model, gm


def _graph(seed: int = 0, r: int = 4) -> torch.fx.GraphModule:
    gm = copy.deepcopy(_base()[1])  # (tracing first: it draws random numbers)
    torch.manual_seed(seed)  # the adapters' init: non-zero, so a resume that skipped the weights would show
    return fxpeft.rewrite(gm, fxpeft.LoraConfig(r=r, lora_alpha=8, init_lora_weights="gaussian",
                                                                       target_modules=["q_proj", "v_proj"]))


def _data(n: int = 4 * STEPS) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
            for x in torch.randint(0, VOCAB, (n, SEQ), generator=g)]


class _StopAt(transformers.TrainerCallback):
    """Stop after ``step`` steps, keeping ``max_steps`` (and so the LR schedule) as in the straight run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _trainer(gm, out, **kw) -> FxPeftTrainer:
    kw = {"per_device_train_batch_size": 4, "max_steps": STEPS, "save_steps": 3, "logging_steps": 1,
          "learning_rate": 1e-2, "seed": 0, "report_to": [], "use_cpu": True, "disable_tqdm": True, **kw}
    args = transformers.TrainingArguments(output_dir=str(out), **kw)
    return FxPeftTrainer(model=gm, args=args, train_dataset=_data())


def _losses(tr) -> list[float]:
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def test_resume_continues_the_same_loss_curve(tmp_path):
    straight = _trainer(_graph(), tmp_path / "a")
    straight.train()
    want = _losses(straight)
    assert len(want) == STEPS and want[-1] < want[0]  # it trains

    first = _trainer(_graph(), tmp_path / "b")
    first.add_callback(_StopAt(3))
    first.train()
    ckpt = tmp_path / "b" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth"} <= files
    assert "model.safetensors" not in files  # the adapter, not the base weights

    # another init: the losses can only match if the checkpoint's adapter weights were copied in
    resumed = _trainer(_graph(seed=5), tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = _losses(resumed)
    assert len(got) == STEPS
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= 1e-5
    trained = {k: v for k, v in straight.model.state_dict().items() if "lora" in k}
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in trained.items())

    # load_best_model_at_end's path reads the same adapter files back in
    resumed.state.best_model_checkpoint = str(ckpt)
    resumed._load_best_model()
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in first.model.state_dict().items())


def test_save_model_writes_a_peft_adapter_that_peft_loads(tmp_path):
    import peft

    tr = _trainer(_graph(), tmp_path / "run", max_steps=2)
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    written = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= written
    assert "model.safetensors" not in written
    ids = _data(2)[0]["input_ids"][None]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(_base()[0]), str(tmp_path / "final")).eval()
    gm = tr.model.eval()
    assert rel_err(gm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).logits,
                   pm(input_ids=ids, use_cache=False).logits) <= 1e-5


def test_several_adapters_round_trip_in_peft_layout(tmp_path):
    gm = _graph()
    torch.manual_seed(3)
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, init_lora_weights="gaussian", target_modules=["v_proj"]), "other")
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(0.5)
    save_adapters(gm, tmp_path)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")  # "default" at the root
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")

    fresh = _graph(seed=7)
    torch.manual_seed(8)
    fxpeft.rewrite(fresh, fxpeft.LoraConfig(r=2, init_lora_weights="gaussian", target_modules=["v_proj"]), "other")
    code, active = fresh.code, fxpeft.active_adapters(fresh)
    params = dict(fresh.named_parameters())
    grads = {n: p.requires_grad for n, p in params.items()}
    restore_adapters(fresh, tmp_path)
    assert fresh.code == code and fxpeft.active_adapters(fresh) == active  # no scratch adapter left behind
    assert all(p is params[n] and p.requires_grad == grads[n] for n, p in fresh.named_parameters())  # same objects
    want = gm.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())  # bit-exact


def test_a_checkpoint_of_another_rank_is_refused_unchanged(tmp_path):
    save_adapters(_graph(r=2), tmp_path)
    gm = _graph()
    snap = snapshot(gm)
    with pytest.raises(fxpeft.AdapterFileError, match="shapes"):
        restore_adapters(gm, tmp_path)
    assert_unchanged(gm, snap)
    with pytest.raises(fxpeft.AdapterFileError, match="adapter_config.json"):
        restore_adapters(gm, tmp_path / "missing")
    assert_unchanged(gm, snap)


def test_unsupported_trainer_settings_are_refused(tmp_path):
    with pytest.raises(fxpeft.ConfigError, match="activation_checkpointing"):
        _trainer(_graph(), tmp_path, activation_checkpointing=True)
    with pytest.raises(fxpeft.ConfigError, match="fxpeft.trace"):
        _trainer(copy.deepcopy(_base()[0]), tmp_path)
    with pytest.raises(fxpeft.AdapterFileError, match="no adapter"):
        save_adapters(copy.deepcopy(_base()[1]), tmp_path)


@pytest.mark.parametrize("config", [
    lambda: fxpeft.LoHaConfig(r=2, target_modules=["0"], init_weights=False, modules_to_save=["2"]),
    lambda: fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, bias="all"),
], ids=["loha+modules_to_save", "lora+bias"])
def test_other_methods_and_trained_copies_restore_bit_exact(tmp_path, config):
    torch.manual_seed(0)
    mlp, x = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)), torch.randn(3, 4)
    base = fxpeft.trace(mlp, (x,))
    trained = fxpeft.rewrite(copy.deepcopy(base), config())
    with torch.no_grad():  # as if trained: the copies (modules_to_save, biases) move away from the base too
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_adapters(trained, tmp_path)
    torch.manual_seed(1)
    fresh = fxpeft.rewrite(copy.deepcopy(base), config())
    code = fresh.code
    restore_adapters(fresh, tmp_path)
    assert fresh.code == code and torch.equal(fresh(x), trained(x))
