"""The method interface: a PEFT method is one file that subclasses :class:`Method` and registers it.

The file owns everything about the method: its config (PEFT's field names), which sites it adapts and its
default targets, the adapter submodule it builds, the nodes it inserts (through :class:`Emit`), how it folds
into the weight and back, and its PEFT file format (tensor keys and ``adapter_config.json`` fields). The
generic passes (``fxpeft.passes``), ``io``, ``cli`` and ``viz`` only call these hooks::

    @PeftRegistry.register("bitfit")
    class BitFit(Method):
        config_cls = BitFitConfig
        ...

See ``examples/custom_method.py`` for a complete method written against the public API only.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, ClassVar

import torch
from torch import fx, nn

from .errors import AdapterFileError, ConfigError, UnsupportedSiteError
from .sites import Call, Site
from .tags import AdapterTag, Role, get_tag, set_tag

__all__ = ["PeftRegistry", "Method", "AdapterModule", "PeftConfigBase", "Emit", "fx_callable"]


@dataclasses.dataclass
class PeftConfigBase:
    """Fields every method's config has, with PEFT's names. ``peft_type`` names the registered method."""

    peft_type: ClassVar[str] = ""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    #: keep the adapter in the base weight's dtype; False (PEFT's default) keeps it in fp32 on a bf16/fp16 base
    #: and casts around it in the graph, as PEFT's ``autocast_adapter_dtype=True`` does.
    keep_base_dtype: bool = False
    #: adapt only these layer indices (PEFT's rule: the first numbered module-name component, or the one after a
    #: ``layers_pattern`` component); applies to list ``target_modules`` entries matched as suffixes.
    layers_to_transform: int | list[int] | None = None
    layers_pattern: list[str] | str | None = None
    #: modules trained whole, as a per-adapter copy (PEFT's ``ModulesToSaveWrapper``); see :mod:`fxpeft.copies`.
    modules_to_save: list[str] | None = None
    #: PEFT's task type; ``SEQ_CLS``/``TOKEN_CLS`` add ``classifier``/``score`` and ``QUESTION_ANS`` adds
    #: ``qa_outputs`` to ``modules_to_save``, as PEFT's task models do.
    task_type: str | None = None


class AdapterModule(nn.Module):
    """Base class of the small submodules that hold one adapter's parameters at one site.

    Passes find adapters by this type and by node tags, never by attribute names. Run-time state lives in the
    ``gate`` buffer (on while the adapter is enabled and not merged), which the graph reads on every call:
    switching an adapter off needs no new code and no recompile. ``fold`` never reads the gate.

    Example:
        >>> import torch, fxpeft
        >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        ...                     fxpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> x = torch.randn(2, 4); (ad,) = fxpeft.adapters(gm).values()
        >>> ad.set_active(False); bool((gm(x) == gm.get_submodule("0")(x)).all())
        True
    """

    method: ClassVar[str] = ""

    def __init__(self, site_name: str, adapter_name: str) -> None:
        super().__init__()
        # plain attributes straight into __dict__: nn.Module.__setattr__'s checks cost more than the module's
        # other set-up, once per site of a rewrite (none of these names is a parameter, buffer or submodule)
        self.__dict__.update(
            site_name=site_name,
            adapter_name=adapter_name,
            enabled=True,   # chosen by the user: set_adapter / disable_adapters
            merged=False,   # folded into the base weight (merge_adapter): the graph must not add it again
            order=0,        # when its adapter joined the graph (set on insertion): names list in that order
        )
        self._buffers["gate"] = torch.ones((), dtype=torch.bool)  # register_buffer's name checks: see above
        self._non_persistent_buffers_set.add("gate")

    #: names of this module's parameters that stay frozen while the adapter trains (MiCA's fixed ``B``)
    frozen_params: frozenset[str] = frozenset()
    #: injected beside another method's adapter of the same name, at that method's request
    #: (:meth:`Method.companions`): files write it under the other method's config
    companion: bool = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an active adapter trains: all of them but :attr:`frozen_params`."""
        return [p for n, p in self.named_parameters() if n not in self.frozen_params]

    @property
    def active(self) -> bool:
        """Whether the adapter is on (computed by the graph, or merged into the weight)."""
        return self.enabled

    def set_active(self, on: bool) -> None:
        """Switch the adapter on or off for every later call (graph and compiled code unchanged)."""
        self.enabled = bool(on)
        self._sync()

    def set_merged(self, merged: bool) -> None:
        """Record that the adapter's fold is in (or out of) the base weight; the graph stops (or resumes) adding it."""
        self.merged = bool(merged)
        self._sync()

    def _sync(self) -> None:
        on = self.enabled and not self.merged
        with torch.no_grad():
            self.gate.fill_(on)
        self.gate_changed(on)

    def gate_changed(self, on: bool) -> None:
        """Hook for methods that keep other run-time buffers in step with the gate (LoRA's ``scale``)."""

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, adapter={self.adapter_name!r}"


