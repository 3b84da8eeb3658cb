"""Reading untrusted adapter configs safely: linear-time regex matching and bounded JSON loading.

``adapter_config.json`` comes from wherever the adapter was downloaded, so two of its features are attack
surface:

* PEFT lets ``target_modules`` / ``exclude_modules`` (and a string ``feedforward_modules``) be a regex that it
  applies as ``re.fullmatch(pattern, name)``, and applies each key of ``rank_pattern`` / ``alpha_pattern`` as
  ``re.match(rf"(.*\\.)?({key})$", name)``. Python's ``re`` backtracks, so a crafted pattern such as
  ``([\\w.]|[\\w.])*!`` takes time exponential in the length of the module name (it hung the loader for more
  than 90 s). :func:`fullmatch` and :func:`pattern_key_match` give exactly ``re``'s answers with an automaton
  instead: Python's own parser reads the pattern (so the syntax is exactly Python's), a Thompson NFA is built
  from the parse tree, and a lazily built DFA runs it in time linear in the name (at most ``len(name) *``
  :data:`MAX_NFA_STATES` steps, usually one dict lookup per character). Constructs no automaton can express
  (backreferences, lookaround, conditionals, atomic groups, possessive repeats) are refused with
  :class:`~fxpeft.errors.ConfigError`, never run.
* ``json.load`` recurses once per nesting level and dies with ``RecursionError`` on ``[[[[...``;
  :func:`load_json` measures the nesting with a flat scan first and raises
  :class:`~fxpeft.errors.AdapterFileError` instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import weakref
from typing import Any, Callable

from .errors import AdapterFileError, ConfigError

try:  # Python 3.11+: the parser that re.compile itself uses.
    from re import _constants as _c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "MAX_PATTERN_CHARS",
    "MAX_NFA_STATES",
    "MAX_GROUP_DEPTH",
    "Pattern",
    "compile_pattern",
    "fullmatch",
    "pattern_key_match",
    "load_json",
]

MAX_PATTERN_CHARS = 10_000
"""Longest pattern accepted; real PEFT patterns are well under 1 000 characters."""

MAX_NFA_STATES = 20_000
"""Largest automaton built, counted in states plus ``{m,n}`` copies (a repeat copies its operand, so
``\\w{1,9999}`` is big). Real PEFT patterns need a few hundred; a 10 000-character alternation of module names
fits. Matching one character costs at most about this many steps (measured: about 2 ms for the most expensive
patterns the cap allows, so 0.6 s for a 300-character name); DFA caching makes repeated prefixes free."""

MAX_GROUP_DEPTH = 100
"""Deepest nesting of parentheses accepted: Python's parser (and the NFA builder) recurse once per level."""

# Memory bound of the lazily built DFAs, in "slots": one per cached move, one plus the NFA-set size per DFA state
# (50-130 bytes each, so at most ~250 MB in all). A pattern past its own cap, or any pattern while all of them
# together are past the total, drops its cache: answers stay the same, only a step costs O(NFA size) again until
# the cache is rebuilt.
_DFA_SLOTS_PER_PATTERN = 250_000
_DFA_SLOTS_TOTAL = 2_000_000
_dfa_slots_in_use = [0]  # all live patterns together; a pattern's share is released when it is dropped or freed
_dfa_slots_lock = threading.Lock()

# Opcodes that only exist on some Python versions (3.11 added atomic groups and possessive repeats).
_ATOMIC_GROUP = getattr(_c, "ATOMIC_GROUP", object())
_POSSESSIVE_REPEAT = getattr(_c, "POSSESSIVE_REPEAT", object())

# What each refused opcode is, for the error message.
_REFUSED = {
    _c.GROUPREF: r"a backreference (\1 or (?P=name))",
    _c.GROUPREF_EXISTS: "a conditional group ((?(1)...|...))",
    _c.ASSERT: "a lookahead or lookbehind ((?=...) or (?<=...))",
    _c.ASSERT_NOT: "a negative lookahead or lookbehind ((?!...) or (?<!...))",
    _ATOMIC_GROUP: "an atomic group ((?>...))",
    _POSSESSIVE_REPEAT: "a possessive repeat (*+, ++, ?+ or {m,n}+)",
}

