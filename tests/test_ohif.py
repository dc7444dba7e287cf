"""OHIF served by our server: the nested-path fix (apps/hemorrhage/ohif_route.py) and a real Chromium
opening a PACS study through `monailabel start_server --studies <Orthanc DICOMweb>`."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Iterator

import fastapi
import numpy as np
import pytest
import server_fixtures
from browser_fixtures import launch_chromium
from fastapi.testclient import TestClient
from monailabel.endpoints import ohif as monailabel_ohif
from PIL import Image

from ichal import pacs
from ichal.dicom import write_ct_series
from ichal.phantom.generator import generate_stack

ROUTE_FILE = server_fixtures.REPO / "apps" / "hemorrhage" / "ohif_route.py"
# Set to a path (e.g. docs/images/ohif_pacs_study.png) to keep the screenshot; else it stays in tmp.
SCREENSHOT_ENV = "ICHAL_OHIF_SCREENSHOT"
VIEWPORT_CANVAS = "canvas.cornerstone-canvas"
PHANTOM_SLICES_TO_SCROLL = 20  # from the skull base to about the ventricles
MIN_CANVAS_STD = 5.0  # grey levels: a drawn head slice on black air is far above, a blank canvas is 0

pytest_plugins = ["pacs_fixtures"]  # orthanc_url, ct_series_dir


def load_route_module():
    spec = importlib.util.spec_from_file_location("ohif_route", ROUTE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ohif_route = load_route_module()
ASSET = "assets/favicon-32x32.png"


def monailabel_like_app() -> fastapi.FastAPI:
    """A FastAPI app with monailabel's own /ohif router, as monailabel.app registers it."""
    app = fastapi.FastAPI()
    app.include_router(monailabel_ohif.router)
    return app


def test_unfixed_route_answers_nested_asset_with_index_html():
    # The 0.8.5 bug the fix exists for; if this fails, monailabel fixed it and ohif_route can go.
    response = TestClient(monailabel_like_app()).get(f"/ohif/{ASSET}")
    assert response.headers["content-type"].startswith("text/html")


def test_fixed_route_serves_index_nested_assets_and_client_routes():
    app = monailabel_like_app()
    ohif_route.fix_ohif_route(app)
    client = TestClient(app)
    index = (ohif_route.OHIF_DIR / "index.html").read_bytes()
    assert client.get("/ohif/").content == index
    assert client.get("/ohif/viewer?StudyInstanceUIDs=1.2.3").content == index
    asset = client.get(f"/ohif/{ASSET}")
    assert asset.headers["content-type"] == "image/png"
    assert asset.content == (ohif_route.OHIF_DIR / ASSET).read_bytes()
    script = client.get("/ohif/dicom-microscopy-viewer/dicomMicroscopyViewer.min.js")
    assert script.headers["content-type"].startswith("text/javascript")


def test_fixed_route_refuses_paths_outside_the_ohif_folder():
    app = monailabel_like_app()
    ohif_route.fix_ohif_route(app)
    response = TestClient(app).get("/ohif/..%2F..%2F..%2Fconfig.py")
    assert response.status_code == 404


def test_fix_is_idempotent():
    app = monailabel_like_app()
    ohif_route.fix_ohif_route(app)
    ohif_route.fix_ohif_route(app)
    endpoints = [getattr(route, "endpoint", None) for route in app.router.routes]
    assert endpoints.count(ohif_route.get_ohif_file) == 1


@pytest.fixture
def phantom_series_dir(tmp_path: Path) -> Path:
    """A phantom head CT (128 x 128 pixels, about 36 slices) as a DICOM series."""
    stack = generate_stack(seed=3, size=128)
    write_ct_series(stack.image_hu, stack.affine, tmp_path / "phantom")
    return tmp_path / "phantom"


@pytest.fixture
def ohif_server(orthanc_url: str, tmp_path: Path) -> Iterator[str]:
    """Base URL of our hemorrhage app (`monailabel start_server`) whose studies are the Orthanc."""
    conf = {"state_dir": str(tmp_path / "state"), "pacs_sync_seconds": "1"}
    with server_fixtures.running_server(orthanc_url, conf, tmp_path / "server.log", timeout_s=180) as url:
        yield url


def show_middle_slice(page, viewport) -> None:
    """Dismiss OHIF's notice and wheel-scroll the viewport from the first slice to mid-head."""
    notice = page.get_by_text("Confirm and Hide")
    if notice.count():
        notice.first.click()
    box = viewport.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(PHANTOM_SLICES_TO_SCROLL):
        page.mouse.wheel(0, 120)
        page.wait_for_timeout(50)
    page.wait_for_timeout(1_000)


@pytest.mark.integration
def test_chromium_renders_pacs_study_in_ohif(
    ohif_server: str, orthanc_url: str, phantom_series_dir: Path, tmp_path: Path
):
    from playwright import sync_api

    study_uid, _ = pacs.stow_series(orthanc_url, phantom_series_dir)
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "ohif.png")
    html_assets: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})

            def on_response(response) -> None:
                is_asset = "/ohif/" in response.url and Path(response.url.split("?")[0]).suffix
                if is_asset and response.headers.get("content-type", "").startswith("text/html"):
                    html_assets.append(response.url)

            page.on("response", on_response)
            page.goto(f"{ohif_server}/ohif/viewer?StudyInstanceUIDs={study_uid}", timeout=120_000)
            viewport = page.locator(VIEWPORT_CANVAS).first
            viewport.wait_for(timeout=60_000)
            contrast = 0.0
            for _ in range(60):  # until the slice is drawn (the canvas is black before)
                contrast = float(np.asarray(Image.open(io.BytesIO(viewport.screenshot())).convert("L")).std())
                if contrast > MIN_CANVAS_STD:
                    break
                page.wait_for_timeout(1_000)
            show_middle_slice(page, viewport)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
            body_text = page.inner_text("body")
        finally:
            browser.close()
    assert contrast > MIN_CANVAS_STD, f"viewer canvas stayed blank (grey-level std {contrast:.1f}); see {screenshot}"
    assert "CT" in body_text and "error" not in body_text.lower(), f"unexpected page: {body_text[:300]}"
    assert html_assets == [], f"assets answered with HTML (route bug): {html_assets}"
