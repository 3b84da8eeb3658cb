"""fxpeft.untrusted: linear-time regex matching equal to ``re``, refusals, and bounded JSON loading."""

from __future__ import annotations

import doctest
import json
import math
import re
import signal
import sys
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fxpeft import untrusted
from fxpeft.errors import AdapterFileError, ConfigError
from fxpeft.untrusted import compile_pattern, fullmatch, load_json, pattern_key_match

EVIL = r"([\w.]|[\w.])*!"


class _Hung(Exception):
    pass


@contextmanager
def deadline(seconds: int):
    """Raise _Hung (instead of hanging the suite) if the block runs longer than ``seconds``; no timing is asserted.

    Without SIGALRM (Windows) the block just runs.
    """
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise _Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------------------------------
# The evil patterns finish (the backtracking engine would take exponential time)


def test_evil_pattern_is_fast_and_false():
    name = "model.layers.10.self_attn.q_proj.base_layer.lora_A.default.xx"[:60]
    assert len(name) == 60
    with deadline(20):
        assert fullmatch(EVIL, name, field="target_modules") is False
        assert fullmatch(r"(?:[\w.]|[\w.])*!", name, field="exclude_modules") is False
        assert fullmatch(r"(a*)*b", "a" * 5000, field="target_modules") is False
        assert fullmatch(r"(?:\w+\.?)+!", name * 5, field="target_modules") is False
        assert pattern_key_match(EVIL, name, field="rank_pattern") is False
        assert pattern_key_match(r"(\w|\w)*\.q_proj!", name * 5, field="alpha_pattern") is False


# Found by the random comparison below: re needs many seconds for these on a 16-character name.
RE_HANGS = r"(?:(?:(?:(?:[^\d])??|0|[^\d]))*){1,}"  # the names of non-digits and "0"
RE_HANGS_2 = r"(?:(?:(?:[^k]|_|.))*){1,}(?:(?u:(?:1|\s))|k)(?:(\.)|![.\n](?:)[\w.])(?:\Ssſb|[.\n])(?:(?:ſ|^|-))??!"


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        (RE_HANGS, "self_attn12layer", False),
        (RE_HANGS, "0modelK_self_att", True),
        (RE_HANGS, "self_attn12layer" * 20, False),
        (RE_HANGS, "0modelK_self_att" * 20, True),
        (RE_HANGS_2, "0modelK_self_att", False),  # it has to end in "!"
        (RE_HANGS_2, "0modelK_self_att" * 20, False),
    ],
)
def test_random_patterns_that_hang_re_are_fast(pattern, name, expected):
    with deadline(20):
        assert fullmatch(pattern, name, field="target_modules") is expected
        assert pattern_key_match(pattern, name, field="rank_pattern") is expected  # no "." in these names


def test_evil_pattern_many_names():
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(200) for p in "qkvo"]
    with deadline(20):
        assert not any(fullmatch(EVIL, n, field="target_modules") for n in names)
        assert all(fullmatch(r"([\w.]|[\w.])*_proj", n, field="target_modules") for n in names)


# --------------------------------------------------------------------------------------------------------------
# Real PEFT patterns

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.11.self_attn.o_proj",
    "model.layers.3.mlp.gate_proj",
    "model.layers.3.mlp.down_proj",
    "lm_head",
    "model.embed_tokens",
    "q_proj",
    "transformer.h.0.attn.c_attn",
    "model.layers.0.self_attn.q_proj\n",
    "",
]

PEFT_PATTERNS = [
    r".*\.(q_proj|v_proj)",
    r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
    r".*\.layers\.(0|1|2|3)\..*",
    r"^model\.layers\.[0-9]{1,2}\.mlp\..*_proj$",
    r".*(?i:Q_PROJ)",
    r"(?i).*MLP.*",
    r".*c_attn",
    r"lm_head|embed_tokens",
    r".*\bv_proj\b.*",
    r"\A.*proj\Z",
    r"(?s).*",
    r"(?m)^.*proj$",
]


@pytest.mark.parametrize("pattern", PEFT_PATTERNS)
def test_peft_patterns_agree_with_re(pattern):
    compiled = compile_pattern(pattern, field="target_modules")
    for name in NAMES:
        assert fullmatch(pattern, name, field="target_modules") == (re.fullmatch(pattern, name) is not None), name
        assert compiled.match(name) == (re.match(pattern, name) is not None), name


