"""The visualiser (fxpeft.draw / fxpeft.viz.to_dot) and the networkx view (fxpeft.to_networkx)."""

from __future__ import annotations

import copy
import re
import shutil
import sys
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
import torch
from torch import nn

import fxpeft
from fxpeft.graph import NODE_ATTRS, sites_sharing_input
from fxpeft.tags import get_tag
from fxpeft.viz import _ADDED, _REMOVED, to_dot
from fxpeft.zoo import cnn, tiny_llama

LORA_FILL = fxpeft.PeftRegistry.get("lora").color[0]
IA3_FILL = fxpeft.PeftRegistry.get("ia3").color[0]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")

_NODE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" \[(.*)\]$')
_EDGE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)"(?: \[(.*)\])?$')
_CLUSTER = re.compile(r'^\s*subgraph "cluster_((?:[^"\\]|\\.)*)" \{$')


def parse_dot(src: str) -> tuple[dict[str, dict], list[tuple[str, str, str]], set[str]]:
    """The DOT text fxpeft writes -> ({node id: {"attrs", "clusters"}}, [(src, dst, attrs)], cluster paths)."""
    nodes, edges, clusters, stack = {}, [], set(), []
    for line in src.splitlines():
        if m := _CLUSTER.match(line):
            stack.append(m.group(1))
            clusters.add(m.group(1))
        elif line.strip() == "}" and stack:
            stack.pop()
        elif m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2), m.group(3) or ""))
        elif m := _NODE.match(line):
            nodes[m.group(1)] = {"attrs": m.group(2), "clusters": list(stack)}
    assert not stack, "unbalanced clusters"
    return nodes, edges, clusters


def adapter_tags(gm) -> dict[str, fxpeft.AdapterTag]:
    """Node name -> its AdapterTag, read off the graph (independent of the networkx view the drawing uses)."""
    return {n.name: get_tag(n) for n in gm.graph.nodes if get_tag(n) is not None}


def title(attrs: str) -> str | None:
    """The bold title of a node's HTML label (``LoRA A``), unescaped."""
    m = re.search(r"label=<<b>(.*?)</b>", attrs)
    return m and m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def fill(attrs: str) -> str | None:
    m = re.search(r'fillcolor="([^"]+)"', attrs)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def llama():
    """A traced 2-layer tiny Llama, its pre-rewrite snapshot, and the LoRA-rewritten graph (q/k/v/o, r=8)."""
    ex = tiny_llama(layers=2)
    gm = fxpeft.trace(ex.model, ex.args, ex.kwargs)
    before = fxpeft.to_networkx(gm)
    gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return before, gm


def _cnn_lora(export: bool = True, method: str = "lora"):
    ex = cnn()
    gm = fxpeft.trace(ex.model, ex.args) if export else fxpeft.trace(ex.model)
    before = fxpeft.to_networkx(gm)
    config = (fxpeft.LoraConfig(r=4, target_modules=["conv1", "conv2", "fc"]) if method == "lora"
              else fxpeft.IA3Config(target_modules=["conv1", "fc"], feedforward_modules=["fc"]))
    return before, fxpeft.rewrite(gm, config)


# ---------------------------------------------------------------------------------------------------------
# to_networkx
# ---------------------------------------------------------------------------------------------------------


def test_networkx_view_has_one_node_per_fx_node_and_is_a_dag(llama):
    _, gm = llama
    g = fxpeft.to_networkx(gm)
    assert set(g) == {n.name for n in gm.graph.nodes}
    assert nx.is_directed_acyclic_graph(g)
    assert set(g.edges) == {(a.name, n.name) for n in gm.graph.nodes for a in n.all_input_nodes}
    for _, d in g.nodes(data=True):
        assert set(NODE_ATTRS) <= set(d)
    # Adapter tags are the nodes' own, and every adapted site shows up.
    tags = adapter_tags(gm)
    assert {k for k, d in g.nodes(data=True) if d["adapter"]} == set(tags)
    assert {d["adapter"]["site"] for _, d in g.nodes(data=True) if d["adapter"]} == {t.site for t in tags.values()}
    # The view's tag is the typed tag as plain values (the role as its string).
    for k, t in tags.items():
        d = g.nodes[k]["adapter"]
        assert (d["method"], d["site"], d["module"], d["role"]) == (t.method, t.site, t.module, t.role.value)
    assert g.graph["dialect"] == "export"


