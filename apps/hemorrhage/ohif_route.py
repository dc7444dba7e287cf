"""Correct `/ohif/...` static route for the OHIF viewer bundled with monailabel 0.8.5.
Serving layer (DESIGN.md "Serving"): lets radiologists open PACS studies in OHIF from our server.

monailabel 0.8.5 (`monailabel/endpoints/ohif.py`) maps a request path to a file with
`path.replace("/", os.pathsep)`; on Linux `os.pathsep` is ":", so every nested path
(`assets/images/x.png` -> `assets:images:x.png`) is "not found" and answered with index.html
(status 200, text/html). Top-level files (bundles, css, wasm, app-config.js) are unaffected, so
OHIF still opens a CT study, but these break (measured with Chromium, see docs/pacs.md):
  - `/ohif/assets/*`: favicons and PWA manifest icons, the volume-rendering preset thumbnails
    (`assets/images/CT-*.png`) and the SVG icons OHIF loads by URL (e.g. `arrow-down.svg`)
    arrive as HTML, i.e. broken images;
  - `/ohif/dicom-microscopy-viewer/*`: the slide-microscopy viewer's script, worker and wasm,
    so SM (whole-slide) studies cannot open.
`fix_ohif_route` puts in front of it a route that joins the path properly, refuses paths
that leave the OHIF folder, and keeps index.html as the fallback for OHIF's client-side
routes (`/ohif/viewer?StudyInstanceUIDs=...`).
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

import fastapi
from fastapi.responses import FileResponse

import monailabel.endpoints.ohif as ohif_endpoint
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC

OHIF_DIR = Path(ohif_endpoint.__file__).resolve().parent / "static" / "ohif"


def resolve_ohif_file(path: str, ohif_dir: Path = OHIF_DIR) -> Path:
    """Map the part of a URL after `/ohif/` to the file to send.

    An existing file inside `ohif_dir` is returned as is; anything else (OHIF client-side
    routes such as `viewer`, missing files) maps to `ohif_dir/index.html`, as in monailabel.
    Raises fastapi.HTTPException(404) for paths that resolve outside `ohif_dir` (`../`).
    """
    root = ohif_dir.resolve()
    candidate = (root / path).resolve()
    if not candidate.is_relative_to(root):
        raise fastapi.HTTPException(status_code=404, detail=f"'{path}' is outside the OHIF folder")
    return candidate if candidate.is_file() else root / "index.html"


async def get_ohif_file(path: str) -> FileResponse:
    """GET /ohif/{path}: the bundled OHIF file for `path` (see `resolve_ohif_file`)."""
    file = resolve_ohif_file(path)
    media_type = mimetypes.guess_type(file.name, strict=False)[0] or "application/octet-stream"
    return FileResponse(file, media_type=media_type)


def fix_ohif_route(app: fastapi.FastAPI) -> None:
    """Put a correct GET `/ohif/{path:path}` route (`get_ohif_file`) in front of monailabel's.

    Call with monailabel's FastAPI object (`monailabel.app.app`), e.g. from the MONAILabelApp
    subclass' `__init__` (routes are matched per request, so after start-up is fine); calling
    it again is harmless. The broken route stays registered but is never reached: the app
    matches routes in list order, and recent FastAPI keeps included routers as opaque entries.
    Keeps monailabel's user-role check (active only with MONAI_LABEL_AUTH_ENABLE) and API prefix.
    """
    routes = app.router.routes
    if any(getattr(route, "endpoint", None) is get_ohif_file for route in routes):
        return
    app.add_api_route(
        f"{settings.MONAI_LABEL_API_STR}/ohif/{{path:path}}",
        get_ohif_file,
        methods=["GET"],
        include_in_schema=False,
        dependencies=[fastapi.Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))],
    )
    routes.insert(0, routes.pop())
