"""copy.deepcopy and torch.save/torch.load(weights_only=False) of traced and rewritten graphs (fxpeft.serialize).

Both dialects (an export-traced tiny Llama, a symbolic_trace MLP) with LoRA and IA3: the copy computes the same
outputs bit for bit, has the same code, node tags, GraphInfo and trainable flags, merges, and trains.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import out_tensor, rel_err
from torch import nn

import fxpeft
import fxpeft.zoo
from fxpeft.serialize import SerializationError
from fxpeft.tags import get_tag, graph_info


class MLP(nn.Module):  # module level: a symbolic_trace graph keeps the model's own modules, pickled by reference
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + x[:, :4]


def _config(method: str, dialect: str):
    targets = ["q_proj", "v_proj", "down_proj"] if dialect == "export" else ["fc1", "fc2"]
    if method == "lora":
        return fxpeft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    ff = ["down_proj"] if dialect == "export" else ["fc2"]
    return fxpeft.IA3Config(target_modules=targets, feedforward_modules=ff)


@functools.lru_cache(maxsize=None)  # one trace per case for the whole module; tests never change these graphs
def _build(dialect: str, method: str):
    if dialect == "export":
        model, args, kwargs = fxpeft.zoo.tiny_llama(layers=1)
        gm = fxpeft.trace(model, args, kwargs)
    else:
        torch.manual_seed(0)
        model, args, kwargs = MLP().eval(), (torch.randn(3, 8),), {}
        gm = fxpeft.trace(model)
    base = _run(model, args, kwargs)
    gm = fxpeft.rewrite(gm, _config(method, dialect))
    if method == "ia3":  # IA3 starts at the identity (ones): move it off so the merge check means something
        with torch.no_grad():
            for name, p in gm.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    return gm, args, kwargs, base


@pytest.fixture(scope="module", params=[("export", "lora"), ("export", "ia3"), ("fx", "lora"), ("fx", "ia3")],
                ids=lambda p: "-".join(p))
def graph(request):
    return _build(*request.param)


def _pickle(gm):
    f = io.BytesIO()
    torch.save(gm, f)
    f.seek(0)
    return torch.load(f, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickle}


def _tags(gm):
    return [get_tag(n) for n in gm.graph.nodes]


def _flags(gm):
    return {name: p.requires_grad for name, p in gm.named_parameters(remove_duplicate=False)}


def _adapter_params(gm) -> set[str]:
    out = set()
    for path, mod in gm.named_modules():
        if isinstance(mod, fxpeft.AdapterModule):
            out |= {f"{path}.{n}" for n, _ in mod.named_parameters()}
    return out


def _run(gm, args, kwargs):
    with torch.no_grad():
        return out_tensor(gm(*args, **kwargs))


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_keeps_graph_tags_info_and_outputs(graph, how):
    gm, args, kwargs, base = graph
    assert any(t is not None for t in _tags(gm))
    dup = COPIES[how](gm)
    assert dup is not gm
    assert dup.code == gm.code
    assert [n.name for n in dup.graph.nodes] == [n.name for n in gm.graph.nodes]
    assert _tags(dup) == _tags(gm)
    assert graph_info(dup) == graph_info(gm)
    assert graph_info(dup).dialect == graph_info(gm).dialect
    assert _flags(dup) == _flags(gm)
    assert type(dup).__name__ == type(gm).__name__
    assert dup.training == gm.training
    dup.graph.lint()
    assert torch.equal(_run(dup, args, kwargs), _run(gm, args, kwargs))
    # no tensor is shared with the original
    ours = {p.data_ptr() for p in gm.parameters()}
    assert not ours & {p.data_ptr() for p in dup.parameters()}


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_merges(graph, how):
    gm, args, kwargs, base = graph
    dup = COPIES[how](gm)
    before = _run(dup, args, kwargs)
    merged = fxpeft.merge(dup)
    assert not any(isinstance(m, fxpeft.AdapterModule) for m in merged.modules())
    assert all(t is None for t in _tags(merged))
    after = _run(merged, args, kwargs)
    assert rel_err(after, before) < 1e-5
    assert rel_err(before, base) > 1e-3  # the adapters change the output: the merge folded them in
    # the original still holds its adapters
    assert fxpeft.adapters(gm)
    assert torch.equal(_run(gm, args, kwargs), before)


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_trains_adapters_only(graph, how):
    gm, args, kwargs, base = graph
    reference = _run(gm, args, kwargs)
    dup = COPIES[how](gm)
    trainable = {n for n, p in dup.named_parameters() if p.requires_grad}
    assert trainable and trainable <= _adapter_params(dup)
    dup.train()
    opt = torch.optim.SGD([p for p in dup.parameters() if p.requires_grad], lr=0.1)
    loss = out_tensor(dup(*args, **kwargs)).float().pow(2).mean()
    loss.backward()
    with_grad = {n for n, p in dup.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= _adapter_params(dup)
    assert any(p.grad.abs().sum() > 0 for n, p in dup.named_parameters() if n in with_grad)
    opt.step()
    dup.eval()
    assert not torch.equal(_run(dup, args, kwargs), reference)
    assert torch.equal(_run(gm, args, kwargs), reference)  # training the copy left the original alone


def test_pickled_export_graph_keeps_guards_and_dynamic_dims():
    gm, args, kwargs, _ = _build("export", "lora")
    dup = _pickle(gm)
    ids = torch.randint(0, 256, (3, 7))  # another batch and sequence length than traced
    assert torch.equal(_run(dup, (), {"input_ids": ids}), _run(gm, (), {"input_ids": ids}))
    with pytest.raises(fxpeft.InputShapeError, match="use_cache must be False"):
        dup(input_ids=ids, use_cache=True)
    again = _pickle(dup)  # a loaded graph pickles again
    assert again.code == gm.code and _tags(again) == _tags(gm)
    assert torch.equal(_run(again, (), {"input_ids": ids}), _run(gm, (), {"input_ids": ids}))


@pytest.mark.heavy  # a fresh interpreter imports torch and transformers
def test_pickled_graph_loads_in_a_fresh_process(tmp_path):
    gm, args, kwargs, _ = _build("export", "lora")
    path = tmp_path / "gm.pt"
    torch.save(gm, path)
    torch.save({"out": _run(gm, args, kwargs), "code": gm.code, "kwargs": kwargs}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import torch
        gm = torch.load({str(path)!r}, weights_only=False)  # fxpeft is not imported first
        ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=False)
        import fxpeft
        assert gm.code == ref["code"]
        with torch.no_grad():
            assert torch.equal(gm(**ref["kwargs"]).logits, ref["out"])
            before = gm(**ref["kwargs"]).logits
            merged = fxpeft.merge(gm)
            assert not any(isinstance(m, fxpeft.AdapterModule) for m in merged.modules())
            after = merged(**ref["kwargs"]).logits
        assert ((after - before).norm() / before.norm()).item() < 1e-5
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("dialect", ["export", "fx"])
def test_copy_keeps_tied_parameters_tied(how, dialect):
    torch.manual_seed(0)
    model, x = Tied().eval(), torch.randn(3, 8)
    gm = fxpeft.trace(model, (x,)) if dialect == "export" else fxpeft.trace(model)
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["c"], init_lora_weights=False))
    dup = COPIES[how](gm)
    assert dup.get_parameter("b.weight") is dup.get_parameter("a.weight")
    assert dup.get_parameter("a.weight") is not gm.get_parameter("a.weight")
    assert torch.equal(_run(dup, (x,), {}), _run(gm, (x,), {}))
    assert _tags(dup) == _tags(gm)


def test_unpicklable_model_raises_fxpeft_error():
    class Local(nn.Module):  # defined in a function: pickle cannot find the class by name
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    gm = fxpeft.trace(nn.Sequential(Local(), nn.Linear(4, 4)), leaf_modules=(Local,))  # the graph keeps Local
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["1"]))
    with pytest.raises(fxpeft.FxPeftError, match="save_adapter"):
        torch.save(gm, io.BytesIO())
    assert isinstance(SerializationError("x"), fxpeft.FxPeftError)


# ------------------------------------------------------------------------------------ deferred code generation

def _deferred_mlp(**kw):
    from fxpeft.serialize import codegen_deferred

    torch.manual_seed(0)
    gm = fxpeft.rewrite(fxpeft.trace(MLP()), fxpeft.LoraConfig(r=2, target_modules=["fc1", "fc2"],
                                                               init_lora_weights=False, **kw))
    assert codegen_deferred(gm)  # the rewrite itself generates no code
    return gm


def test_rewrite_defers_codegen_to_the_first_call_and_hooks_fire_once():
    from fxpeft.serialize import codegen_deferred

    gm, x = _deferred_mlp(), torch.randn(3, 8)
    eager = fxpeft.rewrite(fxpeft.trace(MLP()), fxpeft.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    eager.load_state_dict(gm.state_dict())
    eager.recompile()
    calls = []
    gm.register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    gm.register_forward_hook(lambda mod, args, out: calls.append("post"))
    assert torch.equal(gm(x), eager(x)) and calls == ["pre", "post"]
    assert not codegen_deferred(gm) and gm.code == eager.code and "lora" in gm.code


@pytest.mark.parametrize("read", ["code", "str", "pickle", "deepcopy", "signature"])
def test_every_reader_of_deferred_code_sees_the_rewritten_graph(read):
    import inspect

    gm, x = _deferred_mlp(), torch.randn(3, 8)
    if read == "code":
        out = gm.code
        assert "lora" in out
    elif read == "str":
        assert "lora" in str(gm)
    elif read == "signature":
        assert list(inspect.signature(gm.forward).parameters) == ["x"]
    else:
        if read == "pickle":
            f = io.BytesIO()
            torch.save(gm, f)
            f.seek(0)
            back = torch.load(f, weights_only=False)
        else:
            back = copy.deepcopy(gm)
        assert torch.equal(back(x), gm(x)) and back.code == gm.code
    assert "lora" in gm.code


def test_deferred_graph_under_torch_compile_has_no_graph_break():
    gm, x = _deferred_mlp(), torch.randn(3, 8)
    graphs = []

    def counter(g, example_inputs):
        graphs.append(g)
        return g

    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    assert torch.equal(compiled(x), gm(x)) and len(graphs) == 1


def test_many_graphs_compile_in_one_process_without_hitting_the_recompile_limit():
    # every fxpeft graph class shares one __call__; were it the compiled frame, its cache (8 entries by default)
    # would fill and the 9th fullgraph compile in a process would fail hard (a CI failure, depending on test order)
    graphs = []

    def counter(g, example_inputs):
        graphs.append(g)
        return g

    limit = torch._dynamo.config.recompile_limit
    for i in range(limit + 2):
        gm = fxpeft.rewrite(fxpeft.trace(nn.Sequential(nn.Linear(8, 4 + i), nn.ReLU())),
                            fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        x = torch.randn(3, 8)
        assert torch.equal(torch.compile(gm, backend=counter, fullgraph=True)(x), gm(x))
    assert len(graphs) == limit + 2  # one graph each, no recompiles


def test_failed_rewrite_on_a_deferred_graph_keeps_it_deferred_and_unchanged():
    from fxpeft.serialize import codegen_deferred

    gm = _deferred_mlp()
    nodes = [(n.name, n.op, n.target) for n in gm.graph.nodes]
    with pytest.raises(fxpeft.errors.AdapterExistsError):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    assert codegen_deferred(gm) and [(n.name, n.op, n.target) for n in gm.graph.nodes] == nodes
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=2, target_modules=["fc1"]), adapter_name="other")
    assert codegen_deferred(gm) and "lora_other" in gm.code  # a second rewrite still generated nothing