def test_networkx_view_owning_modules_and_shapes(llama):
    _, gm = llama
    g = fxpeft.to_networkx(gm)
    site = "model.layers.0.self_attn.q_proj"
    base = next(k for k, d in g.nodes(data=True) if d["site"] == site)
    d = g.nodes[base]
    assert d["module"] == site and d["module_class"] == "Linear"
    assert [p for p, _ in d["module_stack"]] == ["model", "model.layers.0", "model.layers.0.self_attn", site]
    assert d["shape"][-1] == 64 and d["dtype"] == "f32"
    # Nodes a pass inserted carry no recorded value; the view runs them on fake tensors to get a shape.
    lora_b = [k for k, t in ((k, d["adapter"]) for k, d in g.nodes(data=True)) if t and t["role"] == "up"
              and t["site"] == site]
    assert lora_b and g.nodes[lora_b[0]]["shape"][-1] == 64
    a_weight = next(k for k, d in g.nodes(data=True) if d["adapter"] and d["adapter"]["site"] == site
                    and d["op"] == "get_attr" and d["param_shape"][0] == 8)
    assert g.nodes[a_weight]["module_stack"][-1][0] == f"{site}.lora_default"
    # Symbolic dims are named after the inputs they come from.
    assert sorted(g.graph["dims"].values()) == ["input_ids.size(0)", "input_ids.size(1)"]


def test_networkx_view_is_a_snapshot():
    _, gm = _cnn_lora()
    g = fxpeft.to_networkx(gm)
    n_before = len(g)
    fxpeft.merge(gm)
    assert len(g) == n_before > len(gm.graph.nodes)
    assert any(d["adapter"] for _, d in g.nodes(data=True))


def test_networkx_view_of_a_symbolic_trace_graph_uses_module_targets():
    _, gm = _cnn_lora(export=False)
    g = fxpeft.to_networkx(gm)
    assert g.graph["dialect"] == "fx"
    assert g.nodes["conv1"]["op"] == "call_module" and g.nodes["conv1"]["module"] == "conv1"
    assert g.nodes["conv1"]["site"] == "conv1" and g.nodes["conv1"]["param_shape"] == (16, 3, 3, 3)
    out = next(k for k, d in g.nodes(data=True) if d["adapter"] and d["adapter"]["role"] == "out"
               and d["adapter"]["site"] == "conv1")
    assert g.nodes[out]["module_stack"][0] == ("conv1", "Conv2d")


def test_sites_sharing_input(llama):
    before, gm = llama
    for graph in (gm, before):  # on a graph module and on a view; adapters are never sites
        groups = sorted(sorted(s.rsplit(".", 1)[-1] for s in v) for v in sites_sharing_input(graph).values())
        assert groups == [["gate_proj", "up_proj"]] * 2 + [["k_proj", "q_proj", "v_proj"]] * 2


# ---------------------------------------------------------------------------------------------------------
# DOT: clusters, adapter colours, depth, folding, shapes
# ---------------------------------------------------------------------------------------------------------


def test_dot_has_module_clusters_and_coloured_adapter_nodes_for_every_adapted_site(llama):
    _, gm = llama
    nodes, edges, clusters = parse_dot(to_dot(gm, depth=99, fold_repeats=False))
    adapted = {t.site for t in adapter_tags(gm).values()}
    assert len(adapted) == 8
    assert {"model", "model.layers.0", "model.layers.1", "model.layers.0.self_attn"} <= clusters
    assert adapted <= clusters  # each adapted site is a cluster holding its base call and its adapter
    for site in adapted:
        inside = [n for n, d in nodes.items() if d["clusters"] and d["clusters"][-1] == site]
        coloured = [n for n in inside if fill(nodes[n]["attrs"]) == LORA_FILL]
        assert coloured, site
        # The site's name is on the adapter's "out" node.
        assert any("+ LoRA" in nodes[n]["attrs"] and site.rsplit(".", 1)[-1] in nodes[n]["attrs"] for n in coloured)
        # Nested: site cluster inside its attention block, inside its layer.
        assert nodes[inside[0]]["clusters"][:3] == ["model", site.rsplit(".", 2)[0], site.rsplit(".", 1)[0]]
    legend = nodes["legend"]["attrs"]
    assert LORA_FILL in legend and "LoRA adapter node" in legend
    # Un-adapted projections are drawn as plain nodes, not adapter-coloured.
    k_mlp = [n for n, d in nodes.items() if "gate_proj" in d["attrs"]]
    assert k_mlp and all(fill(nodes[n]["attrs"]) != LORA_FILL for n in k_mlp)


