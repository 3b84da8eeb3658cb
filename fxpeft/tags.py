"""The graph contract: everything fxpeft stores on a graph, as typed records, in one place.

* on each node fxpeft inserts: an :class:`AdapterTag` under ``node.meta[TAG_KEY]``;
* on the GraphModule: a :class:`GraphInfo` under ``gm.meta[INFO_KEY]`` (how it was traced, what was
  specialised, which parameters fxpeft froze).

Passes find adapters through these records (and through the :class:`fxpeft.AdapterModule` type), never by
matching attribute or node names.

Example:
    >>> import torch, fxpeft
    >>> from fxpeft.tags import Role, get_tag
    >>> gm = fxpeft.rewrite(fxpeft.trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
    ...                     fxpeft.LoraConfig(r=2, target_modules=["0"]))
    >>> sorted({get_tag(n).role.name for n in gm.graph.nodes if get_tag(n)})[:3]
    ['DOWN', 'DOWN_WEIGHT', 'OUT']
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from torch import fx

__all__ = ["TAG_KEY", "INFO_KEY", "Role", "AdapterTag", "PendingBuild", "GraphInfo", "get_tag", "set_tag", "tag_dict", "graph_info",
           "set_graph_info"]

#: ``node.meta`` key of an inserted node's :class:`AdapterTag`.
TAG_KEY = "fxpeft"
#: ``gm.meta`` key of the graph's :class:`GraphInfo`.
INFO_KEY = "fxpeft"


class Role(enum.Enum):
    """What an inserted node does. Generic over methods: passes (fusion, removal, drawing) read roles.

    ``OUT`` is the one node per call whose ``args[tag.replaces]`` is the base value it stands in for (the
    site's output, its input, or its weight); removal and merge reconnect its users to that value.
    """

    PARAM = "param"            # get_attr of a method parameter or buffer (a vector, a table)
    DOWN_WEIGHT = "down_weight"  # a low-rank down projection's weight: a get_attr (LoRA A), or a slice of shared state
    UP_WEIGHT = "up_weight"      # get_attr of a low-rank up projection (LoRA B)
    SCALING = "scaling"          # get_attr of the run-time scaling buffer (0 while the adapter is off)
    BASE_WEIGHT = "base_weight"  # get_attr of the site's own weight, read by the method
    BASE_BIAS = "base_bias"      # get_attr of the site's own bias, read by the method
    DROPOUT = "dropout"          # call_module on the adapter's dropout
    CAST = "cast"                # dtype cast around an adapter kept in another dtype than the base
    DOWN = "down"                # x @ A.T (or the conv / embedding equivalent)
    SCALE = "scale"              # multiply by the scaling
    UP = "up"                    # @ B.T
    DOWN_CAT = "down_cat"        # fusion: cat of sibling A matrices
    DOWN_SPLIT = "down_split"    # fusion: split of the fused down projection
    DOWN_PART = "down_part"      # fusion: one site's slice of the split
    MAGNITUDE = "magnitude"      # get_attr of a trained magnitude vector (DoRA's m)
    NORM_TERM = "norm_term"      # a step of a weight norm computed in factored form
    WEIGHT_NORM = "weight_norm"  # the (detached) norm of the adapted weight per output (DoRA's ||W + s·BA||)
    MAGNITUDE_SCALE = "magnitude_scale"  # magnitude / weight norm per output (1 while the adapter is off)
    GATE = "gate"                # get_attr of the adapter's run-time on/off buffer
    COMPUTE = "compute"          # any other step of a method's subgraph
    OUT = "out"                  # the value that replaces a base value (see the class docstring)


@dataclass(frozen=True)
class AdapterTag:
    """The record on every node fxpeft inserts.

    Attributes:
        method: registered method name.
        adapter: adapter name (one site can hold several).
        site: the site the node belongs to.
        module: path of the adapter submodule holding the parameters.
        role: what the node does.
        replaces: for ``Role.OUT``, the position in ``node.args`` of the base value it stands in for.
        fused: for nodes shared by a fused group of sites, the adapter modules of the whole group.
    """

    method: str
    adapter: str
    site: str
    module: str
    role: Role
    replaces: int | None = None
    fused: tuple[str, ...] = ()

    def with_role(self, role: Role, **changes) -> AdapterTag:
        if not changes.keys() <= self.__dataclass_fields__.keys():
            return replace(self, role=role, **changes)  # raises the TypeError naming the unknown field
        # One call per inserted node: a copy of the (plain data) fields is cheaper than replace()'s __init__ call.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__, role=role, **changes)
        return new


@dataclass(frozen=True)
class PendingBuild:
    """An adapter rewritten onto base weights still on the meta device: what :func:`fxpeft.load_weights` needs to
    build its real initial values once the base weights are in, exactly as a rewrite of the loaded graph would.

    Attributes:
        method: registered method name.
        adapter: adapter name.
        config: the config as the rewrite used it (defaults filled in, validated).
        sites: ``(site name, adapter module path)`` of each adapted site, in build order.
        rng: the CPU RNG state (``torch.random.get_rng_state()`` as bytes) when the rewrite began building.
        rng_after: the CPU RNG state when it finished (a later record starting from it drew nothing in between).
    """

    method: str
    adapter: str
    config: object
    sites: tuple[tuple[str, str], ...]
    rng: bytes
    rng_after: bytes


@dataclass
class GraphInfo:
    """What :func:`fxpeft.trace` recorded about a graph, and what later passes need to undo their work.

    Attributes:
        dialect: ``"export"`` (``torch.export`` → ``ep.module()``, aten ops) or ``"fx"`` (``symbolic_trace``).
        model_type: the HF ``config.model_type``, or None.
        model_class: the traced model's class name.
        output_head: the HF output embedding's module path ("" when it has none); None for non-HF models.
        input_embedding: the HF input embedding's module path (``get_input_embeddings``); None for non-HF models.
        is_transformers: the model is a transformers ``PreTrainedModel`` (PEFT's ``all-linear`` rule).
        dynamic_dims: ``{input: [dims]}`` traced as dynamic.
        specialized: ``{"input dim": why}`` dims fixed at trace time (a size-1 example dim, a model constraint).
        frozen: ``requires_grad`` of each base parameter before fxpeft first froze the base, to restore it.
        generation: counts the fxpeft edits committed to the graph (every transaction): what was built from
            the graph (a mixed-batch graph) is rebuilt when it changes.
        adapter_table: in a mixed-batch graph (:func:`fxpeft.mixed_batch`), the adapter name of each row index
            value (``"__base__"`` for none); None in other graphs.
        inputs: forward keywords fxpeft added for adapters to read (:mod:`fxpeft.inputs`), in the order added.
        pending_builds: adapters built on meta base weights, in the order added, whose initial values
            :func:`fxpeft.load_weights` computes after loading the base (:class:`PendingBuild`).
    """

    dialect: str = "fx"
    model_type: str | None = None
    model_class: str | None = None
    output_head: str | None = None
    input_embedding: str | None = None
    is_transformers: bool = False
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    specialized: dict[str, str] = field(default_factory=dict)
    frozen: dict[str, bool] | None = None
    generation: int = 0
    adapter_table: tuple[str, ...] | None = None
    inputs: tuple[str, ...] = ()
    pending_builds: tuple[PendingBuild, ...] = ()


def get_tag(node: fx.Node) -> AdapterTag | None:
    """The node's :class:`AdapterTag`, or None for a base-model node."""
    tag = node.meta.get(TAG_KEY)
    return tag if isinstance(tag, AdapterTag) else None


def tag_dict(tag: AdapterTag) -> dict:
    """The tag as plain data (``role`` as its string value): for views that hold no fxpeft objects."""
    return {"method": tag.method, "adapter": tag.adapter, "site": tag.site, "module": tag.module,
            "role": tag.role.value, "replaces": tag.replaces, "fused": tag.fused}


def set_tag(node: fx.Node, tag: AdapterTag) -> fx.Node:
    node.meta[TAG_KEY] = tag
    return node


def graph_info(gm: fx.GraphModule) -> GraphInfo:
    """The graph's :class:`GraphInfo` (a default one, dialect read off the ops, for a graph fxpeft did not trace)."""
    meta = getattr(gm, "meta", None)
    info = meta.get(INFO_KEY) if isinstance(meta, dict) else None
    if isinstance(info, GraphInfo):
        return info
    import torch

    export = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    return GraphInfo(dialect="export" if export else "fx")


def set_graph_info(gm: fx.GraphModule, info: GraphInfo) -> None:
    if not isinstance(getattr(gm, "meta", None), dict):
        gm.meta = {}
    gm.meta[INFO_KEY] = info