_CATEGORY_SRC = {
    _c.CATEGORY_DIGIT: r"\d",
    _c.CATEGORY_NOT_DIGIT: r"\D",
    _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S",
    _c.CATEGORY_WORD: r"\w",
    _c.CATEGORY_NOT_WORD: r"\W",
}

# The flags that change what one character atom matches; MULTILINE only changes ^ and $ (handled natively).
_CHAR_FLAGS = re.IGNORECASE | re.DOTALL | re.ASCII
_TYPE_FLAGS = re.ASCII | re.UNICODE | re.LOCALE

# NFA state kinds. States are small lists [kind, arg, out1, out2] so loops can be patched after creation.
_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)


def _esc(codepoint: int) -> str:
    """A code point as an escape that means the same literal inside and outside a character class."""
    return "\\U%08x" % codepoint


def _char_source(op: Any, av: Any, field: str, shown: str) -> str:
    """Re-create the source of one single-character atom from its parse tree.

    Why: case-insensitive matching in ``re`` has many special cases (the Kelvin sign, dotless i, ``ſ``...). Rather
    than re-implement them, each atom is compiled *on its own* by ``re`` and asked about one character at a
    time; an atom without repeats runs in constant time, so this cannot backtrack.
    """
    if op is _c.LITERAL:
        return _esc(av)
    if op is _c.NOT_LITERAL:
        return "[^" + _esc(av) + "]"
    if op is _c.ANY:
        return "."
    parts = []
    for item_op, item_av in av:
        if item_op is _c.NEGATE:
            parts.append("^")
        elif item_op is _c.LITERAL:
            parts.append(_esc(item_av))
        elif item_op is _c.RANGE:
            parts.append(_esc(item_av[0]) + "-" + _esc(item_av[1]))
        elif item_op is _c.CATEGORY and item_av in _CATEGORY_SRC:
            parts.append(_CATEGORY_SRC[item_av])
        else:
            raise _refuse(field, shown, f"a character-class item fxpeft does not know ({item_op})")
    return "[" + "".join(parts) + "]"


def _quote(shown: str) -> str:
    """The pattern for an error message: quoted in full unless it is very long."""
    return repr(shown) if len(shown) <= 200 else repr(shown[:200]) + "..."


def _refuse(field: str, shown: str, construct: str) -> ConfigError:
    return ConfigError(
        f"{field}: the regex {_quote(shown)} uses {construct}, which cannot be matched in linear time, so fxpeft "
        "refuses it (a crafted pattern could hang the loader). Rewrite the pattern without it, or list the "
        "module names explicitly."
    )


class _CharAtom:
    """One character test (a literal, ``.``, or a class) under some flags, with answers memoised per character."""

    __slots__ = ("_test", "_memo")

    def __init__(self, source: str, flags: int) -> None:
        self._test = re.compile(source, flags & _CHAR_FLAGS).fullmatch
        self._memo: dict[str, bool] = {}

    def __call__(self, ch: str) -> bool:
        hit = self._memo.get(ch)
        if hit is None:
            if len(self._memo) > 4096:  # many distinct characters (crafted names): keep memory bounded
                self._memo.clear()
            hit = self._memo[ch] = self._test(ch) is not None
        return hit


def _is_word(ch: str, ascii_only: bool) -> bool:
    # \b uses exactly the \w test (SRE_UNI_IS_WORD / SRE_IS_WORD), so ask re for it.
    return (_ASCII_WORD if ascii_only else _UNI_WORD)(ch) is not None


_UNI_WORD = re.compile(r"\w").fullmatch
_ASCII_WORD = re.compile(r"\w", re.ASCII).fullmatch
# Whether \b / \B match the empty string changed across Python versions (3.14 made \B match it); ask re.
_B_ON_EMPTY = re.search(r"\b", "") is not None
_NB_ON_EMPTY = re.search(r"\B", "") is not None