def test_edges_carry_shapes_including_the_lora_rank(llama):
    _, gm = llama
    nodes, edges, _ = parse_dot(to_dot(gm, depth=99))
    into_b = [a for s, d, a in edges if "LoRA B" in nodes.get(d, {}).get("attrs", "")]
    assert into_b and all(re.search(r'label="[^"]*×8"', a) for a in into_b)  # [batch, seq, r]
    assert any(re.search(r'label="s\d+×s\d+×256"', a) for s, d, a in edges if d == "output")  # logits
    assert "input_ids.size(0)" in nodes["legend"]["attrs"]
    assert not any("label=" in a for _, _, a in parse_dot(to_dot(gm, depth=99, shapes=False))[1])


def test_repeated_layers_are_drawn_once_with_a_count(llama):
    _, gm = llama
    folded = to_dot(gm, depth=99)
    nodes, _, clusters = parse_dot(folded)
    assert "model.layers.0" in clusters and "model.layers.1" not in clusters
    assert "×2" in folded and "2 identical blocks" in folded
    assert not any(n.startswith("model_layers_1_") for n in nodes)
    unfolded_nodes, _, unfolded_clusters = parse_dot(to_dot(gm, depth=99, fold_repeats=False))
    assert "model.layers.1" in unfolded_clusters
    assert len(unfolded_nodes) > len(nodes)


def test_depth_collapses_clusters_into_boxes_with_adapter_badges(llama):
    _, gm = llama
    top, _, clusters0 = parse_dot(to_dot(gm, depth=0))
    assert not clusters0
    model_box = top["box:model"]["attrs"]
    assert "LoRA ×8" in model_box and "LlamaModel" in model_box  # both layers' adapters, though drawn once
    one, _, clusters1 = parse_dot(to_dot(gm, depth=1))
    assert clusters1 == {"model"}
    assert "LoRA ×4 each" in one["box:model.layers.0"]["attrs"] and "×2" in one["box:model.layers.0"]["attrs"]
    two, _, _ = parse_dot(to_dot(gm, depth=2))
    assert "LoRA ×4" in two["box:model.layers.0.self_attn"]["attrs"]
    assert "LoRA" not in two["box:model.layers.0.mlp"]["attrs"]
    assert len(top) < len(one) < len(two)


def test_default_depth_opens_what_the_adapters_touch(llama):
    _, gm = llama
    nodes, _, clusters = parse_dot(to_dot(gm))
    assert "model.layers.0.self_attn.q_proj" in clusters  # adapters: open down to the site
    assert "box:model.layers.0.mlp" in nodes  # no adapter inside: one box
    assert any(fill(d["attrs"]) == LORA_FILL for d in nodes.values())


def test_compact_hides_parameter_reads_and_views_but_full_draws_them(llama):
    _, gm = llama
    compact, _, _ = parse_dot(to_dot(gm, depth=99, fold_repeats=False))
    full, _, _ = parse_dot(to_dot(gm, depth=99, fold_repeats=False, compact=False))
    params = [n.name for n in gm.graph.nodes if n.op == "get_attr" and n.name.endswith("q_proj_weight")]
    assert params and all(p in full and p not in compact for p in params)
    views = [n.name for n in gm.graph.nodes if n.op == "call_function" and "view" in str(n.target)]
    assert views and all(v in full and v not in compact for v in views)
    # Every FX node but torch.export's guard and subgraph holders is drawn in full mode.
    assert len(full) - 1 >= len(gm.graph.nodes) - 3


def test_ia3_has_its_own_colour_and_legend_entry():
    _, gm = _cnn_lora(method="ia3")
    nodes, _, clusters = parse_dot(to_dot(gm))
    ia3 = [n for n, d in nodes.items() if fill(d["attrs"]) == IA3_FILL]
    assert {"conv1", "fc"} <= clusters
    # Per site: the gated vector (a compute step) and the product that replaces the base value.
    assert sorted(title(nodes[n]["attrs"]) for n in ia3) == ["+ IA3", "+ IA3", "IA3 compute", "IA3 compute"]
    assert "IA3 adapter node" in nodes["legend"]["attrs"] and "LoRA adapter node" not in nodes["legend"]["attrs"]


