"""The server-drawn SVG charts: geometry, escaping, and no inline style or script."""

from __future__ import annotations

import re

from appliance.ui.charts import Node, dag_chart, layers, metric_chart


def test_a_metric_chart_draws_one_point_per_value_scaled_into_the_plot():
    svg = str(metric_chart("loss", [(0, 1.0), (1, 0.5), (2, 0.25)]))
    points = re.search(r'<polyline class="series" points="([^"]+)"', svg).group(1).split()
    xs = [float(p.split(",")[0]) for p in points]
    ys = [float(p.split(",")[1]) for p in points]
    assert xs == sorted(xs) and len(set(xs)) == 3
    assert ys == sorted(ys), "falling values go down the chart"
    assert min(ys) >= 16 and max(ys) <= 240 - 36


def test_a_constant_series_and_a_single_point_still_draw():
    assert "<polyline" in str(metric_chart("x", [(5, 3.0)]))
    assert "<polyline" in str(metric_chart("x", [(0, 0.0), (1, 0.0)]))


def test_long_series_are_thinned_for_the_page():
    svg = str(metric_chart("x", [(i, float(i)) for i in range(50_000)]))
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(points) <= 2001
    assert points[-1].startswith("624.0,"), "the last point is kept"


def test_names_and_labels_are_escaped_and_nothing_is_inline():
    evil = '<script>alert(1)</script>" onload="x'
    charts = [
        str(metric_chart(evil, [(0, 1.0), (1, 2.0)])),
        str(
            dag_chart(
                [Node("a", evil, "succeeded", href='/ui/x"y'), Node("b", "b", "failed")],
                [("a", "b")],
                evil,
            )
        ),
    ]
    for svg in charts:
        assert "<script" not in svg and 'onload="' not in svg and "style=" not in svg


def test_dag_columns_follow_the_longest_path():
    nodes = [Node(n, n, "pending") for n in ("prep", "train", "eval", "report")]
    edges = [("prep", "train"), ("train", "eval"), ("prep", "report"), ("eval", "report")]
    assert layers(nodes, edges) == {"prep": 0, "train": 1, "eval": 2, "report": 3}
    svg = str(dag_chart(nodes, edges, "p"))
    assert svg.count('class="edge"') == 4


def test_a_cycle_does_not_hang_the_layout():
    nodes = [Node("a", "a", "x"), Node("b", "b", "x")]
    assert set(layers(nodes, [("a", "b"), ("b", "a")])) == {"a", "b"}