def _assertion(at: Any, flags: int) -> Callable[[str, int], bool]:
    """The zero-width test ``(text, pos) -> bool`` of an AT opcode, as ``_sre``'s ``SRE(at)`` defines it."""
    multiline = bool(flags & re.MULTILINE)
    if at is _c.AT_BEGINNING_STRING or (at is _c.AT_BEGINNING and not multiline):
        return lambda t, i: i == 0
    if at is _c.AT_BEGINNING:
        return lambda t, i: i == 0 or t[i - 1] == "\n"
    if at is _c.AT_END_STRING:
        return lambda t, i: i == len(t)
    if at is _c.AT_END and multiline:
        return lambda t, i: i == len(t) or t[i] == "\n"
    if at is _c.AT_END:  # Python's $ also matches before one trailing newline
        return lambda t, i: i == len(t) or (i == len(t) - 1 and t[i] == "\n")
    ascii_only = bool(flags & re.ASCII)

    def boundary(t: str, i: int) -> bool:
        before = i > 0 and _is_word(t[i - 1], ascii_only)
        after = i < len(t) and _is_word(t[i], ascii_only)
        return before != after

    if at is _c.AT_BOUNDARY:
        return lambda t, i: _B_ON_EMPTY if not t else boundary(t, i)
    assert at is _c.AT_NON_BOUNDARY, at  # the builder refuses every other AT code first
    return lambda t, i: _NB_ON_EMPTY if not t else not boundary(t, i)


# What the parser emits for ^ \A $ \Z \b \B (flags such as MULTILINE are applied later, by the compiler).
_KNOWN_AT = (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING, _c.AT_END, _c.AT_END_STRING, _c.AT_BOUNDARY, _c.AT_NON_BOUNDARY)


def _combine_flags(flags: int, add: int, remove: int) -> int:
    """Flags inside ``(?a-b:...)``, the way ``re``'s compiler combines them (``(?a)`` etc. replace the type)."""
    if add & _TYPE_FLAGS:
        flags &= ~_TYPE_FLAGS
    return (flags | add) & ~remove