def test_adapter_nodes_are_titled_by_role_in_the_methods_words():
    ex = tiny_llama(layers=1)
    config = fxpeft.LoraConfig(r=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    fused = fxpeft.rewrite(fxpeft.trace(ex.model, ex.args, ex.kwargs), config)
    per_site = fxpeft.rewrite(fxpeft.trace(ex.model, ex.args, ex.kwargs), config, fuse=False)
    titles = {}
    for key, gm in (("fused", fused), ("per_site", per_site)):
        nodes, _, _ = parse_dot(to_dot(gm, depth=99))
        titles[key] = sorted(title(d["attrs"]) for d in nodes.values() if fill(d["attrs"]) == LORA_FILL)
    # Four sites: one chain each, or q/k/v sharing one dropout and one concatenated A, split per site.
    assert titles["per_site"] == sorted(["+ LoRA", "LoRA A", "LoRA B", "× scaling", "dropout"] * 4)
    assert titles["fused"] == sorted(["+ LoRA", "LoRA B", "× scaling"] * 4 + ["LoRA A part"] * 3 + [
        "LoRA A cat", "LoRA A split", "LoRA A", "LoRA A", "dropout", "dropout"])


def test_method_colours_and_names_come_from_the_registry(monkeypatch):
    _, gm = _cnn_lora()
    lora = fxpeft.PeftRegistry.get("lora")
    monkeypatch.setattr(lora, "display_name", "Lo-Ra")
    monkeypatch.setattr(lora, "color", ("#010203", "#040506"))
    src = to_dot(gm, depth=99)
    nodes, edges, _ = parse_dot(src)
    drawn = [d["attrs"] for d in nodes.values() if fill(d["attrs"]) == "#010203"]
    assert sorted({title(a) for a in drawn}) == ["+ Lo-Ra", "Lo-Ra A", "Lo-Ra B", "× scaling"]
    assert all('color="#040506"' in a for a in drawn)
    assert any('color="#040506"' in a for _, _, a in edges)  # data flowing through the adapter
    assert "Lo-Ra adapter node" in nodes["legend"]["attrs"] and "Lo-Ra on 3 sites" in src
    assert LORA_FILL not in src and "LoRA" not in src


def test_symbolic_trace_graph_clusters_by_module_target():
    _, gm = _cnn_lora(export=False)
    nodes, _, clusters = parse_dot(to_dot(gm))
    assert {"conv1", "conv2", "fc"} <= clusters
    assert nodes["conv1"]["clusters"] == ["conv1"] and "Conv2d" in nodes["conv1"]["attrs"]
    assert nodes["conv1_out"]["clusters"] == ["conv1"] and fill(nodes["conv1_out"]["attrs"]) == LORA_FILL
    assert "conv3" in nodes and nodes["conv3"]["clusters"] == []  # one node, no cluster of its own


def test_runs_of_blocks_fold_in_a_deep_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    model = nn.Sequential(*[Block() for _ in range(16)])
    gm = fxpeft.rewrite(fxpeft.trace(model, (torch.randn(2, 16),)), fxpeft.LoraConfig(r=4, target_modules=["up"]))
    src = to_dot(gm)
    nodes, _, clusters = parse_dot(src)
    assert "0" in clusters and "1" not in clusters and "×16" in src
    assert sum(fill(d["attrs"]) == LORA_FILL for d in nodes.values()) < 10  # one block's adapter, not 16
    # Folding is what keeps the picture small (its speed is measured in tools/, not asserted here).
    unfolded_src = to_dot(gm, fold_repeats=False)
    unfolded, _, unfolded_clusters = parse_dot(unfolded_src)
    assert {str(i) for i in range(16)} <= unfolded_clusters
    assert sum(fill(d["attrs"]) == LORA_FILL for d in unfolded.values()) >= 16
    assert len(nodes) < len(unfolded) and len(src) < len(unfolded_src)


# ---------------------------------------------------------------------------------------------------------
# diff mode
# ---------------------------------------------------------------------------------------------------------


def test_diff_marks_the_nodes_a_rewrite_added(llama):
    before, gm = llama
    nodes, edges, _ = parse_dot(to_dot(gm, before=before, depth=99, fold_repeats=False))
    added = {n for n, d in nodes.items() if _ADDED in d["attrs"] and n != "legend"}
    removed = {n for n, d in nodes.items() if _REMOVED in d["attrs"] and n != "legend"}
    drawn_adapters = {n for n, d in nodes.items() if fill(d["attrs"]) == LORA_FILL}
    assert drawn_adapters and added == drawn_adapters
    assert not removed
    assert any(_ADDED in a for _, _, a in edges)
    # The base projection's output used to go straight on: that edge is drawn as removed (re-routed).
    assert any(_REMOVED in a for _, _, a in edges)
    assert "+ added" in nodes["legend"]["attrs"]


def test_merge_diff_shows_the_adapters_folded_away():
    _, gm = _cnn_lora()
    adapter_nodes = {n.name for n in gm.graph.nodes if "fxpeft" in n.meta and n.op != "get_attr"}
    snap = fxpeft.to_networkx(gm)  # passes change gm in place: snapshot first
    deep = copy.deepcopy(gm)  # the other way to keep a "before"
    fxpeft.merge(gm)
    for before in (snap, deep):
        nodes, _, _ = parse_dot(to_dot(gm, before=before))
        removed = {n for n, d in nodes.items() if _REMOVED in d["attrs"] and "dashed" in d["attrs"] and n != "legend"}
        assert removed == adapter_nodes
        assert not any(_ADDED in d["attrs"] for n, d in nodes.items() if n != "legend")
        assert all(fill(nodes[n]["attrs"]) == LORA_FILL for n in removed)  # still shows what was removed


def test_before_must_be_a_snapshot(llama):
    _, gm = llama
    with pytest.raises(fxpeft.DrawError, match="to_networkx"):
        to_dot(gm, before=gm)
    with pytest.raises(fxpeft.DrawError, match="GraphModule"):
        to_dot(gm, before="not a graph")


# ---------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------


@needs_dot
def test_svg_parses_as_xml_and_png_is_a_png(llama, tmp_path):
    _, gm = llama
    out = fxpeft.draw(gm, tmp_path / "sub" / "g.svg")
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    titles = {t.text for t in root.iter("{http://www.w3.org/2000/svg}title")}
    assert "cluster_model.layers.0.self_attn.q_proj" in titles
    text = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "+ LoRA" in text and "q_proj" in text
    assert out.stat().st_size < 2_000_000
    png = fxpeft.draw(gm, tmp_path / "g.png", depth=1, dpi=40)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_dot_file_and_unknown_extension(tmp_path):
    _, gm = _cnn_lora()
    out = fxpeft.draw(gm, tmp_path / "g.dot")
    assert out.read_text().startswith("digraph")
    with pytest.raises(fxpeft.DrawError, match=r"\.svg"):
        fxpeft.draw(gm, tmp_path / "g.jpeg")
    with pytest.raises(fxpeft.DrawError, match="depth"):
        fxpeft.draw(gm, tmp_path / "g.dot", depth=-1)


def test_missing_graphviz_package_gives_a_typed_error_that_says_how_to_install(tmp_path, monkeypatch):
    from fxpeft.viz import GraphvizPackageNotFoundError

    _, gm = _cnn_lora()
    monkeypatch.setitem(sys.modules, "graphviz", None)  # `import graphviz` raises ImportError
    with pytest.raises(GraphvizPackageNotFoundError) as info:
        fxpeft.draw(gm, tmp_path / "g.svg")
    message = str(info.value)
    assert "pip install graphviz" in message and "apt-get install graphviz" in message
    assert isinstance(info.value, fxpeft.GraphvizNotFoundError) and isinstance(info.value, fxpeft.FxPeftError)
    assert info.value.dot_path == str(tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text().startswith("digraph") and not (tmp_path / "g.svg").exists()
    # A .dot needs neither the package nor the program.
    assert fxpeft.draw(gm, tmp_path / "h.dot").read_text().startswith("digraph")


def test_missing_graphviz_gives_a_clear_error_and_still_writes_the_dot(tmp_path, monkeypatch):
    _, gm = _cnn_lora()
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no `dot` anywhere
    with pytest.raises(fxpeft.GraphvizNotFoundError, match="apt-get install graphviz") as info:
        fxpeft.draw(gm, tmp_path / "g.svg")
    dot = tmp_path / "g.dot"
    assert info.value.dot_path == str(dot)
    assert dot.read_text().startswith("digraph") and "cluster_conv1" in dot.read_text()
    assert not (tmp_path / "g.svg").exists()
    assert isinstance(info.value, fxpeft.FxPeftError)
