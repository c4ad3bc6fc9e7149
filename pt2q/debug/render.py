"""A self-contained HTML page for a dump: the graph as inline SVG, a per-node table, the reports.

No network: no CDN, no fonts, no external script or style. The SVG comes from Graphviz `dot -Tsvg` when
`dot` is installed, otherwise from a small pure-Python layered layout. Both draw the same simplified
graph: constants (get_attr) are hidden, a weight's dequantize is folded into its layer (drawn with a
thick border), and a quantize followed by its dequantize(s) is one `q/dq` node.
"""
from __future__ import annotations

import html
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from .numeric import NumericRow
from .text import GraphSnapshot, NodeInfo

COLORS = {
    "int8": "#9be29b",      # compute reading dequantized (int8) values
    "fp32": "#dbe6f3",      # compute left in floating point
    "qdq": "#f7c873",       # quantize / dequantize / choose_qparams
    "observer": "#f3ea9b",  # observers and SmoothQuant channel recorders
    "sq": "#cdb0ef",        # SmoothQuant explicit x * (1/s)
    "io": "#ffffff",        # graph inputs and output
}
LEGEND = {
    "int8": "quantized (int8 inputs)", "fp32": "fp32", "qdq": "quantize / dequantize",
    "observer": "observer", "sq": "SmoothQuant mul", "io": "input / output",
}
_NODE_W, _NODE_H, _GAP_X, _GAP_Y = 200, 36, 28, 26


@dataclass
class DisplayNode:
    name: str
    label: str
    sublabel: str
    category: str
    tooltip: str
    weight_int8: bool = False
    members: list[str] = field(default_factory=list)


def display_graph(snap: GraphSnapshot) -> tuple[list[DisplayNode], list[tuple[str, str]]]:
    """Simplified view of a snapshot: (visible nodes in graph order, edges between them)."""
    nodes = {n.name: n for n in snap.nodes}
    users: dict[str, list[str]] = {n.name: [] for n in snap.nodes}
    for n in snap.nodes:
        for i in n.inputs:
            if i in users:
                users[i].append(n.name)
    alias: dict[str, str | None] = {}  # hidden -> None; folded -> the node that shows it

    def is_dequant(n: NodeInfo) -> bool:
        return n.category == "qdq" and n.short.startswith("dequantize")

    for n in snap.nodes:
        if n.category == "const":
            alias[n.name] = None
        elif n.op == "call_module" and n.category != "observer" and not users[n.name]:
            alias[n.name] = None  # e.g. torch.export's _guards_fn
        elif is_dequant(n) and n.inputs and all(nodes[i].category == "const" for i in n.inputs if i in nodes):
            alias[n.name] = None  # a weight's dequantize: shown as the layer's thick border
        elif is_dequant(n) and n.inputs and n.inputs[0] in nodes and nodes[n.inputs[0]].category == "qdq" \
                and nodes[n.inputs[0]].short.startswith("quantize"):
            alias[n.name] = n.inputs[0]
        elif n.short == "getitem" and n.inputs and n.inputs[0] in nodes and nodes[n.inputs[0]].category == "qdq":
            alias[n.name] = n.inputs[0]

    def resolve(name: str) -> str | None:
        seen = set()
        while name in alias and name not in seen:
            seen.add(name)
            target = alias[name]
            if target is None:
                return None
            name = target
        return name

    shown: dict[str, DisplayNode] = {}
    for n in snap.nodes:
        if n.name in alias:
            target = resolve(n.name)
            if target in shown:
                shown[target].members.append(n.name)
            continue
        if n.op == "output":
            label, sub = "output", ""
        elif n.op == "placeholder":
            label, sub = n.name, n.type_text
        elif n.category == "qdq" and n.short.startswith("quantize"):
            label, sub = _qdq_label(n.info)
        else:
            label, sub = n.name, f"{n.short} {n.type_text}".strip()
        weight = n.category == "int8" and n.info == "int8 weight"
        shown[n.name] = DisplayNode(n.name, label, sub, n.category, n.line, weight, [n.name])
    edges = []
    seen_edges = set()
    for n in snap.nodes:
        if n.name not in shown:
            continue
        for i in n.inputs:
            source = resolve(i)
            if source is None or source == n.name or source not in shown or (source, n.name) in seen_edges:
                continue
            seen_edges.add((source, n.name))
            edges.append((source, n.name))
    return list(shown.values()), edges


