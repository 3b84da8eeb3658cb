"""Targeting rules (``fxpeft/targeting.py``): ``layers_to_transform`` / ``layers_pattern`` and the ``modules_to_save``
guard, checked against PEFT's own ``check_target_module_exists`` and its regexes."""

from __future__ import annotations

import copy
import functools
import re

import pytest
from conftest import assert_unchanged, peft_counts, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import fxpeft
from fxpeft import zoo
from fxpeft.methods.lora import Lora
from fxpeft.sites import find_sites
from fxpeft.targeting import layer_index, select_sites

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402


@functools.lru_cache(maxsize=None)
def _llama():
    model, args, kwargs = zoo.tiny_llama(layers=3)
    return model, fxpeft.trace(model, args, kwargs)


def _peft_index(name: str, pattern) -> int | None:
    """PEFT 0.21.2's layer-index regexes, verbatim (``check_target_module_exists``)."""
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


_PART = st.one_of(st.sampled_from(["model", "layers", "h", "blocks", "layer", "mlp", "q_proj", "experts", ""]),
                  st.integers(0, 12).map(str))


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_PART, min_size=1, max_size=7),
       pattern=st.one_of(st.none(), st.sampled_from(["layers", "h", "blocks"]), st.just(["h", "layers"])))
def test_layer_index_is_peft_s(parts, pattern):
    name = ".".join(parts)
    assert layer_index(name, pattern) == _peft_index(name, pattern)


def _peft_selected(names, **kw) -> list[str]:
    cfg = peft.LoraConfig(**kw)
    return [n for n in names if check_target_module_exists(cfg, n)]


SELECTIONS = [
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[2], layers_pattern=["h", "layers"]),
    # an exact name is kept whatever its layer (PEFT checks `key in target_modules` first)
    dict(target_modules=["model.layers.1.self_attn.q_proj", "v_proj"], layers_to_transform=0),
    # lm_head has no layer index: with layers_to_transform, PEFT drops it
    dict(target_modules=["v_proj", "lm_head"], layers_to_transform=[0, 1]),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[]),  # empty: not used
    # modules_to_save is never a target (PEFT's guard)
    dict(target_modules=["q_proj", "v_proj", "lm_head"], modules_to_save=["lm_head"]),
]


@pytest.mark.parametrize("kw", SELECTIONS, ids=[str(i) for i in range(len(SELECTIONS))])
def test_selection_matches_peft(kw):
    _, gm = _llama()
    chosen = [s.name for s in select_sites(gm, fxpeft.LoraConfig(**kw), Lora)]
    assert chosen == _peft_selected(list(find_sites(gm)), **kw)


def test_layers_to_transform_zero_trains_what_peft_trains():
    """``layers_to_transform=0`` is a layer index, not "unset" (it adapted every layer before)."""
    model, gm = _llama()
    cfg = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=0)
    gm = fxpeft.rewrite(copy.deepcopy(gm), cfg)  # a PEFT config object works as is
    assert {m.site_name.split(".")[2] for m in fxpeft.adapters(gm).values()} == {"0"}
    assert fxpeft.get_nb_trainable_parameters(gm)[0] == peft_counts(model, cfg)[0]


@pytest.mark.parametrize("kw,error,match", [
    (dict(target_modules=["q_proj"], layers_to_transform=[1, 5]), fxpeft.TargetError,
     r"layers_to_transform \[5\] out of range.*in layers \[0, 1, 2\]"),
    (dict(target_modules=["q_proj"], layers_to_transform=-1), fxpeft.TargetError, "out of range"),
    (dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="blocks"), fxpeft.TargetError,
     "no numbered layer.*layers_pattern='blocks'"),
    (dict(target_modules=r".*q_proj", layers_to_transform=0), fxpeft.ConfigError, "string target_modules"),
    (dict(target_modules="all-linear", layers_to_transform=0), fxpeft.ConfigError, "string target_modules"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), fxpeft.ConfigError, "layers_to_transform is not"),
    (dict(target_modules=["q_proj"], layers_to_transform="0"), fxpeft.ConfigError, "layer index"),
    (dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="(?=x)"), fxpeft.ConfigError,
     "lookahead"),
    (dict(target_modules=["lm_head"], modules_to_save=["lm_head"]), fxpeft.TargetError, "modules_to_save"),
    (dict(target_modules=["q_proj"], task_type="CLASSIFY"), fxpeft.ConfigError, "task_type"),
], ids=["index-past-last", "negative", "pattern-finds-nothing", "regex-targets", "all-linear", "pattern-alone",
        "string-index", "unsafe-pattern", "all-saved", "unknown-task"])
def test_bad_layer_and_saved_fields_leave_the_graph_unchanged(kw, error, match):
    gm = copy.deepcopy(_llama()[1])
    snap = snapshot(gm)
    with pytest.raises(error, match=match):
        fxpeft.rewrite(gm, fxpeft.LoraConfig(**kw))
    assert_unchanged(gm, snap)


def test_ambiguous_regex_layers_pattern_is_refused():
    with pytest.raises(fxpeft.ConfigError, match="several numbered components"):
        layer_index("model.layers.1.experts.2.w", r"[a-z]+")
    assert layer_index("model.layers.1.experts.2.w", "experts") == 2  # a plain name: PEFT's first match
    assert layer_index("model.layers.1.experts.2.w", ["h", "layers"]) == 1
