"""The app's own versions of MONAI Label's endpoints that take ids, uploads or JSON from a client.

monailabel 0.8.5's stock endpoints accept paths and archives (`PUT /datastore/image?image=../x`,
`PUT /session/?uncompress=true` with `../` members, infer with a server path), parse client JSON
without checking it (a malformed `params` is a 500 with a traceback), keep rejected uploads in /tmp,
and are `async` functions that block the event loop, so one annotator's request stalls all others.
`install_guarded_routes` puts in front of them routes that:
  - accept datastore ids only (images, labels, tags, client ids), never paths;
  - parse client JSON as an object of bounded size, and answer 4xx with what to do otherwise;
  - keep each upload in a private temp folder that is removed whatever happens;
  - refuse image-info fields the app writes itself (scores, features, check-out stamps);
  - validate training and scoring requests before a subprocess starts (not after it fails);
  - store machine labels (tag `machine`) only through POST /autolabel/, never from a client or batch infer;
  - switch off what this app does not use: sessions (and their archive uncompress), model upload, whole-slide
    infer, and the dataset zip unless `--conf enable_dataset_download true`;
  - are plain `def` handlers, which FastAPI runs in its thread pool: requests no longer queue
    behind each other on the event loop.
Each then calls monailabel's own function for the work, so behaviour stays MONAI Label's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import anyio.from_thread
import fastapi
import requests
from fastapi import BackgroundTasks, Body, File, Form, UploadFile
from fastapi.responses import FileResponse, HTMLResponse
from starlette.background import BackgroundTask

import monailabel.endpoints.datastore as datastore_endpoint
import monailabel.endpoints.info as info_endpoint
import monailabel.endpoints.infer as infer_endpoint
import monailabel.endpoints.scoring as scoring_endpoint
import monailabel.endpoints.train as train_endpoint
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import remove_file

from lib.autolabel import MACHINE_TAG
from lib.errors import check_image_id, client_error
from lib.scoring import FEATURE_KEY, SCORE_KEY
from lib.trainers import parse_train_request

# Fields of an image's info that the app (scoring, strategies, MONAI Label's bookkeeping) writes;
# a client writing them could break next-sample for everyone (issue 16, item 5).
RESERVED_IMAGE_INFO = frozenset({SCORE_KEY, FEATURE_KEY, "strategy", "ts", "name", "checksum"})
RESERVED_LABEL_INFO = frozenset({"ts", "name", "checksum"})
MAX_JSON_BYTES = 64 * 1024
MAX_CLIENT_ID = 128
_CLIENT_ID = re.compile(r"^[\w.@:+-]{1,128}$")
# File types a client may upload (the suffix keeps the reader's format detection; anything else is refused).
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
# DICOMweb paths the viewer may reach through /proxy/dicom: QIDO/WADO resources, STOW to `studies`.
_DICOMWEB_PATH = re.compile(r"^(studies|series|instances)(/(?!\.+(/|$))[0-9A-Za-z.,\-]+)*$")
_STOW_PATH = re.compile(r"^studies(/[0-9.]+)?$")
PROXY_TIMEOUT_SECONDS = 120.0
# Request headers passed to the PACS: content negotiation (transfer syntax) and the STOW body's type.
PROXY_REQUEST_HEADERS = ("accept", "content-type")
PROXY_RESPONSE_HEADERS = ("content-type",)

USER = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)
ANNOTATOR = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)
ADMIN = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)


def parse_json_object(raw: Any, name: str) -> dict:
    """`raw` (a JSON text or an already parsed body) as a dict; 400 naming `name` otherwise."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        if len(raw.encode()) > MAX_JSON_BYTES:
            raise client_error(f"{name} is larger than {MAX_JSON_BYTES // 1024} KiB; send only the fields you need", 413)
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise client_error(f"{name} is not valid JSON ({error.msg} at position {error.pos}); send a JSON object") from None
    if not isinstance(raw, dict):
        raise client_error(f"{name} must be a JSON object like {{\"key\": \"value\"}}, got {type(raw).__name__}")
    if len(json.dumps(raw, default=str).encode()) > MAX_JSON_BYTES:
        raise client_error(f"{name} is larger than {MAX_JSON_BYTES // 1024} KiB; send only the fields you need", 413)
    return raw


def check_client_id(params: dict) -> None:
    """A `client_id` (an annotator's name as the client sends it) is a short plain token, never a document."""
    client = params.get("client_id")
    if client is None:
        return
    if not isinstance(client, str) or not _CLIENT_ID.match(client):
        shown = client[:40] + "..." if isinstance(client, str) and len(client) > 40 else client
        raise client_error(
            f"client_id {shown!r} is not a plain name: use up to {MAX_CLIENT_ID} letters, digits and . _ - @ : +"
        )