@pytest.mark.parametrize("key", ["q_proj", r"layers\.0\.self_attn\.q_proj", r"layers\.\d+\..*_proj", "mlp", "lm_head",
                                 r"v_proj)|(lm", "h.0.attn.c_attn", ".*"])
def test_rank_pattern_keys_agree_with_re(key):
    for name in NAMES:
        want = re.match(rf"(.*\.)?({key})$", name) is not None
        assert pattern_key_match(key, name, field="rank_pattern") == want, name


def test_evil_pattern_answers_match_re_on_short_names():
    # re is exponential on this pattern, so it is only asked about names short enough for it.
    for name in ["q_proj", "a.b!", "lm_head!", "!", "", "x.y.z", "a b!"]:
        want = re.fullmatch(EVIL, name) is not None
        assert fullmatch(EVIL, name, field="target_modules") == want, name


def test_compiled_patterns_are_cached():
    a = compile_pattern(r".*\.q_proj", field="target_modules")
    assert compile_pattern(r".*\.q_proj", field="target_modules") is a
    assert "q_proj" in repr(a)


def test_dfa_cache_drop_keeps_answers(monkeypatch):
    monkeypatch.setattr(untrusted, "_DFA_SLOTS_PER_PATTERN", 20)
    pattern = r"(?:a|b)*a(?:a|b){3}"  # its DFA has many states
    p = untrusted._compile(pattern, "target_modules", pattern + " ")  # a fresh, uncached Pattern
    for i in range(64):
        text = format(i, "06b").replace("0", "a").replace("1", "b")
        assert p.fullmatch(text) == (re.fullmatch(pattern, text) is not None)


def test_non_str_text_is_a_type_error():
    with pytest.raises(TypeError, match="target_modules"):
        fullmatch("a", b"a", field="target_modules")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [
        (r"^(?!.*lm_head).*", "lookahead"),
        (r"(?=q).*", "lookahead"),
        (r".*(?<=q_proj)", "lookbehind"),
        (r".*(?<!lm_head)", "lookbehind"),
        (r"(a)\1", "backreference"),
        (r"(?P<x>a)(?P=x)", "backreference"),
        (r"(a)?(?(1)b|c)", "conditional"),
        (r"(?>a+)b", "atomic"),
        (r"a*+", "possessive"),
        (r"a++b", "possessive"),
        (r"a?+", "possessive"),
        (r"a{1,3}+", "possessive"),
    ],
)
def test_non_linear_constructs_are_refused(pattern, construct):
    if construct in ("atomic", "possessive") and sys.version_info < (3, 11):
        construct = "not a valid Python regex"  # 3.10's re has no such syntax
    for field in ("target_modules", "exclude_modules"):
        with pytest.raises(ConfigError, match=field) as info:
            fullmatch(pattern, "model.layers.0.q_proj", field=field)
        assert construct in str(info.value)
        assert repr(pattern) in str(info.value)
    with pytest.raises(ConfigError, match="rank_pattern") as info:
        pattern_key_match(pattern, "model.layers.0.q_proj", field="rank_pattern")
    assert repr(pattern) in str(info.value)  # the key, not PEFT's template around it


@pytest.mark.parametrize("pattern", ["(", "[a", "*a", "a{2,1}", r"\p{L}", "a)", "(?<x", r"a{99999999999}", "(?z)"])
def test_invalid_regex_is_a_config_error(pattern):
    with pytest.raises(ConfigError, match="target_modules") as info:
        fullmatch(pattern, "q_proj", field="target_modules")
    message = str(info.value)
    assert repr(pattern) in message and "not a valid Python regex" in message


@pytest.mark.parametrize(
    "pattern", [r"a{100000}", r"(?:\w{0,1000}){0,1000}", r"(?:){4000000000}", r"(?:$){0,4000000000}"]
)
def test_oversized_automaton_is_refused(pattern):
    with deadline(20):
        with pytest.raises(ConfigError, match="too large"):
            fullmatch(pattern, "q_proj", field="target_modules")


