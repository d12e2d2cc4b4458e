"""The demo page, ``/demo``: its files over HTTP, and the page itself in a real browser.

The browser is Debian's chromium (``make debian-tools`` installs it), driven by Playwright against a real
server on a loopback port, whose repository holds ``affine`` (not a digit model), ``tiny-cnn-bn``,
``tiny-cnn-gn`` and ``broken`` (a model.onnx changed after export, so never ready).
Set NORMSERVE_DEMO_SCREENSHOT=path.png to keep the page's screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from export.build import DIGITS_INPUT, norm_layer_counts
from export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from models.data import LABELS
from models.zoo import build_model, config_to_dict
from repository import ModelConfig, TensorSpec, write_version
from service.routes.demo import DEMO_DIR
from tests.conftest import tiny_cnn_spec
from tests.service.conftest import AFFINE_CONFIG, RunningServer, ServeFactory, affine_onnx, infer_json
from tests.service.user_models import BN_NO_GRAPH_REASON, USER_MODELS, write_user_models

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_demo_page_and_only_its_own_files_are_served(server: RunningServer) -> None:
    page = httpx.get(f"{server.url}/demo")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/demo/demo.js"' in page.text
    for name, kind in [("demo.js", "javascript"), ("demo.css", "text/css"), ("digits.json", "application/json")]:
        asset = httpx.get(f"{server.url}/demo/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"], name
    digits = httpx.get(f"{server.url}/demo/digits.json").json()
    assert len(digits["images"]) == len(digits["targets"]) == 270
    for name in ["nothing.js", "%2E%2E", "__init__.py"]:
        missing = httpx.get(f"{server.url}/demo/{name}")
        assert missing.status_code == 404
        assert missing.json()["error"].endswith("; the page is /demo"), missing.text
    escape = httpx.get(f"{server.url}/demo/..%2Froutes%2Fdemo.py")
    assert escape.status_code == 404 and "APIRouter" not in escape.text
    # The experiments' plots (make experiments draws them into static/demo/plots/, and they are committed).
    captions = httpx.get(f"{server.url}/demo/plots/plots.json").json()
    assert len(captions) == 10
    for c in captions:
        png = httpx.get(f"{server.url}/demo/plots/{c['file']}")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    for name in ["missing.png", "%2E%2E", "plots.json.bak"]:
        missing = httpx.get(f"{server.url}/demo/plots/{name}")
        assert missing.status_code == 404 and "make experiments" in missing.json()["error"], name
    escape = httpx.get(f"{server.url}/demo/plots/..%2Fdemo.js")
    assert escape.status_code == 404 and "function" not in escape.text


@pytest.fixture(scope="module")
def demo_repository(built_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test repository plus ``tiny-cnn-gn``: a digit model without BatchNorm. Exported with the real
    exporter's ONNX export and repository writer, unverified and untrained (2 s instead of 6 s)."""
    root = tmp_path_factory.mktemp("demo-repository")
    shutil.copytree(built_repository, root, dirs_exist_ok=True)
    spec = tiny_cnn_spec("gn")
    model = build_model(spec.arch, config_to_dict(spec.config)).eval()
    graph = export_onnx(model, torch.zeros(2, 1, 8, 8))
    config = ModelConfig(
        name=spec.name,
        max_batch_size=spec.max_batch_size,
        inputs=[TensorSpec(name=INPUT_NAME, datatype="FP32", shape=[-1, 1, 8, 8])],
        outputs=[TensorSpec(name=OUTPUT_NAME, datatype="FP32", shape=[-1, 10])],
        labels=LABELS,
        norm_layers=norm_layer_counts(model),
        description=spec.description,
        input_description=DIGITS_INPUT,
    )
    write_version(root, config, "1", graph.SerializeToString(), {"trained": False, "description": "test"})
    broken = write_version(root, AFFINE_CONFIG.model_copy(update={"name": "broken"}), "1", affine_onnx(), {})
    with broken.model_file.open("ab") as f:
        f.write(b"\0")  # no longer the verified bytes: the server refuses the version
    return root


@pytest.fixture
def browser() -> Iterator[Any]:
    """A fresh headless chromium (no profile, no network of its own); fails the test on any page error."""
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: `make debian-tools` installs Debian's chromium (as root, with apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def softmax(logits: list[float]) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def direct_probabilities(server: RunningServer, model: str, pixels: list[float]) -> np.ndarray:
    """What /infer answers for the page's current input, as probabilities."""
    x = np.asarray(pixels, dtype=np.float32).reshape(1, 1, 8, 8)
    answer = httpx.post(f"{server.url}/v2/models/{model}/infer", json=infer_json("input", x)).json()
    return softmax(answer["outputs"][0]["data"])