class _NFABuilder:
    """Thompson construction from ``re``'s parse tree, built back to front so no fragment needs patching."""

    def __init__(self, field: str, shown: str) -> None:
        self.field, self.shown = field, shown
        self.states: list[list[Any]] = []
        self.atoms: list[_CharAtom] = []
        self.asserts: list[Callable[[str, int], bool]] = []
        self._atom_ids: dict[tuple[str, int], int] = {}
        self._assert_ids: dict[tuple[Any, int], int] = {}
        self._work = 0
        self.edge_only = True  # no \b, \B or multiline ^ $ (see Pattern._context)

    def new(self, kind: int, arg: Any = None, out1: int = -1, out2: int = -1) -> int:
        self.charge()
        self.states.append([kind, arg, out1, out2])
        return len(self.states) - 1

    def charge(self) -> None:
        # Counts states *and* repeat copies: ``(?:){4000000000}`` builds no state per copy but must still stop.
        self._work += 1
        if self._work > MAX_NFA_STATES:
            raise ConfigError(
                f"{self.field}: the regex {_quote(self.shown)} is too large to match safely (its automaton would "
                f"exceed {MAX_NFA_STATES} states; big {{m,n}} repeat counts are the usual cause). Use smaller "
                "repeat counts, or list the module names explicitly."
            )

    def seq(self, items: Any, flags: int, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self.item(op, av, flags, nxt)
        return nxt

    def item(self, op: Any, av: Any, flags: int, nxt: int) -> int:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            return self.new(_CHAR, self.atom(_char_source(op, av, self.field, self.shown), flags), nxt)
        if op is _c.AT:
            return self.new(_ASSERT, self.assertion(av, flags), nxt)
        if op is _c.SUBPATTERN:
            _group, add, remove, body = av
            return self.seq(body, _combine_flags(flags, add, remove), nxt)
        if op is _c.BRANCH:
            starts = [self.seq(alt, flags, nxt) for alt in av[1]]
            start = starts[-1]
            for other in reversed(starts[:-1]):
                start = self.new(_SPLIT, None, other, start)
            return start
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # lazy and greedy accept the same names
            return self.repeat(*av, flags, nxt)
        raise _refuse(self.field, self.shown, _REFUSED.get(op, f"an operation fxpeft does not support ({op})"))

    def repeat(self, lo: int, hi: int, body: Any, flags: int, nxt: int) -> int:
        if hi == _c.MAXREPEAT:  # unbounded: *, + or {m,}
            start = loop = self.new(_SPLIT, None, -1, nxt)  # loop: one more copy of body, or leave
            loop_body = self.seq(body, flags, loop)
            self.states[loop][2] = loop_body
        else:
            start = nxt
            for _ in range(hi - lo):  # optional copies: (body (body (...)?)?)?
                self.charge()
                start = self.new(_SPLIT, None, self.seq(body, flags, start), nxt)
        for _ in range(lo):
            self.charge()
            start = self.seq(body, flags, start)
        return start

    def atom(self, source: str, flags: int) -> int:
        key = (source, flags & _CHAR_FLAGS)
        if key not in self._atom_ids:
            self._atom_ids[key] = len(self.atoms)
            self.atoms.append(_CharAtom(source, flags))
        return self._atom_ids[key]

    def assertion(self, at: Any, flags: int) -> int:
        if at not in _KNOWN_AT:
            raise _refuse(self.field, self.shown, f"an assertion fxpeft does not support ({at})")
        key = (at, flags & (re.MULTILINE | re.ASCII))
        if key not in self._assert_ids:
            self._assert_ids[key] = len(self.asserts)
            edges = (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING, _c.AT_END, _c.AT_END_STRING)
            self.edge_only &= at in edges and not flags & re.MULTILINE
            self.asserts.append(_assertion(at, flags))
        return self._assert_ids[key]


def _release_slots(slots: list[int]) -> None:
    """Return a pattern's DFA-cache slots to the global pool (its cache was dropped, or it was freed)."""
    with _dfa_slots_lock:
        _dfa_slots_in_use[0] -= slots[0]
        slots[0] = 0


class _DState:
    """A DFA state: the set of NFA character/match states live at one position, and its cached moves."""

    __slots__ = ("states", "accept", "by_atom", "moves")

    def __init__(self, states: frozenset[int], nfa: tuple[tuple[Any, ...], ...]) -> None:
        self.states = states
        self.accept = False
        # The live character states grouped by their test, so a step runs each distinct test once.
        self.by_atom: dict[int, list[int]] = {}
        for s in states:
            kind, atom, out, _ = nfa[s]
            if kind == _MATCH:
                self.accept = True
            else:
                self.by_atom.setdefault(atom, []).append(out)
        self.moves: dict[tuple[str, tuple[bool, ...]], _DState] = {}


class Pattern:
    """A regex compiled to an automaton: matching costs time linear in the text, whatever the pattern.

    Build it with :func:`compile_pattern`. Answers equal ``re``'s for every pattern it accepts. Safe to share
    between threads: the lazily built DFA cache only ever gains equivalent entries or is dropped whole.

    Attributes:
        pattern: the regex source as given.
        field: the config field it came from (named in errors).
    """

    def __init__(self, pattern: str, field: str, builder: _NFABuilder, start: int) -> None:
        self.pattern, self.field = pattern, field
        self._states = tuple(map(tuple, builder.states))  # [kind, arg, out1, out2] per NFA state
        self._atoms = builder.atoms
        self._asserts = builder.asserts
        # Whether every assertion is one that is false at all positions except the first and last two.
        self._interior = () if not builder.asserts else (
            tuple(False for _ in builder.asserts) if builder.edge_only else None)
        self._start = start
        self._cache: dict[Any, _DState] = {}
        self._slots = [0]  # this pattern's share of _dfa_slots_in_use; a list so the finalizer can read it
        weakref.finalize(self, _release_slots, self._slots)

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r}, field={self.field!r}, states={len(self._states)})"

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of ``text`` matches, as ``re.fullmatch(pattern, text) is not None``.

        Example:
            >>> compile_pattern(r".*\\.(q|v)_proj", field="target_modules").fullmatch("layers.0.q_proj")
            True
        """
        return self._run(text, whole=True)

    def match(self, text: str) -> bool:
        """Whether a prefix of ``text`` matches, as ``re.match(pattern, text) is not None``.

        Example:
            >>> compile_pattern(r"layers\\.\\d", field="target_modules").match("layers.3.q_proj")
            True
        """
        return self._run(text, whole=False)

    def _context(self, text: str, pos: int) -> tuple[bool, ...]:
        """The answers of every ``^ $ \\b ...`` at ``pos``: the epsilon closure depends on nothing else."""
        return tuple([test(text, pos) for test in self._asserts])

    def _run(self, text: str, whole: bool) -> bool:
        if not isinstance(text, str):
            raise TypeError(f"{self.field}: can only match a str module name, not {type(text).__name__}")
        # Fast path: ^ \A \Z and single-line $ are all false away from the ends, and no assertion gives ().
        interior, last = self._interior, len(text) - 1
        ctx = self._context(text, 0)
        state = self._cache.get(ctx) or self._remember(ctx, self._intern(self._closure([self._start], ctx)))
        for pos, ch in enumerate(text, 1):  # pos: the position after ch
            if state.accept and not whole:
                return True
            if not state.states:
                return False  # dead: nothing can match any more
            ctx = interior if interior is not None and pos < last else self._context(text, pos)
            nxt = state.moves.get((ch, ctx))
            if nxt is None:
                nxt = self._step(state, ch, ctx)
            state = nxt
        return state.accept

    def _step(self, state: _DState, ch: str, ctx: tuple[bool, ...]) -> _DState:
        seeds = [out for atom, outs in state.by_atom.items() if self._atoms[atom](ch) for out in outs]
        nxt = self._intern(self._closure(seeds, ctx))
        state.moves[(ch, ctx)] = nxt
        self._charge_cache(1)
        return nxt

    def _intern(self, states: frozenset[int]) -> _DState:
        found = self._cache.get(states)
        return found if found is not None else self._remember(states, _DState(states, self._states))

    def _remember(self, key: Any, state: _DState) -> _DState:
        self._charge_cache(1 + len(state.states))
        self._cache[key] = state
        return state

    def _charge_cache(self, slots: int) -> None:
        # Subset construction can create exponentially many DFA states in theory; dropping the cache when it
        # grows keeps memory bounded while each step stays O(NFA size), i.e. matching stays linear.
        with _dfa_slots_lock:
            self._slots[0] += slots
            _dfa_slots_in_use[0] += slots
            full = self._slots[0] > _DFA_SLOTS_PER_PATTERN or _dfa_slots_in_use[0] > _DFA_SLOTS_TOTAL
        if full:
            self._cache.clear()  # the moves hang off the dropped states, so they go too
            _release_slots(self._slots)

    def _closure(self, seeds: list[int], ctx: tuple[bool, ...]) -> frozenset[int]:
        """The character/match states reachable from ``seeds`` without consuming a character (iterative DFS)."""
        seen: set[int] = set()
        kept: set[int] = set()
        stack = list(seeds)
        states = self._states
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind, arg, out1, out2 = states[s]
            if kind == _SPLIT:
                stack.append(out2)
                stack.append(out1)
            elif kind == _ASSERT:
                if ctx[arg]:
                    stack.append(out1)
            else:
                kept.add(s)
        return frozenset(kept)


def _group_depth(pattern: str) -> int:
    """The deepest nesting of ``(`` outside character classes; an over-estimate is only ever conservative."""
    depth = deepest = 0
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 1
        elif ch == "[":
            i += 2 if pattern[i + 1 : i + 2] == "^" else 1
            i += 1 if pattern[i : i + 1] == "]" else 0  # a leading ] is a literal
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        i += 1
    return deepest


def _parse(pattern: str, field: str, shown: str) -> Any:
    """``re``'s own parse tree of ``pattern``; every way it can fail becomes a ConfigError."""
    if len(shown) > MAX_PATTERN_CHARS:
        raise ConfigError(
            f"{field}: the regex ({len(shown)} characters, starting {shown[:60]!r}) is longer than "
            f"{MAX_PATTERN_CHARS} characters; list the module names instead."
        )
    if _group_depth(pattern) > MAX_GROUP_DEPTH:
        raise ConfigError(
            f"{field}: the regex {_quote(shown)} nests parentheses more than {MAX_GROUP_DEPTH} deep; "
            "flatten the pattern."
        )
    try:
        return _sre_parse.parse(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        where = "" if pattern == shown else f" inside PEFT's template {_quote(pattern)}"
        raise ConfigError(
            f"{field}: {_quote(shown)} is not a valid Python regex ({exc}{where}); fix the pattern (PEFT applies "
            "it with Python's re module) or list the module names instead."
        ) from None


@functools.lru_cache(maxsize=512)  # as many as re's own cache holds
def _compile(source: str, field: str, shown: str) -> Pattern:
    tree = _parse(source, field, shown)
    builder = _NFABuilder(field, shown)
    match = builder.new(_MATCH)
    try:
        start = builder.seq(tree, tree.state.flags, match)
    except RecursionError:
        raise ConfigError(f"{field}: the regex {_quote(shown)} nests too deeply; flatten the pattern.") from None
    return Pattern(shown, field, builder, start)


def compile_pattern(pattern: str, *, field: str) -> Pattern:
    """Compile a regex from an untrusted config into a :class:`Pattern` that matches in linear time.

    The syntax is exactly Python's (``re``'s own parser reads it). Supported: literals, ``.``, classes (``\\w``,
    ``\\d``, ``\\s``, negated, ranges), ``|``, groups, greedy and lazy ``* + ? {m,n}``, ``^ $ \\A \\Z \\b \\B``
    and the flags ``i m s x a u`` (inline ``(?i)`` or scoped ``(?i:...)``). Compiled patterns are cached.

    Args:
        pattern: the regex, as written in the config.
        field: the config field it came from, e.g. ``"target_modules"``; every error names it.

    Returns:
        The compiled pattern; use :meth:`Pattern.fullmatch` or :meth:`Pattern.match`.

    Raises:
        ConfigError: ``pattern`` is not a string, is not a valid regex, is longer than
            :data:`MAX_PATTERN_CHARS`, would need more than :data:`MAX_NFA_STATES` states, or uses a construct
            that cannot be matched in linear time (backreference, lookaround, conditional, atomic group,
            possessive repeat). The message names the field and the construct.

    Example:
        >>> p = compile_pattern(r"model\\.layers\\.\\d+\\.self_attn\\.(q|k|v)_proj", field="target_modules")
        >>> p.fullmatch("model.layers.11.self_attn.k_proj"), p.fullmatch("model.layers.1.mlp.up_proj")
        (True, False)
        >>> compile_pattern(r"^(?!.*lm_head).*", field="target_modules")
        Traceback (most recent call last):
        ...
        fxpeft.errors.ConfigError: target_modules: the regex '^(?!.*lm_head).*' uses a negative lookahead ...
    """
    if not isinstance(pattern, str):  # checked before the cache, which needs a hashable key
        raise ConfigError(f"{field}: a regex must be a string, not {type(pattern).__name__} ({pattern!r:.200})")
    return _compile(pattern, field, pattern)


def fullmatch(pattern: str, text: str, *, field: str) -> bool:
    """PEFT's rule for a string ``target_modules`` / ``exclude_modules`` / ``feedforward_modules``.

    Same answer as ``re.fullmatch(pattern, text) is not None``, in time linear in ``len(text)``.

    Args:
        pattern: the regex from the config.
        text: a module name such as ``"model.layers.0.self_attn.q_proj"``.
        field: the config field the pattern came from (named in errors).

    Returns:
        Whether all of ``text`` matches ``pattern``.

    Raises:
        ConfigError: the pattern is refused (see :func:`compile_pattern`).

    Example:
        >>> fullmatch(r".*\\.(q_proj|v_proj)", "model.layers.0.self_attn.v_proj", field="target_modules")
        True
        >>> fullmatch(r"([\\w.]|[\\w.])*!", "model.layers.0.self_attn.q_proj" * 2, field="target_modules")
        False
    """
    return compile_pattern(pattern, field=field).fullmatch(text)


def pattern_key_match(key: str, text: str, *, field: str) -> bool:
    """PEFT's rule for a key of ``rank_pattern`` / ``alpha_pattern``: ``re.match(rf"(.*\\.)?({key})$", text)``.

    The key is pasted into PEFT's template textually, exactly as PEFT does, so a key that closes the group early
    behaves as it would in PEFT. Errors quote the key, not the template.

    Args:
        key: the ``rank_pattern`` / ``alpha_pattern`` key.
        text: a module name.
        field: the config field, e.g. ``"rank_pattern"`` (named in errors).

    Returns:
        Whether PEFT would apply this key's value to the module ``text``.

    Raises:
        ConfigError: the key is refused (see :func:`compile_pattern`).

    Example:
        >>> pattern_key_match("q_proj", "model.layers.0.self_attn.q_proj", field="rank_pattern")
        True
        >>> pattern_key_match("layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", field="rank_pattern")
        False
    """
    if not isinstance(key, str):
        raise ConfigError(f"{field}: a pattern key must be a string, not {type(key).__name__} ({key!r:.200})")
    return _compile(rf"(.*\.)?({key})$", field, key).match(text)


# ---------------------------------------------------------------------------------------------------------------
# JSON

# A backslash and the character it escapes form one token, so an escaped quote never toggles "inside a string".
_JSON_TOKENS = re.compile(r'\\.|["\[\]{}]', re.DOTALL)


def _too_deep_at(text: str, max_depth: int) -> int | None:
    """Offset of the first bracket nested deeper than ``max_depth`` (outside strings), or None.

    A flat scan, so it cannot recurse. Up to the first character that makes the text invalid JSON (which is as
    far as ``json`` ever parses) the depth it counts is exactly ``json``'s.
    """
    depth, in_string = 0, False
    for tok in _JSON_TOKENS.finditer(text):
        ch = tok.group()
        if ch == '"':
            in_string = not in_string
        elif in_string or ch[0] == "\\":
            continue
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return tok.start()
        else:
            depth -= 1
    return None


def _read_capped(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # never read more than the cap, whatever the file's size
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot be read ({exc.strerror or exc}); check the path.") from None
    if len(data) > max_bytes:
        raise AdapterFileError(
            f"{path}: is larger than {max_bytes} bytes, far more than any adapter config; it is corrupt or not "
            "a config. Re-save the adapter, or pass a larger max_bytes if the file is genuine."
        )
    return data


def load_json(path: str | os.PathLike[str], *, max_depth: int = 64, max_bytes: int = 16 * 2**20) -> Any:
    """Read an untrusted JSON file (such as ``adapter_config.json``) with bounded size and nesting.

    Never raises ``RecursionError``: the nesting is measured by a flat scan before ``json`` parses anything.
    A UTF-8 byte-order mark is accepted; ``NaN`` / ``Infinity`` are accepted as ``json`` does.

    Args:
        path: the file.
        max_depth: deepest nesting of arrays/objects accepted (``{"a": [1]}`` has depth 2).
        max_bytes: largest file accepted.

    Returns:
        The parsed JSON value.

    Raises:
        AdapterFileError: the file cannot be read, is over ``max_bytes``, is not UTF-8, is not valid JSON, or
            nests deeper than ``max_depth``. The message names the file, the problem and the fix.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "adapter_config.json")
        >>> with open(path, "w") as fh:
        ...     _ = fh.write('{"r": 8, "target_modules": ["q_proj", "v_proj"]}')
        >>> load_json(path)
        {'r': 8, 'target_modules': ['q_proj', 'v_proj']}
    """
    path = os.fspath(path)
    data = _read_capped(path, max_bytes)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AdapterFileError(
            f"{path}: is not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8 JSON."
        ) from None
    where = _too_deep_at(text, max_depth)
    if where is not None:
        raise AdapterFileError(
            f"{path}: JSON nests deeper than {max_depth} levels (at character {where}); an adapter config is "
            "nearly flat, so the file is corrupt or crafted. Re-save the adapter, or pass a larger max_depth if "
            "the file is genuine."
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and int('9'*5000)'s digit limit
        raise AdapterFileError(f"{path}: is not valid JSON ({exc}); re-save the file or fix it by hand.") from None