def test_long_and_deep_patterns_are_refused():
    with pytest.raises(ConfigError, match="longer than"):
        fullmatch("a" * (untrusted.MAX_PATTERN_CHARS + 1), "a", field="target_modules")
    for deep in ("(" * 5000 + ")" * 5000, "(?:" * 2000 + "a" + ")" * 2000, "(?:" * 101 + "a" + ")" * 101):
        with pytest.raises(ConfigError, match="nests"):
            fullmatch(deep, "a", field="target_modules")
    at_limit = "(?:" * untrusted.MAX_GROUP_DEPTH + "a*" + ")*" * untrusted.MAX_GROUP_DEPTH
    assert fullmatch(at_limit, "aaa", field="target_modules")
    # Parentheses inside a class are literals, not nesting.
    fine = "[(]" * 200 + "x"
    assert fullmatch(fine, "(" * 200 + "x", field="target_modules")


def test_non_string_pattern_is_refused():
    with pytest.raises(ConfigError, match="target_modules"):
        fullmatch(["q_proj"], "q_proj", field="target_modules")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank_pattern"):
        pattern_key_match(3, "q_proj", field="rank_pattern")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# Equality with re on random patterns and module names

LITERALS = ["a", "b", "q", "_", "0", "1", "A", "K", "k", "s", "S", "\u212a", "\u017f", "\u0131", "\u0130", "i",
            r"\.", "-", "!", r"\n", "\u00e9"]
CLASSES = [".", r"\w", r"\W", r"\d", r"\D", r"\s", r"\S", "[ab]", "[^a.]", "[a-c]", r"[\w.]", r"[^\d]",
           "[A-Z_]", "[k-s]", r"[^\W\d]", r"[.\n]", "[^k]", "[\u212a]"]
ANCHORS = ["^", "$", r"\A", r"\Z", r"\b", r"\B", "(?:)"]
QUANTIFIERS = ["*", "+", "?", "*?", "+?", "??", "{2}", "{0,2}", "{1,}", "{,3}", "{1,3}?", "{0}"]
GROUPS = ["(", "(?:", "(?i:", "(?-i:", "(?s:", "(?m:", "(?a:", "(?u:", "(?P<g>"]
GLOBAL_FLAGS = ["", "", "", "(?i)", "(?s)", "(?m)", "(?a)", "(?x)", "(?im)"]

atoms = st.sampled_from(LITERALS + CLASSES + ANCHORS)


def _grow(children):
    quantified = st.tuples(children, st.sampled_from(QUANTIFIERS)).map(
        lambda t: (t[0] if len(t[0]) == 1 or t[0].startswith("(") and t[0].endswith(")") else f"(?:{t[0]})") + t[1]
    )
    grouped = st.tuples(st.sampled_from(GROUPS), children).map(lambda t: f"{t[0]}{t[1]})".replace("(?P<g>", "("))
    alternation = st.lists(children, min_size=2, max_size=3).map(lambda xs: "(?:" + "|".join(xs) + ")")
    concat = st.lists(children, min_size=2, max_size=4).map("".join)
    return quantified | grouped | alternation | concat


patterns = st.tuples(st.sampled_from(GLOBAL_FLAGS), st.recursive(atoms, _grow, max_leaves=8)).map("".join)
PIECES = ["model", "layers", "0", "12", "self_attn", "q_proj", "v", "a", "b", "ab", "K", "k", "\u212a", "s",
          "\u017f", "I", "\u0131", "_", "\n", ".", "!", "-", "\u00e9"]
names = st.lists(st.sampled_from(PIECES), max_size=7).map("".join)
module_names = st.lists(st.sampled_from(PIECES[:6]), min_size=1, max_size=5).map(".".join)
# Kept short: re itself backtracks, and a random pattern can be ambiguous enough to make it slow on long names.
texts = (names | module_names).map(lambda s: s[:16])


def _re_or_error(pattern, text, how):
    try:
        with deadline(5):
            return how(pattern, text) is not None
    except re.error:
        return ConfigError
    except _Hung:
        return None  # re itself backtracked for seconds (random patterns can be evil): nothing to compare with


def _assert_same(pattern, text, how, ours):
    want = _re_or_error(pattern, text, how)
    if want is None:
        with deadline(20):
            assert ours() in (True, False)
    elif want is ConfigError:
        with pytest.raises(ConfigError):
            ours()
    else:
        assert ours() == want, (pattern, text)


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(patterns, st.lists(texts, min_size=1, max_size=4))
@example(r"(?:|a)*b", ["ab"])
@example(r"(?:a?)*?$", ["aa\n"])
@example(r"(?i)\u212a", ["k", "K"])
@example(r"[a-z]", ["\u212a", "\u0130"])
@example(r"(?i)[^k]", ["\u212a", "K", "s"])
@example(r"\B", [""])
@example(r"\b", [""])
def test_fullmatch_and_match_equal_re(pattern, samples):
    for text in samples:
        _assert_same(pattern, text, re.fullmatch, lambda: fullmatch(pattern, text, field="target_modules"))
        _assert_same(pattern, text, re.match, lambda: compile_pattern(pattern, field="target_modules").match(text))


