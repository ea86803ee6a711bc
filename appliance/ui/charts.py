"""Charts drawn on the server as SVG: metric series and DAGs (pipelines, lineage).

The SVG carries no inline style and no script (the page's Content-Security-Policy forbids
both); colours come from classes in the UI's own stylesheet. Every text is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 36
MAX_POINTS = 2000


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.4g}"


def metric_chart(name: str, points: Sequence[tuple[float, float]]) -> Markup:
    """A line chart of ``(step, value)`` points, labelled with the series' name and range."""
    if len(points) > MAX_POINTS:  # keep the page light: every n-th point, and the last
        stride = len(points) / MAX_POINTS
        points = [points[int(i * stride)] for i in range(MAX_POINTS)] + [points[-1]]
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0 or 1) * 0.1, y1 + abs(y1 or 1) * 0.1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    title = escape(name)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="metric {title}: {len(points)} points, from {_number(min(ys))} '
        f'to {_number(max(ys))}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{title}</title>",
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for fraction in (0, 0.5, 1):
        y = y0 + (y1 - y0) * fraction
        py = sy(y)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{_number(y)}</text>'
        )
    for x in (x0, x1):
        parts.append(
            f'<text class="tick" x="{sx(x):.1f}" y="{HEIGHT - 18}" text-anchor="middle">'
            f"{_number(x)}</text>"
        )
    parts.append(
        f'<text class="axis" x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle">step</text>'
    )
    coordinates = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts.append(f'<polyline class="series" points="{coordinates}"/>')
    if len(points) <= 200:
        for x, y in points:
            parts.append(
                f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3">'
                f"<title>step {_number(x)}: {_number(y)}</title></circle>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every text in it was escaped above)


@dataclass(frozen=True)
class Node:
    id: str
    label: str
    kind: str  # a CSS class: a state (succeeded, failed …) or an object type
    href: str | None = None
    note: str = ""


NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 170, 44, 50, 18, 12


def layers(nodes: Sequence[Node], edges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Each node's column: the length of the longest path reaching it (cycles are cut)."""
    incoming: dict[str, list[str]] = {n.id: [] for n in nodes}
    for source, target in edges:
        if source in incoming and target in incoming:
            incoming[target].append(source)
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def walk(node_id: str) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in visiting:
            return 0
        visiting.add(node_id)
        value = 1 + max((walk(p) for p in incoming[node_id]), default=-1)
        visiting.discard(node_id)
        depth[node_id] = value
        return value

    for node in nodes:
        walk(node.id)
    return depth


def dag_chart(nodes: Sequence[Node], edges: Sequence[tuple[str, str]], label: str) -> Markup:
    """Boxes in columns by dependency depth, arrows from each input to what it feeds."""
    if not nodes:
        return Markup("")
    depth = layers(nodes, edges)
    columns: dict[int, list[Node]] = {}
    for node in nodes:
        columns.setdefault(depth[node.id], []).append(node)
    position: dict[str, tuple[float, float]] = {}
    for column, members in sorted(columns.items()):
        for row, node in enumerate(members):
            position[node.id] = (
                PAD + column * (NODE_W + GAP_X),
                PAD + row * (NODE_H + GAP_Y),
            )
    width = PAD * 2 + (max(columns) + 1) * NODE_W + max(columns) * GAP_X
    height = PAD * 2 + max(len(m) for m in columns.values()) * (NODE_H + GAP_Y) - GAP_Y
    parts = [
        f'<svg class="dag" viewBox="0 0 {width} {height}" width="{width}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path class="arrowhead" '
        'd="M 0 0 L 10 5 L 0 10 z"/></marker></defs>',
    ]
    for source, target in edges:
        if source not in position or target not in position:
            continue
        sx, sy = position[source]
        tx, ty = position[target]
        x1, y1 = sx + NODE_W, sy + NODE_H / 2
        x2, y2 = tx, ty + NODE_H / 2
        middle = (x1 + x2) / 2
        parts.append(
            f'<path class="edge" d="M {x1:.0f} {y1:.0f} C {middle:.0f} {y1:.0f}, '
            f'{middle:.0f} {y2:.0f}, {x2:.0f} {y2:.0f}" marker-end="url(#arrow)"/>'
        )
    for node in nodes:
        x, y = position[node.id]
        text = escape(node.label if len(node.label) <= 24 else node.label[:23] + "…")
        note = escape(node.note if len(node.note) <= 26 else node.note[:25] + "…")
        box = (
            f'<g class="node {escape(node.kind)}"><title>{escape(node.label)}'
            f"{' — ' + escape(node.note) if node.note else ''}</title>"
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
            f'<text x="{x + 10:.0f}" y="{y + 18:.0f}">{text}</text>'
            f'<text class="note" x="{x + 10:.0f}" y="{y + 35:.0f}">{note}</text></g>'
        )
        if node.href:
            box = f'<a href="{escape(node.href)}">{box}</a>'
        parts.append(box)
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every text in it was escaped above)
