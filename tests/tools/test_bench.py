"""tools/bench.py: its arithmetic against fixed values, and its fxpeft-vs-PEFT set-up against PEFT itself (cheap:
the 1-layer ``smoke`` case, no timing loops beyond one round)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    # Loaded by path: tools/ is not a package. Its import-time warning filter is undone with the module scope.
    import warnings

    with warnings.catch_warnings():
        spec = importlib.util.spec_from_file_location("fxpeft_tools_bench", BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        try:
            spec.loader.exec_module(mod)
        finally:
            sys.modules.pop(spec.name, None)
    return mod


def _args(**kw):
    base = dict(quick=False, pairs=1, measures=None, threads=torch.get_num_threads())
    return argparse.Namespace(**{**base, **kw})


def test_summarize_is_the_median_of_per_pair_ratios(bench):
    got = bench.summarize({"fxpeft": [0.002, 0.004, 0.009], "peft": [0.001, 0.004, 0.003]}, "fxpeft", "peft")
    assert got["ratio"] == pytest.approx(2.0)  # pairs: 2, 1, 3
    assert (got["ratio_min"], got["ratio_max"]) == (pytest.approx(1.0), pytest.approx(3.0))
    assert got["ms"] == {"fxpeft": pytest.approx(4.0), "peft": pytest.approx(3.0)}
    assert got["pairs"] == 3


def test_alternate_rotates_the_order_and_skips_warmups(bench):
    calls = []

    def fn(name, seconds):
        def run():
            calls.append(name)
            return seconds
        return run

    times = bench.alternate({"a": fn("a", 1.0), "b": fn("b", 2.0), "c": fn("c", 3.0)}, pairs=3, warmup=1)
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_markdown_row_for_a_fixed_result(bench):
    row = {"case": "default", "measure": "train", "key": "0.1", "label": "LoRA train step, lora_dropout=0.1",
           "ms": {"fxpeft": 8.0, "fxpeft_unfused": 9.5, "peft": 10.0}, "ratio": 0.8, "ratio_min": 0.75,
           "ratio_max": 0.9}
    machine = {"cpu": "cpu", "cores": 2, "threads": 2, "torch": "t", "transformers": "x", "peft": "p", "python": "3",
               "loadavg_start": (0.5,), "loadavg_end": (1.0,)}
    md = bench.markdown([row], {"machine": machine}).splitlines()
    assert md[2] == ("| default | LoRA train step, lora_dropout=0.1 | 8.0 ms (unfused 9.5) | 10.0 ms | "
                     "0.800 [0.75–0.90] | ≤ 0.75 | **not met** |")


def test_bench_models_compute_what_peft_computes(bench):
    """The benchmark compares like with like: the same adapters in both, changing the outputs, equal to PEFT."""
    b = bench.Bench(bench.CASES["smoke"], _args())
    gm, pm = b.fx(0.0), b.peft(0.0)
    bench.same_adapters(gm, pm)
    gm.eval(), pm.eval()
    with torch.no_grad():
        ours = gm(input_ids=b.ids).logits
        theirs = pm(input_ids=b.ids, use_cache=False).logits
        base = b.base_hf(input_ids=b.ids, use_cache=False).logits
    assert (ours - base).abs().max() > 1e-2  # the adapters really do something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert b.check_equal(0.0) < 1e-4
    assert b.info["max_abs_diff_logits_vs_peft"]["0.0"] < 1e-4


def test_main_writes_json_and_markdown(bench, tmp_path):
    rc = bench.main(["--cases", "smoke", "--measures", "rewrite", "--pairs", "1", "--threads",
                     str(torch.get_num_threads()), "--json", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")])
    assert rc == 0
    data = json.loads((tmp_path / "b.json").read_text())
    (row,) = data["results"]
    assert (row["case"], row["measure"], row["pairs"]) == ("smoke", "rewrite", 1)
    assert set(row["ms"]) == {"fxpeft", "fxpeft_unfused", "peft"} and all(v > 0 for v in row["ms"].values())
    assert row["ratio"] == pytest.approx(row["samples_ms"]["fxpeft"][0] / row["samples_ms"]["peft"][0], rel=1e-2)
    assert "| smoke | rewrite" in (tmp_path / "b.md").read_text()


def test_dora_measure_times_models_that_compute_what_peft_computes(bench):
    b = bench.Bench(bench.CASES["smoke"], _args())
    b.dora(0.0)
    (row,) = b.results
    assert (row["measure"], row["key"], row["pairs"]) == ("dora", "0.0", 1)
    assert set(row["ms"]) == {"fxpeft", "peft"}
    assert row["max_abs_diff_logits_vs_peft"] < 1e-4
    assert bench.GOALS[("dora", "0.0")][0] == "≤ 0.80"


def test_methods_measure_loads_peft_adapters_that_compute_what_peft_computes(bench):
    b = bench.Bench(bench.CASES["smoke"], _args())
    b.methods()
    rows = {r["key"]: r for r in b.results}
    assert {"loha", "lokr"} <= set(rows)  # the methods registered when this was written; others as they land
    for name, row in rows.items():
        assert row["measure"] == "methods" and row["pairs"] == 1 and set(row["ms"]) == {"fxpeft", "peft"}
        assert row["rel_err_vs_peft"] < 1e-5, name
        assert row["trainable"][0] == row["trainable"][1], name
        assert bench.GOALS[("methods", name)][0] == "≤ 1.0"


def test_moe_measure_times_expert_adapters_that_compute_what_peft_computes(bench):
    b = bench.Bench(bench.CASES["smoke"], _args())
    b.moe()
    (row,) = b.results
    assert (row["measure"], row["pairs"]) == ("moe", 1) and set(row["ms"]) == {"fxpeft", "peft"}
    assert row["rel_err_vs_peft"] < 1e-5


def test_alora_measure_times_adapters_that_compute_what_peft_computes(bench):
    b = bench.Bench(bench.CASES["smoke"], _args())
    b.alora()
    (row,) = b.results
    assert (row["measure"], row["pairs"]) == ("alora", 1) and set(row["ms"]) == {"fxpeft", "peft"}
    assert row["rel_err_vs_peft"] < 1e-5 < row["rel_base_vs_peft"]  # the same outputs, not the base model's


def test_train_measure_also_times_the_base_graph_alone_as_the_floor(bench):
    b = bench.Bench(bench.CASES["smoke"], _args())
    b.train(0.0)
    rows = {r["key"]: r for r in b.results}
    assert set(rows) == {"0.0", "0.0/floor"}
    assert set(rows["0.0"]["ms"]) == {"fxpeft", "fxpeft_unfused", "peft"}
    floor = rows["0.0/floor"]
    assert floor["ratio"] == pytest.approx(floor["samples_ms"]["base_graph"][0] / floor["samples_ms"]["peft"][0], rel=1e-2)
    machine = {**bench.machine(), "loadavg_start": (0.0,), "loadavg_end": (0.0,)}
    assert "| smoke | the same step without adapters" in bench.markdown(b.results, {"machine": machine})


def test_tensor_peak_bytes_counts_tensors_live_at_once(bench):
    def step():
        a = torch.ones(262144)  # 1 MiB
        b = a * 2  # 2 MiB live here
        del a
        c = b + 1  # 2 MiB again (a freed first), never 3
        return c.sum()

    peak = bench.tensor_peak_bytes(step)
    assert 2 * 2**20 <= peak < 2 * 2**20 + 4096