def fx_callable(op: torch._ops.OpOverload):
    """The symbolic-dialect function for an aten op: the one rule that maps the two dialects.

    ``torch.<name>`` / ``torch._C._nn.<name>`` are the generated bindings of the aten op of that name, with the
    same schema (arguments, order, defaults), so a node built for one dialect computes the same in the other.
    Ops without a public binding (``_to_copy``) are called as the aten op itself, which works in both.
    """
    name = op._schema.name.split("::", 1)[1]
    for namespace in (torch._C._VariableFunctions, torch._C._nn):
        fn = getattr(namespace, name, None)
        if fn is not None:
            return fn
    return op


#: stacks kept by :func:`stack_slots` between calls: key -> (weak references to the slots, the stack)
_STACKS: dict[tuple, tuple[tuple, torch.Tensor]] = {}


def new_node(graph: fx.Graph, op: str, target, args: tuple, kwargs: dict, name: str) -> fx.Node:
    """``graph.create_node(op, target, args, kwargs, name=name)`` at the insert point, cheaper per node.

    ``create_node`` walks the arguments with pytree to warn about raw SymInts (which fxpeft never passes), a third
    of its cost on a rewrite's thousands of nodes; created bare and given its arguments through the public setters,
    a node skips that walk and is otherwise the same. Where the owning module has node-creation hooks they see
    the node whole, so those graphs take ``create_node`` itself.
    """
    owner = graph.owning_module
    if (not args and not kwargs) or (owner is not None and getattr(owner, "_create_node_hooks", None)):
        return graph.create_node(op, target, args, kwargs, name=name)
    node = graph.create_node(op, target, (), {}, name=name)
    # the properties' own setters (users updated): Node.__setattr__ would also re-file the node in the graph's
    # (op, target) look-up table, which arguments do not change
    fx.Node.args.fset(node, args)
    if kwargs:
        fx.Node.kwargs.fset(node, kwargs)
    return node


def stack_slots(rank: int, dim: int, *slots: torch.Tensor | None) -> torch.Tensor:
    """``stack`` of per-adapter tensors, each zero-padded to ``rank`` along ``dim`` (None: all zeros).

    A mixed batch reads every adapter's factors at every site. While nothing needs their gradient (inference)
    and no slot has changed (same tensors, same in-place version), the stack of the last call is reused, so a
    call costs the same whatever the number of adapters. Under autograd, ``torch.compile`` or export it is a
    plain ``stack`` of the padded slots.
    """
    present = [t for t in slots if t is not None]
    plain = (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
             and all(type(t) in (torch.Tensor, nn.Parameter) and not t.is_inference() for t in present))
    # the storage too: ``p.data = new`` (a load that swaps a parameter's data) keeps its identity and version
    key = (rank, dim, *((id(t), t._version, t.data_ptr()) if t is not None else None for t in slots)) if plain else None
    hit = _STACKS.get(key) if plain else None
    if hit is not None and all(ref is None and t is None or ref is not None and ref() is t
                               for ref, t in zip(hit[0], slots)):
        return hit[1]
    shape = list(present[0].shape)
    shape[dim] = rank
    parts = []
    for t in slots:
        if t is None:
            parts.append(present[0].new_zeros(shape))
        else:  # constant_pad_nd pads the last dims first: [0, 0, ..., 0, n] pads ``dim``
            short = rank - t.shape[dim]
            parts.append(torch.constant_pad_nd(t, [0, 0] * (t.dim() - 1 - dim) + [0, short]) if short else t)
    out = torch.stack(parts)
    if plain:
        if len(_STACKS) >= 512:  # a bound: one entry per site and factor of the graphs being served
            _STACKS.pop(next(iter(_STACKS)))
        _STACKS[key] = (tuple(None if t is None else weakref.ref(t) for t in slots), out)
    return out


