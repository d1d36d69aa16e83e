"""Tests for app.jobs.chart: the SVG loss chart a person opens in a browser."""

from __future__ import annotations

import math
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence

import pytest

from app.jobs.chart import MAX_POINTS_PER_SERIES, loss_chart_svg

NS = "{http://www.w3.org/2000/svg}"
Rows = Sequence[Mapping[str, float | int | None]]


def render(rows: Rows, *, title: str = "ftjob-abc", **size: int) -> ET.Element:
    svg = loss_chart_svg(rows, title=title, **size)
    root = ET.fromstring(svg)  # raises on anything that is not well-formed XML
    assert root.tag == f"{NS}svg"
    return root


def texts(root: ET.Element) -> list[str]:
    return ["".join(element.itertext()) for element in root.iter(f"{NS}text")]


def vertices(root: ET.Element, series: str) -> list[tuple[float, float]]:
    line = root.find(f".//{NS}polyline[@data-series='{series}']")
    assert line is not None, f"no {series} line"
    pairs = [pair.split(",") for pair in line.attrib["points"].split()]
    return [(float(x), float(y)) for x, y in pairs]


def axis_labels(root: ET.Element, axis: str) -> list[str]:
    group = root.find(f"{NS}g[@data-axis='{axis}']")
    assert group is not None
    return texts(group)


def legend(root: ET.Element) -> list[str]:
    group = root.find(f"{NS}g[@data-legend]")
    assert group is not None
    return texts(group)


def y_of(root: ET.Element) -> Callable[[float], float]:
    """The chart's loss -> page-y mapping, read back from its labelled y-axis ticks."""
    group = root.find(f"{NS}g[@data-axis='y']")
    assert group is not None
    # A label sits 4 px below its grid line so it is vertically centred on it.
    ticks = [(float("".join(t.itertext())), float(t.attrib["y"]) - 4) for t in group]
    (low, low_y), (high, high_y) = ticks[0], ticks[-1]
    return lambda value: low_y + (value - low) * (high_y - low_y) / (high - low)


def curve(count: int) -> list[dict[str, float | int | None]]:
    return [
        {"step": step, "train_loss": 3.0 / step, "valid_loss": 3.2 / step}
        for step in range(1, count + 1)
    ]


def test_document_is_standalone_svg_with_size_and_axis_titles() -> None:
    svg = loss_chart_svg(curve(20), title="ftjob-abc", width=640, height=300)
    root = ET.fromstring(svg)

    assert root.tag == f"{NS}svg"
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    assert (root.attrib["width"], root.attrib["height"]) == ("640", "300")
    assert root.attrib["viewBox"] == "0 0 640 300"
    assert {"step", "loss", "ftjob-abc"} <= set(texts(root))
    # Nothing to fetch and nothing to run: safe to serve as image/svg+xml from our origin.
    for element in root.iter():
        assert element.tag.removeprefix(NS) not in {"script", "image", "foreignObject", "a"}
        for name, value in element.attrib.items():
            assert "href" not in name and not name.startswith("on")
            assert "url(" not in value


def test_no_points_says_no_metrics_yet() -> None:
    root = render([])

    assert "No metrics yet" in texts(root)
    assert root.find(f".//{NS}polyline") is None


def test_rows_with_nothing_plottable_say_no_metrics_yet() -> None:
    rows: Rows = [
        {"step": 1, "train_mean_token_accuracy": 0.5},
        {"step": 2, "train_loss": None, "valid_loss": math.nan},
        {"step": None, "train_loss": 1.0},
        {"train_loss": 1.0},
        {"step": 3, "train_loss": math.inf, "full_valid_loss": -math.inf},
    ]

    root = render(rows)

    assert "No metrics yet" in texts(root)
    assert root.find(f".//{NS}polyline") is None


def test_one_vertex_per_point_for_small_inputs() -> None:
    root = render(curve(40))

    assert len(vertices(root, "train_loss")) == 40
    assert len(vertices(root, "valid_loss")) == 40


def test_single_point_is_drawn_as_a_visible_dot() -> None:
    root = render([{"step": 1, "train_loss": 2.0}])

    (x, y), *_ = vertices(root, "train_loss")
    dots = [c for c in root.iter(f"{NS}circle") if c.attrib.get("fill") is not None]
    assert any((float(c.attrib["cx"]), float(c.attrib["cy"])) == (x, y) for c in dots), (
        "a one-vertex polyline is invisible, so the point needs a dot"
    )
    assert len(set(axis_labels(root, "y"))) >= 2


def test_constant_values_get_a_real_range_and_a_flat_line_inside_the_plot() -> None:
    rows = [{"step": step, "train_loss": 1.5} for step in range(1, 11)]

    root = render(rows, width=800, height=420)

    ys = {y for _, y in vertices(root, "train_loss")}
    assert len(ys) == 1
    (y,) = ys
    assert 60 < y < 420 - 48  # strictly inside the plot, not squashed onto an edge
    assert y == pytest.approx(y_of(root)(1.5), abs=0.2)
    labels = axis_labels(root, "y")
    assert len(set(labels)) >= 3 and all(math.isfinite(float(label)) for label in labels)


def test_zero_loss_does_not_get_a_negative_axis() -> None:
    rows = [{"step": step, "train_loss": 0.0} for step in range(1, 5)]

    root = render(rows)

    labels = axis_labels(root, "y")
    assert min(float(label) for label in labels) == 0