def _qdq_label(info: str) -> tuple[str, str]:
    match = re.search(r"^(\S+).*?scale=(\S+) zp=(\S+)", info)
    if match:
        return f"q/dq {match.group(1)}", f"s={match.group(2)} zp={match.group(3)}"
    return "q/dq", info


# -- pure-Python layered layout ----------------------------------------------------------------------
def layered_layout(names: list[str], edges: list[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Top-left corner of every node: longest-path layers (sources pulled down next to their first
    user), then a few barycenter sweeps to order each layer."""
    preds: dict[str, list[str]] = {n: [] for n in names}
    succs: dict[str, list[str]] = {n: [] for n in names}
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    layer: dict[str, int] = {}
    for n in names:  # graph order is topological
        layer[n] = 1 + max((layer[p] for p in preds[n]), default=-1)
    for n in names:
        if not preds[n] and succs[n]:
            layer[n] = max(0, min(layer[s] for s in succs[n]) - 1)
    depth = max(layer.values(), default=0) + 1
    rows: list[list[str]] = [[] for _ in range(depth)]
    for n in names:
        rows[layer[n]].append(n)
    position: dict[str, float] = {}

    def place(row):
        for i, n in enumerate(row):
            position[n] = i - (len(row) - 1) / 2

    for row in rows:
        place(row)
    for _ in range(3):
        for sweep, neighbours in ((range(1, depth), preds), (range(depth - 2, -1, -1), succs)):
            for index in sweep:
                row = rows[index]
                keys = {n: (sum(position[m] for m in neighbours[n]) / len(neighbours[n])
                            if neighbours[n] else position[n]) for n in row}
                row.sort(key=lambda n: keys[n])
                place(row)
    width = max((len(r) for r in rows), default=1)
    offset = (width - 1) / 2
    return {n: ((position[n] + offset) * (_NODE_W + _GAP_X) + _GAP_X,
                layer[n] * (_NODE_H + _GAP_Y) + _GAP_Y) for n in names}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def python_svg(nodes: list[DisplayNode], edges: list[tuple[str, str]]) -> str:
    pos = layered_layout([n.name for n in nodes], edges)
    width = max((x for x, _ in pos.values()), default=0) + _NODE_W + 2 * _GAP_X + _NODE_W
    height = max((y for _, y in pos.values()), default=0) + _NODE_H + _GAP_Y
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#777"/></marker></defs>',
           '<g class="edges" fill="none" stroke="#999" stroke-width="1">']
    for a, b in edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        sx, sy, tx, ty = x1 + _NODE_W / 2, y1 + _NODE_H, x2 + _NODE_W / 2, y2
        span = (y2 - y1) / (_NODE_H + _GAP_Y)
        bend = 0.0 if span <= 1.01 else _NODE_W * 0.6 + min(span, 40) * 2
        dy = max((ty - sy) * 0.35, 8)
        out.append(f'<path d="M{sx:.1f},{sy:.1f} C{sx + bend:.1f},{sy + dy:.1f} {tx + bend:.1f},{ty - dy:.1f} '
                   f'{tx:.1f},{ty:.1f}" marker-end="url(#arrow)"/>')
    out.append("</g>")
    for n in nodes:
        x, y = pos[n.name]
        stroke, stroke_width = ("#1b6e1b", 3) if n.weight_int8 else ("#555", 1)
        out.append(
            f'<g class="node cat-{n.category}" id="n_{html.escape(n.name)}">'
            f"<title>{html.escape(n.tooltip)}</title>"
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{_NODE_W}" height="{_NODE_H}" rx="5" '
            f'fill="{COLORS.get(n.category, "#eee")}" stroke="{stroke}" stroke-width="{stroke_width}"/>'
            f'<text x="{x + 6:.1f}" y="{y + 14:.1f}" font-weight="bold">{html.escape(_clip(n.label, 28))}</text>'
            f'<text x="{x + 6:.1f}" y="{y + 28:.1f}" fill="#333">{html.escape(_clip(n.sublabel, 30))}</text>'
            "</g>")
    out.append("</svg>")
    return "\n".join(out)


# -- Graphviz ------------------------------------------------------------------------------------------
def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def dot_source(nodes: list[DisplayNode], edges: list[tuple[str, str]]) -> str:
    lines = ["digraph G {", "  rankdir=TB; nodesep=0.25; ranksep=0.3;",
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10, height=0.3];',
             '  edge [color="#999999", arrowsize=0.6];']
    for n in nodes:
        border = ', penwidth=3, color="#1b6e1b"' if n.weight_int8 else ""
        label = _clip(n.label, 28) + ("\n" + _clip(n.sublabel, 30) if n.sublabel else "")
        fill = COLORS.get(n.category, "#eeeeee")
        lines.append(f"  {_dot_quote(n.name)} [id={_dot_quote('n_' + n.name)}, "
                     f"class={_dot_quote('cat-' + n.category)}, label={_dot_quote(label)}, "
                     f"fillcolor={_dot_quote(fill)}{border}];")
    for a, b in edges:
        lines.append(f"  {_dot_quote(a)} -> {_dot_quote(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_svg(nodes: list[DisplayNode], edges: list[tuple[str, str]], timeout: float = 120.0) -> str | None:
    """`dot -Tsvg` output reduced to the bare <svg> element (no XML prolog, DOCTYPE URL or xlink
    namespace), or None when dot is missing or fails."""
    dot = shutil.which("dot")
    if dot is None:
        return None
    try:
        done = subprocess.run([dot, "-Tsvg"], input=dot_source(nodes, edges), capture_output=True, text=True,
                              timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    svg = done.stdout
    start = svg.find("<svg")
    if start < 0:
        return None
    svg = re.sub(r"<!--.*?-->", "", svg[start:], flags=re.S)
    if "xlink:" not in svg.replace("xmlns:xlink", ""):
        svg = re.sub(r'\s+xmlns:xlink="[^"]*"', "", svg)
    # dot titles nodes with their id; give them the full text line instead.
    tips = {n.name: n.tooltip for n in nodes}
    svg = re.sub(r'(<g id="n_([A-Za-z0-9_]+)" class="[^"]*">\s*<title>)[^<]*(</title>)',
                 lambda m: m.group(1) + html.escape(tips.get(m.group(2), m.group(2))) + m.group(3), svg)
    return svg


def graph_svg(snap: GraphSnapshot, engine: str = "auto") -> tuple[str, str]:
    """(svg, engine used: 'dot' or 'python')."""
    nodes, edges = display_graph(snap)
    if engine in ("auto", "dot"):
        svg = dot_svg(nodes, edges)
        if svg is not None:
            return svg, "dot"
    return python_svg(nodes, edges), "python"


# -- the page ------------------------------------------------------------------------------------------
_STYLE = """
body{font-family:sans-serif;margin:1em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0} td.num{text-align:right;font-family:monospace}
.mono,pre{font-family:monospace;font-size:12px}
pre{background:#fafafa;border:1px solid #eee;padding:6px;overflow:auto;max-height:40em}
#graph{border:1px solid #ccc;overflow:auto;max-height:80vh;background:#fff}
#graph g.node{cursor:pointer}
#graph g.node.selected rect,#graph g.node.selected polygon,#graph g.node.selected path{stroke:#d00;stroke-width:4}
tr.selected td{background:#ffe9a8}
.legend span{display:inline-block;padding:2px 8px;margin-right:6px;border:1px solid #999;border-radius:4px}
.legend span{font-size:12px}
.bad{color:#b00;font-weight:bold} .add{color:#11661b} .del{color:#a31515} .hunk{color:#555;font-style:italic}
.error{background:#fdd;border:1px solid #d88;padding:8px}
"""

_SCRIPT = """
(function () {
  try {
    var rows = {};
    document.querySelectorAll('tr[data-node]').forEach(function (r) { rows[r.getAttribute('data-node')] = r; });
    function clear() {
      document.querySelectorAll('.selected').forEach(function (e) { e.classList.remove('selected'); });
    }
    function select(name, from) {
      clear();
      var row = rows[name], g = document.getElementById('n_' + name);
      if (row) { row.classList.add('selected'); if (from === 'graph') { row.scrollIntoView({block: 'center'}); } }
      if (g) {
        g.classList.add('selected');
        if (from === 'table') { g.scrollIntoView({block: 'center', inline: 'center'}); }
      }
    }
    var nodes = document.querySelectorAll('#graph g.node');
    nodes.forEach(function (g) {
      g.addEventListener('click', function () { select(g.id.slice(2), 'graph'); });
    });
    Object.keys(rows).forEach(function (name) {
      rows[name].addEventListener('click', function () { select(name, 'table'); });
    });
    var filter = document.getElementById('filter');
    if (filter) {
      filter.addEventListener('input', function () {
        var q = filter.value.toLowerCase();
        Object.keys(rows).forEach(function (name) {
          rows[name].style.display = rows[name].textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
        });
      });
    }
    var svg = document.querySelector('#graph svg');
    var box = svg ? svg.getBBox() : {width: 0, height: 0};
    document.body.setAttribute('data-svg-nodes', String(nodes.length));
    document.body.setAttribute('data-svg-width', String(Math.round(box.width)));
    document.body.setAttribute('data-rows', String(Object.keys(rows).length));
    document.body.setAttribute('data-ready', '1');
  } catch (e) {
    document.body.setAttribute('data-error', String(e));
  }
})();
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float, spec: str) -> str:
    if isinstance(value, str):
        return _esc(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def _diff_html(diff: str) -> str:
    out = []
    for line in diff.splitlines():
        cls = "hunk" if line.startswith("@@") else "add" if line.startswith("+") else \
            "del" if line.startswith("-") else ""
        out.append(f'<span class="{cls}">{_esc(line)}</span>' if cls else _esc(line))
    return "\n".join(out)


def _smooth_quant_notes(groups: list[dict]) -> dict[str, list[str]]:
    """node name (producer) or 'module:<fqn>' (consumer) -> SmoothQuant notes for the node table."""
    notes: dict[str, list[str]] = {}
    for g in groups:
        match = re.match(r"^[^:]+:(\S+)", g["producer"])
        alpha = "" if g["alpha"] is None else f" alpha {g['alpha']:.2f}"
        scale = g["scale"]
        scale_text = f", s in [{scale['min']:.4g}, {scale['max']:.4g}]" if scale else ""
        if g["status"] == "skipped":
            producer_note = f"SmoothQuant skipped (producer): {g['reason']}"
            consumer_note = f"SmoothQuant skipped: {g['reason']}"
        else:
            how = "absorbs 1/s" if g["status"] == "absorbed" else "output times 1/s by an explicit mul"
            producer_note = f"SmoothQuant producer ({g['status']}): {how}{alpha}{scale_text}"
            consumer_note = f"SmoothQuant consumer: weight input columns times s{alpha}{scale_text}"
        if match:
            notes.setdefault(match.group(1), []).append(producer_note)
        for consumer in g["consumers"]:
            notes.setdefault(f"module:{consumer}", []).append(consumer_note)
    return notes


def render_html(snapshots: list[GraphSnapshot], diffs: dict[str, str], *, numeric: list[NumericRow] = (),
                outputs: list[NumericRow] = (), smooth_quant: list[dict] = (), kernels: dict | None = None,
                error: str | None = None, title: str = "pt2q graph dump", engine: str = "auto",
                sqnr_warn_db: float = 20.0) -> str:
    graphs = [s for s in snapshots if s.is_graph]
    final = graphs[-1] if graphs else None
    by_node = {row.node: row for row in numeric}
    sq_notes = _smooth_quant_notes(smooth_quant)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_esc(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{_esc(title)}</h1>"]
    if error:
        parts.append(f'<p class="error">The pipeline failed: <span class="mono">{_esc(error)}</span>. '
                     "The stages before the failure are below.</p>")
    # -- summary: what a user reads first
    parts.append("<h2>Summary</h2><ul>")
    if final is not None:
        counts: dict[str, int] = {}
        for n in final.nodes:
            counts[n.category] = counts.get(n.category, 0) + 1
        parts.append(f"<li>final graph <b>{_esc(final.stem)}</b>: {len(final.nodes)} nodes; "
                     f"{counts.get('int8', 0)} quantized compute, {counts.get('fp32', 0)} fp32 compute, "
                     f"{counts.get('qdq', 0)} quantize/dequantize</li>")
    for row in outputs:
        parts.append(f"<li>model {_esc(row.node)}: SQNR <b>{_num(row.sqnr_db, '.2f')} dB</b>, max abs error "
                     f"{_num(row.max_abs_err, '.4g')}</li>")
    if numeric:
        worst = numeric[0]
        parts.append(f"<li>worst quantized node: <a href=\"#row-{_esc(worst.node)}\">{_esc(worst.node)}</a> "
                     f"({_esc(worst.module or worst.op)}) SQNR <b>{_num(worst.sqnr_db, '.2f')} dB</b></li>")
    if kernels is not None:
        parts.append(f"<li>Inductor: {sum(kernels.values())} fused int8 kernel call(s)</li>")
    if smooth_quant:
        smoothed = sum(1 for g in smooth_quant if g["status"] != "skipped")
        parts.append(f"<li>SmoothQuant: {smoothed} group(s) smoothed, {len(smooth_quant) - smoothed} skipped</li>")
    parts.append("</ul>")
    # -- numeric report
    parts.append(f"<h2>Numeric report</h2><p>fp32 vs quantized on the example inputs, worst SQNR first "
                 f"(below {sqnr_warn_db:g} dB in red). SQNR = 10 log10(sum(ref²) / sum((ref - q)²)).</p>")
    if numeric or outputs:
        parts.append("<table><tr><th>node</th><th>op</th><th>module</th><th>SQNR dB</th><th>max abs err</th>"
                     "<th>fp32 abs max</th></tr>")
        for row in [*outputs, *numeric]:
            bad = ' bad' if isinstance(row.sqnr_db, float) and row.sqnr_db < sqnr_warn_db else ""
            link = f'<a href="#row-{_esc(row.node)}">{_esc(row.node)}</a>' if row.node in by_node else _esc(row.node)
            parts.append(f'<tr><td class="mono">{link}</td>'
                         f"<td>{_esc(row.op)}</td><td class=\"mono\">{_esc(row.module)}</td>"
                         f'<td class="num{bad}">{_num(row.sqnr_db, ".2f")}</td>'
                         f'<td class="num">{_num(row.max_abs_err, ".4g")}</td>'
                         f'<td class="num">{_num(row.ref_abs_max, ".4g")}</td></tr>')
        parts.append("</table>")
    else:
        parts.append("<p>(not computed)</p>")
    # -- SmoothQuant and kernels
    if smooth_quant:
        parts.append("<h2>SmoothQuant groups</h2><table><tr><th>status</th><th>producer</th><th>consumers</th>"
                     "<th>alpha</th><th>scale</th><th>reason</th></tr>")
        for g in smooth_quant:
            scale = g["scale"]
            scale_text = f"n={scale['n']} min={scale['min']:.4g} max={scale['max']:.4g}" if scale else ""
            alpha = "" if g["alpha"] is None else f"{g['alpha']:.2f}"
            parts.append(f"<tr><td>{_esc(g['status'])}</td><td class=\"mono\">{_esc(g['producer'])}</td>"
                         f"<td class=\"mono\">{_esc(', '.join(g['consumers']))}</td><td>{alpha}</td>"
                         f"<td class=\"mono\">{_esc(scale_text)}</td><td>{_esc(g['reason'])}</td></tr>")
        parts.append("</table>")
    if kernels is not None:
        parts.append("<h2>Inductor int8 kernels</h2><table><tr><th>kernel</th><th>calls</th></tr>")
        for name, count in sorted(kernels.items()):
            parts.append(f'<tr><td class="mono">{_esc(name)}</td><td class="num">{count}</td></tr>')
        if not kernels:
            parts.append("<tr><td colspan=2>no int8 kernel: the int8 layers ran as fp32 GEMMs</td></tr>")
        parts.append("</table>")
    # -- graph
    if final is not None:
        svg, used = graph_svg(final, engine)
        legend = "".join(f'<span style="background:{COLORS[c]}">{_esc(text)}</span>' for c, text in LEGEND.items())
        parts.append(f"<h2>Graph: {_esc(final.stem)}</h2>"
                     f'<p class="legend">{legend}<span style="border:3px solid #1b6e1b">int8 weight</span></p>'
                     f"<p>Layout: {_esc(used)}. Constants are hidden; a weight's dequantize is drawn as the layer's "
                     "thick border, a quantize/dequantize pair as one node. Click a node for its row.</p>"
                     f'<div id="graph">{svg}</div>')
        # -- per node table
        parts.append('<h2>Nodes</h2><p><input id="filter" placeholder="filter rows" size="40"></p>'
                     "<table><tr><th>node</th><th>kind</th><th>op</th><th>type</th><th>qparams / scales</th>"
                     "<th>annotation</th><th>SQNR dB</th><th>max abs err</th><th>module</th></tr>")
        for n in final.nodes:
            if n.category == "const":
                continue
            row = by_node.get(n.name)
            annotation = (f"<b>{_esc(n.rule)}</b> " if n.rule else "") + _esc(n.annotation)
            notes = sq_notes.get(n.name, []) + sq_notes.get(f"module:{n.module}", []) \
                if n.category in ("int8", "fp32", "sq") else sq_notes.get(n.name, [])
            annotation += "".join(f"<br><i>{_esc(note)}</i>" for note in notes)
            sqnr = _num(row.sqnr_db, ".2f") if row else ""
            err = _num(row.max_abs_err, ".4g") if row else ""
            bad = ' bad' if row and row.sqnr_db < sqnr_warn_db else ""
            parts.append(f'<tr id="row-{_esc(n.name)}" data-node="{_esc(n.name)}">'
                         f'<td class="mono">{_esc(n.name)}</td>'
                         f'<td style="background:{COLORS.get(n.category, "#fff")}">{_esc(n.category)}</td>'
                         f'<td class="mono">{_esc(n.target if n.op == "call_function" else n.op)}</td>'
                         f'<td class="mono">{_esc(n.type_text)}</td><td class="mono">{_esc(n.info)}</td>'
                         f"<td>{annotation}</td><td class=\"num{bad}\">{sqnr}</td><td class=\"num\">{err}</td>"
                         f'<td class="mono">{_esc(n.module)}</td></tr>')
        parts.append("</table>")
    # -- stages
    parts.append("<h2>Stages</h2><p>Every pass of the pipeline, in order: the diff with the stage before "
                 "and the full text dump (also written next to this page as NN_name.txt / .diff).</p>")
    for snap in snapshots:
        size = f"{len(snap.nodes)} nodes" if snap.is_graph else "report"
        parts.append(f'<details id="stage-{_esc(snap.stem)}"><summary class="mono">{_esc(snap.stem)} ({size})'
                     "</summary>")
        if snap.stem in diffs:
            parts.append(f'<h4>diff</h4><pre class="diff">{_diff_html(diffs[snap.stem])}</pre>')
        parts.append(f"<h4>text</h4><pre>{_esc(snap.text())}</pre></details>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"

