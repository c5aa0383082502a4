"""The memory-plan pictures: the data behind them, PNG/SVG rendering, and the HTML in a browser."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from graphpass.errors import InputError
from graphpass.memory_plan import ARENA_KINDS, MemoryPlan, PlannedTensor, build_plan, verify_plan
from graphpass.visualize import (
    aligned_steps,
    buffer_rectangles,
    chart_data,
    draw,
    largest_at_peak,
    memory_series,
    peak_step,
    summary_line,
)

MIB = 1 << 20


def _t(name: str, kind: str, nbytes: int, start: int, end: int, module: str = "") -> PlannedTensor:
    return PlannedTensor(name, name if kind != "parameter" else "", module or f"mod.{name}", kind, nbytes, start, end, None)


def tiny_plan() -> MemoryPlan:
    """A 3-layer training step worked out by hand: forward steps 0-2, backward steps 3-5."""
    steps = ["conv1", "relu1", "fc", "fc backward", "relu1 backward", "conv1 backward"]
    tensors = [
        _t("x", "input", 100, 0, 6),
        _t("w1", "parameter", 40, 0, 6),
        _t("w2", "parameter", 20, 0, 6),
        _t("a1", "activation", 400, 0, 2),  # conv1 output, read by relu1
        _t("a1_saved", "compressed", 50, 0, 5),  # kept for relu1's backward
        _t("a2", "saved", 300, 1, 4),  # relu1 output, kept for fc's backward
        _t("out", "activation", 10, 2, 4),
        _t("g_out", "activation_grad", 10, 3, 4),
        _t("g_a2", "activation_grad", 300, 3, 5),
        _t("g_w2", "param_grad", 20, 3, 6),
        _t("g_a1", "activation_grad", 400, 4, 6),
        _t("g_w1", "param_grad", 40, 5, 6),
    ]
    plan = build_plan("tiny", tensors, steps, 3, bits=4, norm="keep")
    plan.baseline = build_plan(
        "tiny baseline",
        [t if t.kind != "compressed" else PlannedTensor("a1_saved", "a1_saved", "mod.a1", "saved", 400, 0, 5, None) for t in tensors],
        steps,
        3,
    )
    return plan


def synthetic_plan(num_forward: int, seed: int = 0) -> MemoryPlan:
    """A ResNet-sized step: per layer an activation, a saved copy, gradients and a parameter."""
    rng = random.Random(seed)
    total = 2 * num_forward
    steps = [f"layer{i}" for i in range(num_forward)] + [f"layer{i} backward" for i in reversed(range(num_forward))]
    tensors = [_t("input", "input", 600_000, 0, total)]
    for i in range(num_forward):
        module = f"layer{i // 50}.{i % 50}.conv"
        size = rng.randint(100_000, 2_000_000)
        tensors += [
            _t(f"w{i}", "parameter", rng.randint(1_000, 200_000), 0, total, module),
            _t(f"a{i}", "activation", size, i, min(i + 2, total), module),
            _t(f"s{i}", "compressed", size // 8, i, total - i, module),
            _t(f"g{i}", "activation_grad", size, total - i - 1, min(total - i + 1, total), module),
            _t(f"gw{i}", "param_grad", 5_000, total - i - 1, total, module),
        ]
    return build_plan(f"synthetic {num_forward} layers", tensors, steps, num_forward, bits=4)


@pytest.fixture(scope="module")
def plan() -> MemoryPlan:
    return tiny_plan()


def _overlap(a, b) -> bool:
    in_time = a.start < b.end and b.start < a.end
    in_space = a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes
    return in_time and in_space and a.nbytes > 0 and b.nbytes > 0


def test_one_rectangle_per_planned_tensor_none_overlapping(plan):
    verify_plan(plan)
    rects = buffer_rectangles(plan)
    planned = [t for t in plan.tensors if t.offset is not None]
    assert len(planned) == sum(t.kind in ARENA_KINDS for t in plan.tensors) == 9
    assert [(r.name, r.offset, r.nbytes, r.start, r.end) for r in rects] == [
        (t.name, t.offset, t.nbytes, t.start, t.end) for t in planned
    ]
    assert not [(a.name, b.name) for i, a in enumerate(rects) for b in rects[i + 1 :] if _overlap(a, b)]
    assert max(r.offset + r.nbytes for r in rects) == plan.planned_bytes


def test_rectangles_of_a_large_plan_do_not_overlap():
    big = synthetic_plan(120)
    rects = sorted(buffer_rectangles(big), key=lambda r: r.start)
    assert len(rects) == sum(t.offset is not None for t in big.tensors) == 4 * 120
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            if b.start >= a.end:
                break
            assert not _overlap(a, b), (a.name, b.name)


def test_memory_series_matches_hand_computation(plan):
    series = memory_series(plan)
    mine = series["plan"]
    # params+input 160 at every step; arena by hand:
    # step0 a1 400 + a1_saved 50; step1 a1, a1_saved, a2; step2 a1_saved, a2, out;
    # step3 a1_saved, a2, out, g_out, g_a2, g_w2; step4 a1_saved, g_a2, g_w2, g_a1; step5 g_w2, g_a1, g_w1
    arena = [450, 750, 360, 690, 770, 460]
    assert mine["arena"] == arena
    assert mine["total"] == [v + 160 for v in arena] == plan.memory_profile()
    assert max(mine["arena"]) == plan.lower_bound_bytes == 770
    assert mine["num_forward_steps"] == 3
    assert series["baseline"]["total"] == plan.baseline.memory_profile()
    assert series["baseline"]["predicted_peak_bytes"] == 770 + 350 + 160
    assert series["baseline"]["x"] == [0, 1, 2, 3, 4, 5]  # same step axis: nothing to stretch


def test_baseline_steps_are_stretched_phase_by_phase():
    # 2 forward + 2 backward steps onto 4 + 4: both boundaries land on each other
    assert aligned_steps(4, 2, 8, 4) == [0.5, 2.5, 4.5, 6.5]
    xs = aligned_steps(7, 3, 20, 12)
    assert max(x for x in xs[:3]) < 11.5 < min(x for x in xs[3:]) and xs[-1] < 19.5


def test_largest_tensors_at_the_peak(plan):
    assert peak_step(plan) == 4
    assert [(t.name, t.module) for t in largest_at_peak(plan, 3)] == [
        ("g_a1", "mod.g_a1"),
        ("g_a2", "mod.g_a2"),
        ("x", "mod.x"),
    ]


def test_summary_line_has_every_figure(plan):
    line = summary_line(plan)
    assert "\n" not in line
    for figure in ("peak", "lower bound", "arena", "saved for backward", "savings"):
        assert figure in line
    savings = plan.baseline.predicted_peak_bytes - plan.predicted_peak_bytes
    assert savings == 350
    assert f"{savings / MIB:,.1f} MiB" in line
    plan_without = tiny_plan()
    plan_without.baseline = None
    assert "savings n/a" in summary_line(plan_without)


def test_png_and_svg_render_at_a_sane_size(plan, tmp_path):
    import matplotlib.image

    png = draw(plan, tmp_path / "plan.png")
    pixels = matplotlib.image.imread(png)
    height, width = pixels.shape[:2]
    assert 800 <= width <= 3000 and 800 <= height <= 3000
    assert 10_000 < png.stat().st_size < 5 * MIB
    assert pixels[..., :3].std() > 0.05  # not a blank canvas

    svg = draw(plan, tmp_path / "plan.svg")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert 500 <= float(root.get("width").rstrip("pt")) <= 3000
    assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.png", "plan.svg"]


def _embedded_data(page: str) -> dict:
    match = re.search(r'<script id="plan-data" type="application/json">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_html_is_one_self_contained_file(plan, tmp_path):
    page = draw(plan, tmp_path / "plan.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "@import" not in page and "fetch(" not in page
    data = _embedded_data(page)
    assert data == json.loads(json.dumps(chart_data(plan)))
    assert len(data["rects"]["name"]) == len(buffer_rectangles(plan))
    assert data["summary"] == summary_line(plan)


def test_html_escapes_script_endings_in_names(tmp_path):
    steps = ["a</script><b>", "b"]
    tensors = [_t("t</script>", "activation", 10, 0, 2)]
    page = draw(build_plan("m</script>", tensors, steps, 1), tmp_path / "p.html").read_text()
    assert _embedded_data(page)["rects"]["name"] == ["t</script>"]


def test_bad_paths_leave_nothing(plan, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        draw(plan, tmp_path / "missing" / "plan.png")
    with pytest.raises(InputError, match="suffix"):
        draw(plan, tmp_path / "plan.pdf")
    with pytest.raises(InputError, match="MemoryPlan"):
        draw(plan.to_json(), tmp_path / "plan.png")
    assert list(tmp_path.iterdir()) == []


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (CI installs the Debian package)")
@pytest.mark.parametrize("which", ["tiny", "resnet152-sized"])
def test_html_opens_in_headless_chromium_without_errors(which, tmp_path):
    subject = tiny_plan() if which == "tiny" else synthetic_plan(520)
    page = draw(subject, tmp_path / "plan.html")
    # Drive the page like a user: hover the memory chart, click a grid of points on the buffer chart.
    page.write_text(page.read_text().replace("</body>", _INTERACTION_PROBE + "</body>"))
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    root = re.search(r"<html[^>]*>", result.stdout)
    assert root is not None, result.stdout[:500]
    assert "data-errors" not in root.group(0)
    assert f'data-rendered="{len(buffer_rectangles(subject))}"' in root.group(0)
    assert "<tr><td>" in result.stdout  # the table of the largest tensors was filled in
    assert 'data-tip="step ' in root.group(0)  # hovering the memory chart explains the step
    hits = int(re.search(r'data-hits="(\d+)"', root.group(0)).group(1))
    assert hits > 0  # clicking a rectangle pins it and describes the tensor


_INTERACTION_PROBE = """<script>
(function () {
  const root = document.documentElement, mem = document.getElementById("mem"), buf = document.getElementById("buf");
  const m = mem.getBoundingClientRect();
  mem.dispatchEvent(new MouseEvent("mousemove", {clientX: m.left + m.width / 2, clientY: m.top + m.height / 2}));
  root.setAttribute("data-tip", document.getElementById("tip").textContent.split("\\n")[0]);
  const r = buf.getBoundingClientRect(), detail = document.getElementById("detail");
  let hits = 0;
  for (let i = 1; i < 25; i++) for (let j = 1; j < 25; j++) {
    const at = {clientX: r.left + r.width * i / 25, clientY: r.top + r.height * j / 25};
    buf.dispatchEvent(new MouseEvent("mousedown", at));
    buf.dispatchEvent(new MouseEvent("mouseup", at));
    if (detail.textContent.indexOf("steps [") >= 0) { hits++; buf.dispatchEvent(new MouseEvent("mouseup", at)); }
  }
  root.setAttribute("data-hits", String(hits));
})();
</script>"""