@FAST
@given(st.recursive(atoms, _grow, max_leaves=6), st.lists(texts, min_size=1, max_size=4))
@example("q_proj", ["model.q_proj", "model.xq_proj", "q_proj\n"])
@example(r"a)|(b", ["a", "x.b", "b.x"])
def test_pattern_key_match_equals_re(key, samples):
    for text in samples:
        _assert_same(key, text, lambda k, t: re.match(rf"(.*\.)?({k})$", t),
                     lambda: pattern_key_match(key, text, field="alpha_pattern"))


# --------------------------------------------------------------------------------------------------------------
# load_json


def _write(tmp_path, content, name="adapter_config.json"):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def test_normal_config_loads(tmp_path):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "rank_pattern": {"layers\\.0\\..*": 4}, "alpha_pattern": {}, "modules_to_save": None,
              "lora_dropout": 0.05, "fan_in_fan_out": False, "layers_to_transform": [0, 1, 2]}
    path = _write(tmp_path, json.dumps(config, indent=2))
    assert load_json(path) == config
    assert load_json(str(path)) == config


@pytest.mark.parametrize(
    "bomb", ["[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000]
)
def test_depth_bomb_is_adapter_file_error(tmp_path, bomb):
    path = _write(tmp_path, bomb)
    with pytest.raises(AdapterFileError, match="deeper than 64") as info:
        load_json(path)
    assert str(path) in str(info.value) and "max_depth" in str(info.value)
    with pytest.raises(AdapterFileError):
        load_json(path, max_depth=10**6)  # even a huge limit gives a typed error, never RecursionError


def test_depth_limit_is_exact_and_ignores_strings(tmp_path):
    assert load_json(_write(tmp_path, '{"a": [[1]]}'), max_depth=3) == {"a": [[1]]}
    with pytest.raises(AdapterFileError, match="deeper than 2"):
        load_json(_write(tmp_path, '{"a": [[1]]}'), max_depth=2)
    text = json.dumps({"k": "[[[[{{{{" * 1000 + '\\"[[[', "\\": ["]]]"]})
    assert load_json(_write(tmp_path, text), max_depth=2) == json.loads(text)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"r": 8,}', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"r": \xff}', "not UTF-8"),
        (b'{"r": "\xc3\x28"}', "not UTF-8"),
        (b'{"r": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'\\[' + b"[" * 100_000, "deeper"),
    ],
)
def test_bad_files_are_adapter_file_errors(tmp_path, content, problem):
    path = _write(tmp_path, content)
    with pytest.raises(AdapterFileError, match=problem) as info:
        load_json(path)
    assert str(path) in str(info.value)


def test_size_limit_missing_file_and_directory(tmp_path):
    path = _write(tmp_path, json.dumps({"x": "y" * 100}))
    with pytest.raises(AdapterFileError, match="larger than 50 bytes"):
        load_json(path, max_bytes=50)
    with pytest.raises(AdapterFileError, match="cannot be read"):
        load_json(tmp_path / "missing.json")
    with pytest.raises(AdapterFileError, match="cannot be read"):
        load_json(tmp_path)


def test_bom_and_nan_are_accepted(tmp_path):
    assert load_json(_write(tmp_path, b'\xef\xbb\xbf{"r": 4}')) == {"r": 4}
    value = load_json(_write(tmp_path, '{"a": NaN, "b": -Infinity}'))
    assert math.isnan(value["a"]) and value["b"] == -math.inf


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=12,
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values)
def test_load_json_roundtrip_and_depth(tmp_path, value):
    path = _write(tmp_path, json.dumps(value, ensure_ascii=False), name="v.json")
    depth = _depth(value)
    assert load_json(path, max_depth=depth) == value
    if depth:
        with pytest.raises(AdapterFileError):
            load_json(path, max_depth=depth - 1)


# --------------------------------------------------------------------------------------------------------------


def test_doctests():
    result = doctest.testmod(untrusted, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0