def check_reserved_fields(info: dict, reserved: frozenset[str], what: str) -> None:
    clash = sorted(set(info) & reserved)
    if clash:
        raise client_error(f"{what} fields {clash} are written by the app and cannot be set by a client; use other names")


def upload_suffix(filename: str | None, default: str = ".nii.gz") -> str:
    """The upload's file type from its client-side name; 415 for types the app cannot read."""
    name = (filename or "").lower()
    if not name:
        return default
    for suffix in sorted(UPLOAD_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise client_error(f"cannot read uploaded file type of {Path(name).name[:60]!r}; send one of {list(UPLOAD_SUFFIXES)}", 415)


@contextmanager
def received_upload(upload: UploadFile, what: str) -> Iterator[str]:
    """Copy `upload` into a private temp folder as `<what><suffix>` and remove the folder afterwards,
    whether the request succeeds or not. The fixed name keeps server paths out of error messages."""
    suffix = upload_suffix(upload.filename)
    folder = tempfile.mkdtemp(prefix="ichal-upload-")
    try:
        path = os.path.join(folder, what + suffix)
        with open(path, "wb") as handle:
            shutil.copyfileobj(upload.file, handle)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _disabled(message: str) -> Callable[..., None]:
    def refuse() -> None:
        raise client_error(message, 403)

    return refuse


def install_guarded_routes(server: fastapi.FastAPI, app: Any) -> None:
    """Put the guarded routes in front of monailabel's (`server` is `monailabel.app.app`, `app` our
    MONAILabelApp). Routes are matched in list order, so these shadow the stock ones; idempotent."""
    if getattr(server.state, "ichal_guarded", False):
        return
    server.state.ichal_guarded = True
    prefix = settings.MONAI_LABEL_API_STR

    def datastore():
        return app.datastore()

    def add_image(background_tasks: BackgroundTasks, image: Optional[str] = None, params: str = Form("{}"),
                  file: UploadFile = File(...), user: User = fastapi.Depends(ANNOTATOR)) -> dict:
        if not image:
            raise client_error("give the new image's id as ?image=<id> (a plain name like 'ct_0213')")
        check_image_id(image)
        info = parse_json_object(params, "params")
        check_reserved_fields(info, RESERVED_IMAGE_INFO, "image info")
        with received_upload(file, "image") as path:
            return {"image": datastore().add_image(image, path, info)}

    def save_label(image: str, params: str = Form("{}"), tag: str = "final", label: UploadFile = File(...),
                   user: User = fastapi.Depends(ANNOTATOR)) -> dict:
        check_image_id(image)
        check_image_id(tag or "final")
        if tag == MACHINE_TAG:
            raise client_error(f"labels tagged {MACHINE_TAG!r} are written only by POST /autolabel/: save your "
                               "reviewed label as tag 'final'", 403)
        save_params = parse_json_object(params, "params")
        check_client_id(save_params)
        check_reserved_fields(save_params, RESERVED_LABEL_INFO, "label info")
        with received_upload(label, "label") as path:
            label_id = datastore().save_label(image, path, tag or "final", save_params)
        result = app.on_save_label(image, label_id) or {}
        return {**result, "image": image, "label": label_id}

    def update_image_info(image: str, info: str = Form("{}"), user: User = fastapi.Depends(ANNOTATOR)) -> dict:
        fields = parse_json_object(info, "info")
        check_reserved_fields(fields, RESERVED_IMAGE_INFO, "image info")
        datastore().update_image_info(check_image_id(image), fields)
        return {}

    def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = fastapi.Depends(ANNOTATOR)) -> dict:
        fields = parse_json_object(info, "info")
        check_reserved_fields(fields, RESERVED_LABEL_INFO, "label info")
        datastore().update_label_info(check_image_id(label), check_image_id(tag), fields)
        return {}

    def download_dataset(limit_cases: Optional[int] = None, user: User = fastapi.Depends(ANNOTATOR)) -> FileResponse:
        if not app.settings.enable_dataset_download:
            raise client_error("the dataset zip is off in this deployment: start the server with "
                               "--conf enable_dataset_download true to offer it", 403)
        if limit_cases is not None and limit_cases < 1:
            raise client_error(f"limit_cases must be a positive number of cases, got {limit_cases}")
        if not datastore().get_labeled_images():
            raise client_error("no stack has a final label yet: the dataset zip holds labeled stacks only", 409)
        path = datastore().get_dataset_archive(limit_cases)
        # The zip is a temp file of its own: removed once sent, not left behind (issue 16, item 8).
        return FileResponse(path, media_type="application/zip", filename="dataset.zip", background=BackgroundTask(remove_file, path))

    def run_inference(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
                      params: str = Form("{}"), file: UploadFile = File(None), label: UploadFile = File(None),
                      output: Optional[infer_endpoint.ResultType] = None, user: User = fastapi.Depends(USER)):
        if model not in app.task_names("infer"):
            raise client_error(f"unknown model {model!r}; available: {app.task_names('infer')}", 404)
        if file is not None or label is not None or session_id:
            raise client_error("infer runs on datastore images by id: send ?image=<id> and no file, label or session")
        if not image:
            raise client_error("give the image to segment as ?image=<id> (e.g. the id next-sample answered)")
        datastore().get_image_uri(check_image_id(image))
        request_params = parse_json_object(params, "params")
        check_client_id(request_params)
        return infer_endpoint.run_inference(background_tasks, model, image, "", json.dumps(request_params), None, None, output)

    def next_sample(strategy: str, params: Optional[dict] = Body(None), user: User = fastapi.Depends(USER)) -> dict:
        request = parse_json_object(params, "request body")
        check_client_id(request)
        if "client_id" not in request and settings.MONAI_LABEL_AUTH_ENABLE:
            # Clients that send no client_id (OHIF's panel): the signed-in user is the annotator.
            request["client_id"] = user.username
        # Not monailabel's `sample`: it builds the whole /info/ and rewrites datastore_v2.json (an
        # `info.strategy` stamp) on every call, which under 8 annotators was most of next-sample's time.
        # Who was served what, when, is recorded in the app's state database instead (a `served` event).
        result = app.next_sample({**request, "strategy": strategy})
        if not result:
            return {}
        # A PACS-backed datastore adds the study/series UIDs a DICOMweb viewer (OHIF) opens the stack by.
        reference = getattr(datastore(), "dicom_reference", lambda _: {})(result["id"])
        return {**datastore().get_image_info(result["id"]), **reference, **result}

    def proxy_dicom(request: fastapi.Request, op: str, path: str, user: User = fastapi.Depends(USER)) -> fastapi.Response:
        # monailabel's proxy drops the query string (a patient's study search listed every study), and
        # forwards any path and method to the PACS. Here: DICOMweb resources only, GET for QIDO/WADO,
        # POST only to STOW a series (a viewer storing a SEG), query and content negotiation kept.
        if not app.studies.startswith(("http://", "https://")):
            raise client_error("no PACS: this server's studies are a local folder", 404)
        writes = request.method == "POST"
        stow = writes and op in ("wado", "stow") and _STOW_PATH.match(path)  # OHIF stores to its wadoRoot
        if op not in ("qido", "wado", "stow") or not _DICOMWEB_PATH.match(path) or (writes and not stow) \
                or (op == "stow" and not writes):
            raise client_error(f"not a DICOMweb {'STOW' if writes else 'QIDO/WADO'} path: {op}/{path}", 404)
        prefix = {"qido": settings.MONAI_LABEL_QIDO_PREFIX, "wado": settings.MONAI_LABEL_WADO_PREFIX,
                  "stow": settings.MONAI_LABEL_STOW_PREFIX}[op]
        if path.endswith("metadata"):  # some OHIF versions ask QIDO for metadata, a WADO resource
            prefix = settings.MONAI_LABEL_WADO_PREFIX
        url = "/".join(part.strip("/") for part in (app.studies, prefix or "", path) if part)
        headers = {name: request.headers[name] for name in PROXY_REQUEST_HEADERS if name in request.headers}
        auth = (settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD) \
            if settings.MONAI_LABEL_DICOMWEB_USERNAME else None
        body = anyio.from_thread.run(request.body) if writes else None
        try:
            answer = requests.request(request.method, url, params=list(request.query_params.multi_items()),
                                      headers=headers, data=body, auth=auth, timeout=PROXY_TIMEOUT_SECONDS)
        except requests.RequestException as error:
            raise client_error(f"the PACS did not answer: {type(error).__name__}", 502) from None
        kept = {name: answer.headers[name] for name in PROXY_RESPONSE_HEADERS if name in answer.headers}
        return fastapi.Response(content=answer.content, status_code=answer.status_code, headers=kept)

    def train_model(model: str, params: Optional[dict] = Body(None), run_sync: Optional[bool] = False,
                    enqueue: Optional[bool] = False, user: User = fastapi.Depends(ADMIN)) -> dict:
        if model not in app.task_names("train"):
            raise client_error(f"unknown training task {model!r}; available: {app.task_names('train')}", 404)
        request = parse_json_object(params, "request body")
        parse_train_request(request, app.settings)
        return train_endpoint.run_model(model, request, run_sync, enqueue)

    def train_all(params: Optional[dict] = Body(None), run_sync: Optional[bool] = False,
                  user: User = fastapi.Depends(ADMIN)) -> dict:
        request = parse_json_object(params, "request body")
        for model in app.task_names("train"):
            parse_train_request(parse_json_object(request.get(model), f"{model} parameters"), app.settings)
        return train_endpoint.run(request, run_sync)

    def run_scoring(method: str, params: Optional[dict] = Body(None), run_sync: Optional[bool] = False,
                    user: User = fastapi.Depends(ANNOTATOR)) -> dict:
        if method not in app.task_names("scoring"):
            raise client_error(f"unknown scoring method {method!r}; available: {app.task_names('scoring')}", 404)
        return scoring_endpoint.run_method(method, parse_json_object(params, "request body"), run_sync)

    # Read-only endpoints that are stock `async` handlers around blocking work: same work, on the thread pool.
    def app_info(user: User = fastapi.Depends(USER)) -> dict:
        return info_endpoint.app_info()

    def download_image(image: str, user: User = fastapi.Depends(USER)):
        return datastore_endpoint.download_image(image)

    def download_label(label: str, tag: str, user: User = fastapi.Depends(USER)):
        return datastore_endpoint.download_label(label, tag)

    # Issue 20: auto-label the rest, and the dashboard.
    def start_autolabel(user: User = fastapi.Depends(ADMIN)) -> dict:
        return app.autolabeler.start()

    def autolabel_status(user: User = fastapi.Depends(USER)) -> dict:
        return app.autolabeler.status()

    def dashboard_data(user: User = fastapi.Depends(USER)) -> dict:
        return app.context.dashboard_data(datastore(), app.autolabeler.running())

    def dashboard_page(user: User = fastapi.Depends(USER)) -> HTMLResponse:
        from ichal.dashboard import render_page

        page = render_page(app.context.dashboard_data(datastore(), app.autolabeler.running()),
                           time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        return HTMLResponse(page)

    # MONAI Label's batch infer saves labels under any client-given tag, "final" too: machine labels would
    # then be trained on as a radiologist's. POST /autolabel/ is this app's batch infer.
    no_batch_infer = _disabled("batch infer is replaced by POST /autolabel/, which stores machine labels apart "
                               "from radiologists' (tag 'machine')")
    no_sessions = _disabled("sessions are off: this app works on datastore images by id "
                            "(infer with ?image=<id>); upload new images with PUT /datastore/image?image=<id>")
    no_model_upload = _disabled("the committee is replaced only by training (POST /train/hemorrhage); "
                                "uploading or deleting model files is not offered")
    # MONAI Label's whole-slide (pathology) infer resolves an existing server path without the datastore.
    no_wsi = _disabled("whole-slide (WSI) inference is not offered by this head-CT app: use POST /infer/<model>?image=<id>")
    routes: list[tuple[str, list[str], Callable[..., Any]]] = [
        ("/datastore/", ["PUT"], add_image),
        ("/datastore/image", ["PUT"], add_image),
        ("/datastore/label", ["PUT"], save_label),
        ("/datastore/image/info", ["PUT"], update_image_info),
        ("/datastore/label/info", ["PUT"], update_label_info),
        ("/datastore/updatelabelinfo", ["PUT"], update_label_info),
        ("/datastore/dataset", ["GET"], download_dataset),
        ("/datastore/image", ["GET"], download_image),
        ("/datastore/label", ["GET"], download_label),
        ("/info/", ["GET"], app_info),
        ("/infer/{model}", ["POST"], run_inference),
        ("/infer/wsi/{model}", ["POST"], no_wsi),
        ("/infer/wsi_v2/{model}", ["POST"], no_wsi),
        ("/activelearning/{strategy}", ["POST"], next_sample),
        ("/proxy/dicom/{op}/{path:path}", ["GET", "POST"], proxy_dicom),
        ("/train/{model}", ["POST"], train_model),
        ("/train/", ["POST"], train_all),
        ("/scoring/{method}", ["POST"], run_scoring),
        ("/session/", ["PUT"], no_sessions),
        ("/session/{session_id}", ["GET", "DELETE"], no_sessions),
        ("/model/{model}", ["PUT", "DELETE"], no_model_upload),
        ("/batch/infer/{model}", ["POST"], no_batch_infer),
        ("/autolabel/", ["POST"], start_autolabel),
        ("/autolabel/", ["GET"], autolabel_status),
        ("/dashboard/", ["GET"], dashboard_page),
        ("/dashboard/data.json", ["GET"], dashboard_data),
    ]
    for path, methods, endpoint in routes:
        server.add_api_route(prefix + path, endpoint, methods=methods, include_in_schema=False)
    # Move them, in order, in front of everything registered before.
    added = server.router.routes[-len(routes):]
    del server.router.routes[-len(routes):]
    server.router.routes[0:0] = added