def wait_for_current(page: Any, selector: str) -> None:
    """Wait until the element at ``selector`` shows the answer for the page's current input."""
    page.wait_for_function(
        "s => document.querySelector(s)?.dataset.input === document.querySelector('#grid').dataset.input", arg=selector
    )


@pytest.mark.slow  # a real browser
def test_demo_page_draws_predicts_and_compares_batch_statistics(
    serve: ServeFactory, demo_repository: Path, browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(f"{m.text} ({m.location['url']})") if m.type == "error" else None)
    with serve(repository=demo_repository) as server:
        page.goto(f"{server.url}/demo")
        expect(page.locator("#server-status")).to_contain_text("server ready; not ready: broken")
        expect(page.locator('#model-list [data-model="broken"]')).to_contain_text(
            re.compile(r"broken is not ready: UNAVAILABLE .*the file changed after it was exported and verified")
        )
        expect(page.locator('#model-list [data-model="affine"]')).to_contain_text(
            "not a digit model (inputs x FP32 [-1, 4]; outputs y FP32 [-1, 3], total FP32 [-1, 1])"
        )
        expect(page.locator('#model-list [data-model="tiny-cnn-bn"]')).to_contain_text("BatchNorm2d")

        # Draw a 7 with the mouse: the 8x8 input gets ink, and every digit model predicts it.
        box = page.locator("#canvas").bounding_box()
        assert box is not None
        seven = [(0.3, 0.2), (0.7, 0.2), (0.45, 0.8)]  # fractions of the canvas
        at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in seven]
        page.mouse.move(*at[0])
        page.mouse.down()
        for x, y in at[1:]:
            page.mouse.move(x, y, steps=10)
        page.mouse.up()
        expect(page.locator("#input-source")).to_have_attribute("data-kind", "drawing")
        for model in ["tiny-cnn-bn", "tiny-cnn-gn"]:
            wait_for_current(page, f'#predictions [data-model="{model}"]')
        card = page.locator('#predictions [data-model="tiny-cnn-bn"]')
        expect(card.locator(".predicted")).to_have_text(re.compile(r"^\d$"))
        pixels = json.loads(page.locator("#grid").get_attribute("data-pixels") or "[]")
        assert len(pixels) == 64 and max(pixels) > 0.5 and min(pixels) == 0.0
        running = direct_probabilities(server, "tiny-cnn-bn", pixels)
        shown = json.loads(card.locator(".bars").get_attribute("data-probabilities") or "[]")
        np.testing.assert_allclose(shown, running, rtol=1e-5, atol=1e-7)

        # The BatchNorm panel: only the BN model is offered; the GN model needs no running statistics.
        expect(page.locator("#bn-model option")).to_have_count(1)
        page.select_option("#bn-model", "tiny-cnn-bn")
        expect(page.locator("#bn-others")).to_contain_text("tiny-cnn-gn (GroupNorm")
        wait_for_current(page, "#bn-result")
        expect(page.locator("#bn-note")).to_be_visible()  # a batch of one: what its statistics do
        page.click("#add-shifted")
        page.click("#add-other")
        expect(page.locator("#bn-companions button")).to_have_count(8)
        expect(page.locator("#bn-result")).to_have_attribute("data-batch-size", "9")
        expect(page.locator("#bn-status")).to_have_attribute("data-state", "done")
        expect(page.locator("#bn-note")).to_be_hidden()
        with_running = json.loads(page.locator("#bn-running").get_attribute("data-probabilities") or "[]")
        with_batch = json.loads(page.locator("#bn-batch").get_attribute("data-probabilities") or "[]")
        np.testing.assert_allclose(with_running, running, rtol=1e-5, atol=1e-7)  # as /infer answers
        assert np.abs(np.subtract(with_batch, with_running)).max() > 1e-3, "batch statistics changed nothing"
        changed = int(np.argmax(with_batch)) != int(np.argmax(with_running))
        expect(page.locator("#bn-changed")).to_have_text("changed" if changed else "same")
        expect(page.locator("#bn-summary")).to_contain_text(re.compile(r"\d of 9 samples"))
        expect(page.locator("#bn-layers tbody tr")).to_have_count(_batchnorm_layers(server, "tiny-cnn-bn"))

        # The keyboard: the 8x8 grid edits the input; Tab from Clear reaches "Random held-out sample",
        # and Enter loads one, with its true label.
        page.focus("#grid")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Space")
        expect(page.locator("#input-source")).to_have_attribute("data-kind", "edited")
        edited = json.loads(page.locator("#grid").get_attribute("data-pixels") or "[]")
        # the cursor starts at row 4, column 4 (index 27); one step right is 28
        assert [i for i in range(64) if edited[i] != pixels[i]] == [28]
        page.focus("#clear")
        page.keyboard.press("Tab")
        expect(page.locator("#random")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("#input-source")).to_have_attribute("data-kind", "sample")
        expect(page.locator("#input-source")).to_have_attribute("data-label", re.compile(r"^\d$"))
        wait_for_current(page, '#predictions [data-model="tiny-cnn-bn"]')
        wait_for_current(page, "#bn-result")
        expect(page.locator("#bn-result")).to_have_attribute("data-batch-size", "9")  # the companions stay

        # The experiments' plots, one line each, as make experiments drew them.
        captions = json.loads((DEMO_DIR / "plots" / "plots.json").read_text())
        figures = page.locator("#experiment-plots figure")
        expect(figures).to_have_count(len(captions))
        for i, c in enumerate(captions):
            expect(figures.nth(i).locator("figcaption")).to_have_text(c["caption"])
        page.wait_for_function(
            "() => [...document.querySelectorAll('#experiment-plots img')].every(i => i.complete && i.naturalWidth > 0)"
        )

        page.screenshot(path=tmp_path / "demo.png", full_page=True)
        if os.environ.get("NORMSERVE_DEMO_SCREENSHOT"):
            page.screenshot(path=os.environ["NORMSERVE_DEMO_SCREENSHOT"], full_page=True)
    assert not errors, errors