class Emit:
    """Builds one adapter's nodes at one call, in the graph's dialect, each tagged with an :class:`AdapterTag`.

    Methods write aten ops (``torch.ops.aten.linear.default``); in a symbolic_trace graph :func:`fx_callable`
    maps them to the torch function of the same schema. Inserted nodes inherit the call's module stack. A node is
    named ``<site>_<role>`` (``q_proj_down``), or ``<site>_<label>`` where the method passes ``label=`` (a term of
    its formula, ``q_proj_delta_weight``), so that ``gm.code`` reads as the method's maths.

    Attributes:
        call: the site call being adapted (``call.node`` computes the base output, ``call.input`` is ``x``).
        site: the site.
        export: the graph is in the export (aten) dialect.
    """

    def __init__(self, gm: fx.GraphModule, tag: AdapterTag, call: Call, site: Site, export: bool) -> None:
        self.gm, self.graph, self.tag, self.call, self.site, self.export = gm, gm.graph, tag, call, site, export
        #: the mixed-batch row index (``int64 [batch]``: row ``b`` uses ``slots[index[b]]``); None in one-adapter graphs
        self.index: fx.Node | None = None
        #: the graph input whose dim 0 is the batch (mixed-batch graphs only)
        self.batch_source: fx.Node | None = None
        #: ``id(adapter module) -> its path`` (mixed-batch graphs only, for :meth:`param_of`)
        self.paths: dict[int, str] = {}
        self._stem = tag.site.replace(".", "_").replace(":", "_")
        # one copy of the call's module stack, shared by every node this Emit makes (read-only metadata)
        stack = call.node.meta.get("nn_module_stack")
        self._stack = dict(stack) if stack is not None else None
        self._tags: dict[tuple[Role, int | None], AdapterTag] = {}

    def _node(self, op: str, target, args, kwargs, role: Role, replaces: int | None = None,
              label: str | None = None) -> fx.Node:
        # Names like ``q_proj_down`` make gm.code read as the adapter it is.
        node = new_node(self.graph, op, target, tuple(args), dict(kwargs), f"{self._stem}_{label or role.value}")
        tag = self._tags.get((role, replaces))
        if tag is None:  # tags are frozen: one per role, not per node
            tag = self._tags[(role, replaces)] = self.tag.with_role(role, replaces=replaces)
        set_tag(node, tag)
        if self._stack is not None:
            node.meta["nn_module_stack"] = self._stack
        return node

    def op(self, aten_op: torch._ops.OpOverload, *args, role: Role = Role.COMPUTE, replaces: int | None = None,
           label: str | None = None, **kwargs) -> fx.Node:
        """A ``call_function`` node of ``aten_op`` (mapped to the graph's dialect); ``label`` names it."""
        target = aten_op if self.export else fx_callable(aten_op)
        return self._node("call_function", target, args, kwargs, role, replaces, label)

    def function(self, fn, *args, role: Role = Role.COMPUTE, replaces: int | None = None,
                 label: str | None = None) -> fx.Node:
        """A ``call_function`` node of a module-level Python function (the same in both dialects): for a step no
        aten op expresses, such as a choice made on a run-time buffer in eager mode."""
        return self._node("call_function", fn, args, {}, role, replaces, label)

    def param(self, attr: str, role: Role = Role.PARAM, label: str | None = None) -> fx.Node:
        """Read a parameter or buffer of this adapter's submodule; ``label`` names the node."""
        return self._node("get_attr", f"{self.tag.module}.{attr}", (), {}, role, label=label)

    def param_of(self, adapter: AdapterModule, attr: str, role: Role = Role.PARAM) -> fx.Node:
        """Read a parameter or buffer of another adapter's submodule (a mixed batch reads every adapter's)."""
        return self._node("get_attr", f"{self.paths[id(adapter)]}.{attr}", (), {}, role)

    def input(self, name: str, check=None) -> fx.Node:
        """A forward keyword the adapter reads beyond the model's inputs (a per-row task id), checked.

        The graph takes it as ``gm(*args, name=...)`` (added on first use, shared by every adapter that reads
        it, removed with the last one: :mod:`fxpeft.inputs`). ``check(value, name, batch_source)``, a
        module-level function, runs once per call on the value (``batch_source``: the graph's first input, dim 0
        the batch) and returns the tensor the nodes read; it raises a typed error for a missing or misshapen
        value (default: :func:`fxpeft.inputs.require_input`).
        """
        from .inputs import checked_input

        return checked_input(self.gm, name, self.export, check)

    def rows(self, x: fx.Node, width: int) -> fx.Node:
        """``x`` seen as ``[batch, rows, width]`` (mixed-batch graphs): a site's input holds each batch element's
        rows together (``[B, T, in]``, or ``[B*T, in]`` for an ``addmm`` on flattened tokens)."""
        batch = self.op(torch.ops.aten.sym_size.int, self.batch_source, 0)
        return self.op(torch.ops.aten.reshape.default, x, [batch, -1, width])  # [B, L, width]

    def shared(self, attr: str, role: Role = Role.PARAM, label: str | None = None) -> fx.Node:
        """Read a tensor of the method's state shared by every site of this adapter (see :meth:`Method.shared_state`);
        ``label`` names the node."""
        return self._node("get_attr", f"{Method.shared_path(self.tag.method, self.tag.adapter)}.{attr}", (), {}, role,
                          label=label)

    def call_shared(self, *args, role: Role = Role.COMPUTE, label: str | None = None) -> fx.Node:
        """Call this adapter's shared state as a module (``call_module``): for shared state that computes its value,
        such as a prompt encoder, so ``train()``/``eval()`` switch its dropout."""
        path = Method.shared_path(self.tag.method, self.tag.adapter)
        return self._node("call_module", path, args, {}, role, label=label)

    def module(self, sub: str, *args, role: Role = Role.COMPUTE, label: str | None = None) -> fx.Node:
        """Call a submodule of this adapter's submodule (a dropout, so ``train()``/``eval()`` switches it)."""
        return self._node("call_module", f"{self.tag.module}.{sub}", args, {}, role, label=label)

    def add_module(self, name: str, module: nn.Module, *args, role: Role = Role.COMPUTE) -> fx.Node:
        """Give the graph module a helper submodule next to this adapter's (``<adapter path>_<name>``), and call it."""
        path = f"{self.tag.module}_{name}"
        self.gm.add_submodule(path, module)
        return self._node("call_module", path, args, {}, role)

    def stack_slots(self, slots: list[fx.Node | None], rank: int, dim: int, role: Role) -> fx.Node:
        """A node stacking per-slot tensors padded to ``rank`` along ``dim`` (see :func:`stack_slots`)."""
        return self._node("call_function", stack_slots, (rank, dim, *slots), {}, role)

    def weight(self, own: bool = False) -> fx.Node:
        """The site's base weight as a graph value, in its stored layout (``site.fan_in_fan_out`` says which):
        the call's own weight node where it has one, else a new read of the parameter.

        ``own=True`` always makes a new read, tagged as this adapter's: for a method that reads the weight beside
        the call (DoRA's weight norm) rather than in its place, so the merge passes do not take the read for
        another call site sharing the weight (a tie)."""
        if self.call.weight_node is not None and not own:
            return self.call.weight_node
        return self._node("get_attr", self.site.weight, (), {}, Role.BASE_WEIGHT)

    def bias(self) -> fx.Node | None:
        """The site's base bias as a graph value, or None."""
        return None if self.site.bias is None else self._node("get_attr", self.site.bias, (), {}, Role.BASE_BIAS)

    def cast(self, x: fx.Node, dtype: torch.dtype, role: Role = Role.CAST, replaces: int | None = None) -> fx.Node:
        """``x.to(dtype)`` as a node (the casts around an fp32 adapter on a bf16 base)."""
        return self.op(torch.ops.aten._to_copy.default, x, role=role, replaces=replaces, dtype=dtype)

    def replace_output(self, out: fx.Node) -> None:
        """Make every user of the call's output read ``out`` instead (``out`` is tagged ``OUT``)."""
        y = self.call.node
        y.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out and not _inside(user, self.tag))

    def replace_input(self, old: fx.Node, new: fx.Node) -> None:
        """Make the call (or its weight's transpose) read ``new`` where it read ``old`` (its input or weight).

        ``new`` and the nodes of this adapter it depends on move before the call, wherever they were built.
        """
        # ``old`` may also be another adapter's value standing in for the weight (a method that composes with the
        # adapters below it): only the nodes that read ``old`` take ``new``
        users = [u for u in (self.call.weight_user, self.call.node) if u is not None and old in u.all_input_nodes]
        users = users or [self.call.node]
        first = users[0]  # a weight's transpose comes before the call
        for node in self._own_ancestors(new):  # a topological order: each after what it reads
            first.prepend(node)
        for user in dict.fromkeys(users):
            user.replace_input_with(old, new)

    def _own_ancestors(self, node: fx.Node) -> list[fx.Node]:
        order: list[fx.Node] = []
        seen: set[fx.Node] = set()

        def visit(n: fx.Node) -> None:
            if n in seen or not _inside(n, self.tag):
                return
            seen.add(n)
            for a in n.all_input_nodes:
                visit(a)
            order.append(n)

        visit(node)
        return order


