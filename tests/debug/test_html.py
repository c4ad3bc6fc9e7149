"""The HTML page: self-contained, both layouts, and it renders in headless Chromium."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from pt2q.debug.render import display_graph, dot_svg, layered_layout, render_html
from pt2q.debug.text import snapshot
from tests.debug.conftest import mlp2, tiny_cnn

_CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                  if shutil.which(n)), None)
_SVG_NS = "http://www.w3.org/2000/svg"


def _external_urls(page: str) -> list[str]:
    return [u for u in re.findall(r"(?:https?:)?//[^\s\"'<>)]+", page) if u != _SVG_NS and not u.startswith("//")]


@pytest.fixture(scope="module")
def cnn_dump(tmp_path_factory):
    from pt2q.debug import dump_pipeline
    from tests.debug.conftest import minmax_config

    model, calib = tiny_cnn()
    return dump_pipeline(model, minmax_config(), calib, out_dir=tmp_path_factory.mktemp("html") / "d",
                         compile=False, progress=False)


def _final_snapshot(result):
    return snapshot(result.qmodel, 4, "convert_pt2e")


@pytest.mark.parametrize("engine", ["python", "dot"])
def test_page_is_self_contained(cnn_dump, engine):
    if engine == "dot" and not shutil.which("dot"):
        pytest.skip("Graphviz dot not installed (optional: the pure-Python layout is the fallback)")
    snap = _final_snapshot(cnn_dump)
    page = render_html([snap], {}, numeric=cnn_dump.numeric, outputs=cnn_dump.outputs, engine=engine)
    assert f"Layout: {engine}." in page
    assert "http" not in page.replace(_SVG_NS, ""), _external_urls(page)
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert "<svg" in page and 'id="n_conv2d"' in page and "@import" not in page


def test_written_page_has_no_external_resources(cnn_dump):
    page = cnn_dump.html.read_text()
    assert "http" not in page.replace(_SVG_NS, "")
    for name in ("conv2d", "conv2d_1", "linear"):  # per-node rows with their numeric results
        assert f'id="row-{name}"' in page
    assert "Numeric report" in page and 'id="stage-03_calibrate"' in page


def test_display_graph_folds_constants_weights_and_qdq_pairs(cnn_dump):
    snap = _final_snapshot(cnn_dump)
    nodes, edges = display_graph(snap)
    names = {n.name for n in nodes}
    assert not any(n.category == "const" for n in nodes)
    assert "dequantize_per_channel_default" not in names  # the weight's dequantize: the layer's border
    assert "dequantize_per_tensor_default" not in names and "quantize_per_tensor_default" in names
    conv = next(n for n in nodes if n.name == "conv2d")
    assert conv.weight_int8 and conv.category == "int8"
    assert ("quantize_per_tensor_default", "conv2d") in edges  # through the folded dequantize
    assert all(a in names and b in names for a, b in edges)


def test_python_layout_places_every_node_without_overlap():
    names = ["a", "b", "c", "d", "e"]
    edges = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("a", "e"), ("d", "e")]
    pos = layered_layout(names, edges)
    assert set(pos) == set(names)
    assert pos["a"][1] < pos["b"][1] == pos["c"][1] < pos["d"][1] < pos["e"][1]
    assert pos["b"][0] != pos["c"][0]


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz dot not installed")
def test_dot_output_is_reduced_to_bare_svg(cnn_dump):
    nodes, edges = display_graph(_final_snapshot(cnn_dump))
    svg = dot_svg(nodes, edges)
    assert svg.startswith("<svg") and "<!DOCTYPE" not in svg and "xlink" not in svg
    assert "<title>conv2d = call_function aten.conv2d.default(" in svg


def _render_in_chromium(path, tmp_path) -> str:
    done = subprocess.run(
        [_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(_CHROMIUM is None, reason="headless Chromium not installed (CI: apt-get install -y "
                                                "--no-install-recommends chromium)")
@pytest.mark.parametrize("engine", ["python", "dot"])
def test_page_renders_in_headless_chromium(cnn_dump, tmp_path, engine):
    if engine == "dot" and not shutil.which("dot"):
        pytest.skip("Graphviz dot not installed")
    snap = _final_snapshot(cnn_dump)
    path = tmp_path / f"{engine}.html"
    path.write_text(render_html([snap], {}, numeric=cnn_dump.numeric, outputs=cnn_dump.outputs, engine=engine))
    dom = _render_in_chromium(path, tmp_path)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-ready="1"' in body and "data-error" not in body, body
    assert int(re.search(r'data-svg-nodes="(\d+)"', body).group(1)) >= 10
    assert int(re.search(r'data-svg-width="(\d+)"', body).group(1)) > 100  # the SVG has a real layout
    assert int(re.search(r'data-rows="(\d+)"', body).group(1)) == sum(1 for n in snap.nodes if n.category != "const")


@pytest.mark.skipif(_CHROMIUM is None, reason="headless Chromium not installed (CI: apt-get install -y "
                                                "--no-install-recommends chromium)")
def test_written_dump_page_renders_in_headless_chromium(tmp_path):
    from pt2q.debug import dump_pipeline
    from tests.debug.conftest import minmax_config

    model, calib = mlp2()
    result = dump_pipeline(model, minmax_config(), calib, out_dir=tmp_path / "d", compile=False, progress=False)
    body = re.search(r"<body([^>]*)>", _render_in_chromium(result.html, tmp_path)).group(1)
    assert 'data-ready="1"' in body and "data-error" not in body, body


def test_error_page_without_any_graph():
    page = render_html([], {}, error="CaptureError: torch.export could not capture M")
    assert "The pipeline failed" in page and "CaptureError" in page and "<svg" not in page