def test_none_nan_and_inf_values_are_skipped_not_drawn() -> None:
    rows: Rows = [
        {"step": 1, "train_loss": 2.0},
        {"step": 2, "train_loss": math.nan},
        {"step": 3, "train_loss": None},
        {"step": 4, "train_loss": math.inf},
        {"step": 5},
        {"step": 6, "train_loss": 1.0},
        {"step": math.nan, "train_loss": 1.5},
    ]

    root = render(rows)

    assert len(vertices(root, "train_loss")) == 2


def test_unsorted_input_is_drawn_in_step_order() -> None:
    rows = curve(30)
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)

    drawn = vertices(render(shuffled), "train_loss")

    assert drawn == vertices(render(rows), "train_loss")
    assert [x for x, _ in drawn] == sorted(x for x, _ in drawn)


def test_higher_loss_is_drawn_higher_on_the_page() -> None:
    root = render([{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 1.0}])

    (_, high_y), (_, low_y) = vertices(root, "train_loss")

    assert high_y < low_y
    to_y = y_of(root)
    assert high_y == pytest.approx(to_y(3.0), abs=0.2)
    assert low_y == pytest.approx(to_y(1.0), abs=0.2)


def test_fifty_thousand_steps_stay_small_and_keep_a_spike() -> None:
    rows = curve(50_000)
    rows[25_037]["train_loss"] = 9.0  # one divergent step the reader must still see

    svg = loss_chart_svg(rows, title="long run")
    root = ET.fromstring(svg)

    assert len(svg.encode()) < 100_000
    train = vertices(root, "train_loss")
    assert 2 <= len(train) <= MAX_POINTS_PER_SERIES
    assert len(vertices(root, "valid_loss")) <= MAX_POINTS_PER_SERIES
    assert [x for x, _ in train] == sorted(x for x, _ in train)
    assert min(y for _, y in train) == pytest.approx(y_of(root)(9.0), abs=0.2)
    # The first (highest) loss and the last step survive too.
    assert train[0][1] == pytest.approx(y_of(root)(3.0), abs=0.2)
    assert train[-1][0] == max(x for x, _ in train)


def test_title_is_escaped_and_survives_control_characters() -> None:
    title = 'ft:gpt-4o-mini:acme:<script>alert("x")</script> & co\x01'

    svg = loss_chart_svg(curve(5), title=title)
    root = ET.fromstring(svg)

    assert "<script>" not in svg
    assert root.find(f".//{NS}script") is None
    shown = root.find(f"{NS}title")
    assert shown is not None and shown.text == title.replace("\x01", "\ufffd")
    assert title.replace("\x01", "\ufffd") in texts(root)


def test_long_title_is_cut_to_fit_but_kept_whole_in_the_tooltip() -> None:
    title = "ft:" + "x" * 300

    root = render(curve(5), title=title, width=400, height=240)

    heading = texts(root)[0]
    assert heading.endswith("…") and len(heading) < 60
    assert root.findtext(f"{NS}title") == title


def test_legend_names_valid_loss_only_when_present() -> None:
    with_valid = render(curve(10))
    train_only = render([{"step": s, "train_loss": 1.0 / s} for s in range(1, 10)])

    assert legend(with_valid) == ["train loss", "valid loss"]
    assert legend(train_only) == ["train loss"]
    assert train_only.find(f".//{NS}polyline[@data-series='valid_loss']") is None


def test_full_valid_loss_is_drawn_as_markers() -> None:
    rows: Rows = [
        *curve(20),
        {"step": 10, "full_valid_loss": 0.5},
        {"step": 20, "full_valid_loss": 0.2},
    ]

    root = render(rows)

    markers = root.find(f"{NS}g[@data-series='full_valid_loss']")
    assert markers is not None
    assert len(markers.findall(f"{NS}circle")) == 2
    assert legend(root) == ["train loss", "valid loss", "full valid loss"]


def test_too_small_a_chart_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        loss_chart_svg(curve(3), title="t", width=50, height=20)


def test_arbitrary_rows_always_give_a_parseable_chart_inside_its_viewbox() -> None:
    generator = random.Random(2024)
    awkward: list[float | int | None] = [
        None, math.nan, math.inf, -math.inf, 0, 0.0, -0.0, 1e-300, 5e-324, 1e99, 1e101, -3.0,
        True, 10**400,
    ]  # fmt: skip
    for _ in range(200):
        rows = [
            {
                key: generator.choice(awkward)
                if generator.random() < 0.3
                else generator.uniform(-1e3, 1e3) * 10 ** generator.randint(-12, 12)
                for key in ("step", "train_loss", "valid_loss", "full_valid_loss")
                if generator.random() < 0.9
            }
            for _ in range(generator.randint(0, 30))
        ]

        root = render(rows, width=500, height=300)

        for element in root.iter():
            for names, limit in ((("x", "cx", "x1", "x2"), 500), (("y", "cy", "y1", "y2"), 300)):
                for name in names:
                    if name in element.attrib:
                        assert 0 <= float(element.attrib[name]) <= limit, (name, rows)
            if "points" in element.attrib:
                for x, y in (p.split(",") for p in element.attrib["points"].split()):
                    assert 0 <= float(x) <= 500 and 0 <= float(y) <= 300, rows