def _inside(node: fx.Node, tag: AdapterTag) -> bool:
    other = get_tag(node)
    return other is not None and other.module == tag.module


class Method:
    """One PEFT method. Subclasses set the class attributes and implement the hooks.

    Class attributes:
        config_cls: the config dataclass (a :class:`PeftConfigBase`), with PEFT's field names.
        display_name: how people write the method (``"LoRA"``); drawings and messages use it.
        color: ``(fill, border)`` colours for drawings.
        site_kinds: the site kinds the method can adapt.
        spec_aliases: short CLI keys for config fields (``{"alpha": "lora_alpha"}``).
        default_targets: ``target_modules`` by HF ``model_type`` when the config leaves it unset.
        peft_default_table: name of PEFT's own table of defaults in ``peft.utils.constants`` (preferred when PEFT
            is installed: it knows more model families).
        peft_fields: ``adapter_config.json`` fields that do not change what the adapter computes, beyond the
            config's own fields (PEFT bookkeeping); any other set field is refused on load.
        targets_from_graph: the method finds its one site in the graph itself (:meth:`select_sites`), so its
            PEFT files carry no ``target_modules`` (prompt learning: the input embedding).
        peft_absent_fields: generic config fields (``target_modules``...) that PEFT's config for this method does
            not have: files leave them out, as PEFT writes them.
        copies_prefix: the key prefix of the ``modules_to_save`` tensors in PEFT's files: ``base_model.model.``
            (a tuner wraps the model), ``base_model.`` for prompt learning (PEFT wraps no tuner there).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = PeftConfigBase
    display_name: ClassVar[str] = ""
    color: ClassVar[tuple[str, str]] = ("#dee2e6", "#495057")
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv", "embedding"})
    spec_aliases: ClassVar[dict[str, str]] = {}
    default_targets: ClassVar[dict[str, list[str]]] = {}
    peft_default_table: ClassVar[str | None] = None
    peft_fields: ClassVar[frozenset[str]] = frozenset()
    targets_from_graph: ClassVar[bool] = False
    peft_absent_fields: ClassVar[frozenset[str]] = frozenset()
    copies_prefix: ClassVar[str] = "base_model.model."

    # ---------------------------------------------------------------------------------------- config
    @classmethod
    def validate_config(cls, config: Any) -> None:
        """Raise :class:`ConfigError` naming the field for any invalid value."""

    @classmethod
    def fill_defaults(cls, config: Any, model_type: str | None) -> Any:
        """Return ``config`` (a copy) with fields that depend on the model filled in (called before targeting)."""
        return config

    @classmethod
    def check_site(cls, site: Site, config: Any) -> str | None:
        """Return why the method cannot adapt ``site``, or None if it can."""
        if site.kind not in cls.site_kinds:
            return f"{cls.display_name or cls.name} adapts {sorted(cls.site_kinds)} sites, not {site.kind}"
        return None

    @classmethod
    def check_selection(cls, config: Any, sites: list[Site]) -> None:
        """Check (or warn about) the config against the chosen sites as a whole, before any change."""

    @classmethod
    def select_sites(cls, gm: fx.GraphModule, config: Any, sites: dict[str, Site], select) -> list[Site]:
        """The sites ``config`` adapts in ``gm``: ``select(config)`` applies PEFT's generic target rules.

        A method overrides it where its targets depend on the graph (a default read off the model) or where
        sites must go together (the call sites of one tied weight). Raise a typed error for a selection the
        method cannot adapt; nothing has changed yet.
        """
        return select(config)

    @classmethod
    def companions(cls, config: Any) -> list[Any]:
        """Configs of other methods that ``config`` asks for beside it (LoRA's ``trainable_token_indices``).

        The rewrite injects them after this method's adapter, under the same adapter name and in the same
        transaction; one file holds them all (see :meth:`companion_fields`). Default: none.
        """
        return []

    @classmethod
    def companion_fields(cls, adapters: dict[str, AdapterModule], sites: dict[str, Site]) -> dict[str, Any]:
        """For a method injected as a companion: the fields of the other method's ``adapter_config.json`` that
        ask for these adapters (the inverse of that method's :meth:`companions`)."""
        raise AdapterFileError(f"{cls.display_name or cls.name} adapters cannot be written as another method's "
                               "companion")

    # ---------------------------------------------------------------------------------------- graph
    @classmethod
    def shared_state(cls, config: Any, sites: list[Site], adapter_name: str, dtype: torch.dtype,
                     device: torch.device) -> nn.Module | None:
        """State shared by every site of one adapter (VeRA's frozen matrices, a prompt table), or None.

        It lives at :meth:`shared_path` and is read in the graph with :meth:`Emit.shared`. The base freeze
        leaves its parameters' ``requires_grad`` as the method set it; it goes with the adapter's last site,
        and files carry it through :meth:`shared_tensors` / :meth:`load_shared_tensors`.
        """
        return None

    @staticmethod
    def shared_path(method: str, adapter_name: str) -> str:
        return f"fxpeft_shared_{method}_{adapter_name}".replace(".", "_")

    @classmethod
    def shared_shapes(cls, config: Any, sites: list[Site]) -> dict[str, tuple[int, ...]]:
        """The file's tensors for the shared state: full key (``base_model.vera_A``) -> shape."""
        return {}

    @classmethod
    def shared_tensors(cls, shared: nn.Module) -> dict[str, torch.Tensor]:
        """The shared state's tensors for a file, under the keys of :meth:`shared_shapes`."""
        return {}

    @classmethod
    def load_shared_tensors(cls, shared: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checked tensors (keys and shapes of :meth:`shared_shapes`) into the shared state."""

    @classmethod
    def build(cls, site: Site, config: Any, adapter_name: str, weight: torch.Tensor) -> AdapterModule:
        """Create the adapter submodule for one site (no graph change)."""
        raise NotImplementedError

    @classmethod
    def base_update(cls, adapter: AdapterModule, site: Site) -> torch.Tensor | None:
        """The value the site's base weight takes when this adapter goes in, or None (the default: unchanged).

        For inits that move part of the weight into the adapter (PiSSA, OLoRA: the base keeps the residual).
        :meth:`build` computes it; the inject pass writes it inside its transaction, after every check, so a
        failed rewrite leaves the weight as it was. Called once per built adapter.
        """
        return None

    @classmethod
    def initial_site_tensors(cls, adapter: AdapterModule, site: Site) -> dict[str, torch.Tensor] | None:
        """The adapter's file tensors as they were initialised, where its init changed the base weight (the
        record :meth:`convert_to_original_base` needs); None where it did not."""
        return None

    @classmethod
    def convert_to_original_base(cls, config: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]],
                                 initial: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, Any],
                                                                                      dict[str, dict[str, torch.Tensor]]]:
        """A file (config fields, per-site tensors by key suffix) rewritten to apply to the *original* base weights,
        given the tensors as initialised (PEFT's ``path_initial_model_for_weight_conversion``). Must not mutate its
        arguments.

        Raises:
            AdapterFileError: the method has no such conversion (the default).
        """
        raise AdapterFileError(f"{cls.display_name or cls.name} adapters have no conversion to the original base "
                               "weights; save them as they are")

    @classmethod
    def insert(cls, emit: Emit, site: Site, adapter: AdapterModule) -> None:
        """Insert the adapter's nodes at ``emit.call``.

        Exactly one node per call is tagged ``Role.OUT`` with ``replaces=i``: it stands for ``args[i]`` (the
        call's output, input or weight). Nodes between it and that value carry ``replaces`` too. Use
        :meth:`Emit.replace_output` or :meth:`Emit.replace_input` to wire it in.
        """
        raise NotImplementedError

    @classmethod
    def insert_mixed(cls, emit: Emit, site: Site, slots: list[AdapterModule | None]) -> None:
        """Insert a mixed-batch form at ``emit.call``: batch row ``b`` gets the adapter ``slots[emit.index[b]]``
        (None: no adapter of this method at this site, the base output). Its cost should not grow with
        ``len(slots)``: gather each row's parameters rather than looping over adapters. Wire the result in with
        :meth:`Emit.replace_output` (tagged ``Role.OUT``, ``replaces=0``).
        """
        raise UnsupportedSiteError(f"{cls.display_name or cls.name} adapters have no mixed-batch form; "
                                   "serve one adapter per batch (fxpeft.set_adapter) or merge it")

    @classmethod
    def fold(cls, adapter: AdapterModule, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        """Fold the adapter into fp32 copies of the base weight/bias; return ``(weight, bias)``."""
        raise NotImplementedError

    @classmethod
    def unfold(cls, adapter: AdapterModule, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        """The inverse of :meth:`fold` (for unmerge); return ``(weight, bias)``."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- file format
    @classmethod
    def site_tensors(cls, adapter: AdapterModule, site: Site) -> dict[str, torch.Tensor]:
        """The adapter's tensors in PEFT's layout, keyed by PEFT's key suffix (``lora_A.weight``)."""
        raise NotImplementedError

    @classmethod
    def file_names(cls, gm: fx.GraphModule, sites: list[Site]) -> dict[str, str]:
        """The module path each site's tensors sit under in a file (``base_model.model.<path>.<key>``), given every
        site the file adapts: the site's name by default. A method whose format places a site elsewhere (PEFT nests
        the wrappers of several parameters of one module: ``<module>.base_layer.<key>``) overrides it; the paths
        must be distinct."""
        return {s.name: s.name for s in sites}

    @classmethod
    def site_shapes(cls, config: Any, site: Site) -> dict[str, tuple[int, ...]]:
        """The tensors a PEFT file holds for ``site`` under ``config``: key suffix -> shape."""
        raise NotImplementedError

    @classmethod
    def load_site_tensors(cls, adapter: AdapterModule, site: Site, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checked PEFT-layout tensors into the adapter (shapes already match :meth:`site_shapes`)."""
        raise NotImplementedError

    @classmethod
    def prepare_swap(cls, adapter: AdapterModule, site: Site, capacity: int | None) -> None:
        """Make room, in place, for later :meth:`swap_in` of files up to ``capacity`` (a rank, for low-rank
        methods). May change parameter shapes (the caller regenerates the code); must not change outputs."""

    @classmethod
    def swap_in(cls, adapter: AdapterModule, site: Site, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the adapter's weights and settings in place from a file's (checked) tensors and config,
        without changing any shape: the graph's code, and a compiled graph, stay as they are.

        Raises:
            AdapterFileError: the file does not fit the room the adapter has (say, a larger rank).
        """
        raise AdapterFileError(f"{cls.display_name or cls.name} adapters cannot be hot-swapped")

    @classmethod
    def site_settings(cls, config: Any, site: Site) -> dict[str, Any]:
        """The per-site hyper-parameters ``config`` gives ``site`` (compared on save, so a file reloads exactly)."""
        return {}

    @classmethod
    def adapter_settings(cls, adapter: AdapterModule) -> dict[str, Any]:
        """The same hyper-parameters, read off a built adapter."""
        return {}

    @classmethod
    def target_partition(cls, adapter: AdapterModule) -> Any:
        """A value that ``target_modules`` keys must not mix (IA3: feed-forward or not); default: one class."""
        return True

    @classmethod
    def config_fields(cls, adapters: dict[str, AdapterModule], sites: dict[str, Site], keys_for,
                      target_modules: list[str]) -> dict[str, Any]:
        """The method's ``adapter_config.json`` fields for these adapters (beyond ``target_modules``).

        ``keys_for(values: dict[site, value], default)`` returns PEFT pattern keys that select exactly the
        sites whose value is not ``default`` (for ``rank_pattern``-style fields). ``target_modules`` is the
        list io writes (each key selects sites of one :meth:`target_partition`).
        """
        return {}

    @classmethod
    def differs_in_peft(cls, site: Site) -> str | None:
        """Why PEFT would apply this site's adapter differently from the same file, or None."""
        return None

    @classmethod
    def refused_keys(cls) -> dict[str, str]:
        """Tensor-key suffixes of PEFT features the method does not implement: suffix -> feature."""
        return {}

    @classmethod
    def config_from_peft(cls, fields: dict[str, Any]) -> Any:
        """Build the config from PEFT's ``adapter_config.json`` fields (untrusted): typed errors name the field.

        The default accepts the config's own fields and :attr:`peft_fields`, refuses any other field that is
        set, and checks each value's type against the dataclass annotation.
        """
        return config_from_fields(cls, fields)

    # ---------------------------------------------------------------------------------------- weighted merges
    @classmethod
    def combine(cls, sources: list[dict[str, AdapterModule]], weights: list[float], combination: Any,
                sites: dict[str, Site]) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
        """Plan a weighted combination of this method's adapters (:func:`fxpeft.add_weighted_adapter`).

        Args:
            sources: per combined adapter (in the caller's order), its adapter modules by site name.
            weights: one weight per source.
            combination: the validated request (a :class:`fxpeft.combine.Combination`: the type, its options, and
                the generic tensor maths: ``merge``, ``low_rank``).
            sites: every site some source adapts (the new adapter's sites), in the graph's order.

        Returns:
            ``(config, tensors)``: the new adapter's config (its ``target_modules`` is replaced by exactly
            ``sites``), and per site the tensors :meth:`load_site_tensors` copies in. Must change nothing.

        Raises:
            ConfigError: the method has no weighted merges (the default), or the adapters cannot be combined so.
        """
        raise ConfigError(f"method {cls.display_name or cls.name} does not support weighted merges "
                          "(add_weighted_adapter); combine adapters of a method that implements Method.combine")


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a dataclass field annotation written as a string (``from __future__``)."""
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
              "None": lambda v: v is None,
              "list[str]": lambda v: isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v),
              "list[int]": lambda v: isinstance(v, (list, tuple, set)) and all(
                  isinstance(x, int) and not isinstance(x, bool) for x in v),
              "dict[str, int]": lambda v: isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                         for x in v.values()),
              "dict[str, float]": lambda v: isinstance(v, dict) and all(
                  isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v.values())}
    return any(checks.get(part.strip(), lambda v: True)(value) for part in annotation.split("|"))


def is_unset(value: Any) -> bool:
    """PEFT's "not used" values for a config field: None, False, or an empty list/dict/string (``0`` is a value)."""
    return value is None or value is False or (isinstance(value, (list, tuple, dict, str, set)) and not value)


def config_from_fields(method: type[Method], fields: dict[str, Any]) -> Any:
    """Check PEFT config fields against ``method.config_cls`` and build it (the default ``config_from_peft``)."""
    own = {f.name: f for f in dataclasses.fields(method.config_cls)}
    known = set(own) | set(method.peft_fields) | _PEFT_COMMON
    unknown = {k: v for k, v in fields.items() if k not in known and not is_unset(v)}
    if unknown:
        k, v = next(iter(unknown.items()))
        raise AdapterFileError(f"the adapter sets {k}={v!r}, a {method.display_name or method.name} feature fxpeft "
                               "does not implement" + (f" (also set: {sorted(unknown)[1:]})" if len(unknown) > 1 else ""))
    kwargs = {}
    for name, f in own.items():
        if name not in fields or fields[name] is None and "None" not in str(f.type):
            continue
        value = fields[name]
        if not _type_ok(value, str(f.type)):
            raise AdapterFileError(f"adapter_config.json: {name}={value!r} is not a valid {f.type}; fix the field "
                                   "or re-save the adapter")
        kwargs[name] = sorted(value) if isinstance(value, (set, frozenset)) else value
    try:
        from .targeting import check_fields

        config = method.config_cls(**kwargs)
        method.validate_config(config)
        check_fields(config)  # layers_to_transform, modules_to_save, task_type: every method's
    except ConfigError as e:
        raise AdapterFileError(f"adapter_config.json: {e}") from None
    return config


# Fields of every PEFT config that do not change what an adapter computes.
_PEFT_COMMON = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                          "auto_mapping", "peft_version", "fan_in_fan_out", "layers_pattern"})


class PeftRegistry:
    """Maps method names to :class:`Method` classes (each method file registers itself on import).

    Example:
        >>> from fxpeft import PeftRegistry, LoraConfig
        >>> PeftRegistry.for_config(LoraConfig(target_modules=["q"])).display_name
        'LoRA'
    """

    _methods: ClassVar[dict[str, type[Method]]] = {}

    @classmethod
    def register(cls, name: str):
        """Class decorator registering a :class:`Method` under ``name`` (its ``peft_type`` is ``name.upper()``)."""
        def deco(method: type[Method]) -> type[Method]:
            if name in cls._methods and cls._methods[name] is not method:
                raise ConfigError(f"method {name!r} is already registered; pick another name")
            method.name = name
            method.display_name = method.display_name or name.upper()
            method.config_cls.peft_type = name.upper()
            cls._methods[name] = method
            return method

        return deco

    @classmethod
    def unregister(cls, name: str) -> None:
        """Remove a registered method (for tests and notebooks that redefine one)."""
        cls._methods.pop(name, None)

    @classmethod
    def get(cls, name: str) -> type[Method]:
        try:
            return cls._methods[str(name).lower()]
        except KeyError:
            raise ConfigError(f"unknown PEFT method {name!r}; registered: {sorted(cls._methods)}") from None

    @classmethod
    def for_config(cls, config: Any) -> type[Method]:
        for method in cls._methods.values():
            if isinstance(config, method.config_cls):
                return method
        raise ConfigError(
            f"{type(config).__name__} is not a registered method config; use one of "
            f"{[m.config_cls.__name__ for m in cls._methods.values()]}"
        )

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._methods)

    @classmethod
    def methods(cls) -> list[type[Method]]:
        return [cls._methods[n] for n in sorted(cls._methods)]