@pytest.fixture(scope="module")
def user_models_repository(built_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test repository (affine, tiny-cnn-bn) and users' own models (tests/service/user_models.py)."""
    root = tmp_path_factory.mktemp("demo-user-models")
    shutil.copytree(built_repository, root, dirs_exist_ok=True)
    return write_user_models(root, broken=True)


@pytest.mark.slow  # a real browser
def test_demo_page_lists_every_model_and_sends_a_random_batch_to_any_batch_statistics_graph(
    serve: ServeFactory, user_models_repository: Path, browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(f"{m.text} ({m.location['url']})") if m.type == "error" else None)
    with serve(repository=user_models_repository) as server:
        page.goto(f"{server.url}/demo")
        expect(page.locator("#server-status")).to_contain_text("server ready; not ready: wrong-dtype")
        expect(page.locator("#model-list li")).to_have_count(len(USER_MODELS) + 3)  # and affine, tiny-cnn-bn
        expect(page.locator('#model-list [data-model="wrong-dtype"]')).to_contain_text("does not take or give")
        expect(page.locator('#model-list [data-model="text-cls"]')).to_contain_text(
            "not a digit model (inputs token_ids INT64 [-1, 8], attention_mask BOOL [-1, 8]; "
            "outputs logits FP32 [-1, 3], tokens INT64 [-1])"
        )
        expect(page.locator('#model-list [data-model="regress-bn"] .tag')).to_have_text("batch statistics")
        # The digit model keeps the drawing; every other one is shown by its metadata.
        expect(page.locator("#digit-panels")).to_be_visible()
        expect(page.locator("#predictions [data-model]")).to_have_count(1)
        cards = page.locator("#other-model-list .meta-card")
        expect(cards).to_have_count(len(USER_MODELS) + 1)
        grid = page.locator('#other-model-list [data-model="grid"]')
        expect(grid).to_contain_text("no batch dimension (max_batch_size 0)")
        expect(grid).to_contain_text("a 3x4 grid of reals")
        expect(grid.locator("tbody tr")).to_have_count(2)
        expect(grid.locator("tbody tr").first).to_contain_text("[3, 4]")
        no_graph = page.locator('#other-model-list [data-model="bn-no-graph"]')
        expect(no_graph).to_contain_text(BN_NO_GRAPH_REASON)

        # The BatchNorm panel: the digit model first, then every other model with a batch-statistics graph.
        options = page.locator("#bn-model option")
        expect(options).to_have_count(3)
        assert options.all_inner_texts()[0].startswith("tiny-cnn-bn")
        expect(page.locator("#bn-others")).to_contain_text(BN_NO_GRAPH_REASON)
        wait_for_current(page, "#bn-result")
        expect(page.locator("#bn-digit")).to_be_visible()
        expect(page.locator("#bn-random")).to_be_hidden()

        page.select_option("#bn-model", "regress-bn")
        expect(page.locator("#bn-digit")).to_be_hidden()
        expect(page.locator("#bn-random")).to_be_visible()
        result = page.locator("#bn-result")
        expect(result).to_have_attribute("data-model", "regress-bn")
        expect(result).to_have_attribute("data-batch-size", "8")
        expect(page.locator("#bn-compare")).to_be_hidden()
        expect(page.locator("#bn-outputs")).to_contain_text("Output pred, 8 rows of 2")
        expect(page.locator("#bn-layers tbody tr")).to_have_count(1)
        expect(page.locator('#bn-layers tbody tr[data-layer="head.bn"]')).to_contain_text("BatchNorm1d")
        first = page.locator("#bn-layers .dist .value").inner_text()
        page.fill("#bn-rows", "3")
        page.click("#bn-reseed")
        expect(result).to_have_attribute("data-seed", "1")
        expect(result).to_have_attribute("data-batch-size", "3")
        expect(page.locator("#bn-status")).to_have_attribute("data-state", "done")
        assert page.locator("#bn-layers .dist .value").inner_text() != first  # another batch, other statistics

        page.select_option("#bn-model", "regress-bn-fixed")
        expect(result).to_have_attribute("data-model", "regress-bn-fixed")
        expect(result).to_have_attribute("data-batch-size", "5")  # its one fixed-size batch
        expect(page.locator("#bn-rows")).to_be_hidden()
        expect(page.locator("#bn-shapes")).to_contain_text("x FP32 [5, 4], shift INT64 [5, 2]; no batch dimension")

        page.select_option("#bn-model", "tiny-cnn-bn")
        expect(page.locator("#bn-digit")).to_be_visible()
        expect(result).to_have_attribute("data-model", "tiny-cnn-bn")
        expect(page.locator("#bn-compare")).to_be_visible()
        page.screenshot(path=tmp_path / "demo-user-models.png", full_page=True)
        if os.environ.get("NORMSERVE_DEMO_SCREENSHOT"):
            page.screenshot(path=os.environ["NORMSERVE_DEMO_SCREENSHOT"], full_page=True)

    # A server with no digit model: no drawing, and the random batch straight away.
    only_users = tmp_path / "only-users"
    write_user_models(only_users)
    with serve(repository=only_users) as server:
        page.goto(f"{server.url}/demo")
        expect(page.locator("#server-status")).to_have_text("server ready")
        expect(page.locator("#digit-panels")).to_be_hidden()
        expect(page.locator("#other-model-list .meta-card")).to_have_count(len(USER_MODELS))
        expect(page.locator("#bn-result")).to_have_attribute("data-model", "regress-bn")
        expect(page.locator("#bn-layers tbody tr")).to_have_count(1)
    assert not errors, errors


def _batchnorm_layers(server: RunningServer, model: str) -> int:
    """How many BatchNorm layers the model has, from its metadata."""
    norm_layers = httpx.get(f"{server.url}/v2/models/{model}").json()["norm_layers"]
    return sum(count for kind, count in norm_layers.items() if "BatchNorm" in kind)


@pytest.mark.slow  # a real browser
def test_the_api_docs_load_with_no_network_but_the_server(server: RunningServer, browser: Any) -> None:
    """/docs is Swagger UI, /redoc is ReDoc, both from the fastapi-offline package: pages offline users can open."""
    from playwright.sync_api import expect

    html = httpx.get(f"{server.url}/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in html and "cdn" not in html
    elsewhere: list[str] = []
    page = browser.new_page()
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(server.url)
            else (elsewhere.append(route.request.url), route.abort())
        ),
    )
    page.goto(f"{server.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("normserve")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    assert elsewhere == []
    # ReDoc renders with every outside request refused; it asks for its own "powered by" logo alone.
    page.goto(f"{server.url}/redoc")
    expect(page.locator("h1").first).to_contain_text("normserve")
    expect(page.get_by_text("/v2/models/{model_name}/infer").first).to_be_attached()
    assert set(elsewhere) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, elsewhere
