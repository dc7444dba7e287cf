"""DICOMweb (QIDO/WADO/STOW-RS) access to the PACS (Orthanc here): upload, list CT series, cached fetch.
Serving layer (DESIGN.md "Serving", "Real components"); the paper's stacks are one CT series each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

# Instances per STOW-RS request: keeps one multipart body small (a 512x512 int16 slice is 0.5 MB).
STOW_BATCH_SIZE = 16
# Marker written last into a fetched series folder; a folder without it is an interrupted fetch.
COMPLETE_MARKER = ".complete"
_TAG_FAILED_SOP_SEQUENCE = 0x00081198
# WADO-RS media type asking for instances in the transfer syntax the PACS stored them in.
STORED_TRANSFER_SYNTAX = ("application/dicom", "*")


class PacsError(RuntimeError):
    """The PACS answered, but not with what was asked (HTTP error, rejected instance)."""


class PacsUnavailable(PacsError):
    """The PACS cannot be reached (not running, wrong URL, connection refused or timed out)."""


@dataclass(frozen=True)
class SeriesRef:
    """One series in the PACS, as QIDO-RS lists it."""

    study_uid: str
    series_uid: str
    modality: str
    instance_count: int


@contextlib.contextmanager
def _pacs_errors(url: str, action: str) -> Iterator[None]:
    """Turn `requests` failures while doing `action` against `url` into PacsUnavailable/PacsError."""
    try:
        yield
    except (requests.ConnectionError, requests.Timeout) as error:
        reason = type(error).__name__
        raise PacsUnavailable(
            f"PACS at {url} is not reachable while trying to {action} ({reason}); "
            f"is Orthanc running? (scripts/orthanc.sh start DIR PORT)"
        ) from None
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise PacsError(f"PACS at {url} answered HTTP {status} while trying to {action}") from None


def make_client(url: str) -> DICOMwebClient:
    """DICOMweb client for a root URL such as `http://127.0.0.1:8042/dicom-web`.

    dicomweb-client's own retries are off: they retry every exception (a refused connection
    too) 5 times with exponential back-off, 30 s before a down PACS is reported. Callers that
    want to wait use `wait_for_pacs`.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"DICOMweb URL '{url}' must start with http:// or https://")
    client = DICOMwebClient(url=url.rstrip("/"))
    client.set_http_retry_params(retry=False)
    return client


def wait_for_pacs(url: str, timeout_seconds: float = 30.0, poll_seconds: float = 0.2) -> None:
    """Block until a QIDO-RS study search on `url` answers; raise PacsUnavailable after `timeout_seconds`."""
    client = make_client(url)
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with _pacs_errors(url, "search for studies"):
                client.search_for_studies(limit=1)
            return
        except PacsUnavailable as error:
            if time.monotonic() >= deadline:
                raise PacsUnavailable(f"{error} (waited {timeout_seconds:.0f} s)") from None
        time.sleep(poll_seconds)


def _read_folder(folder: Path) -> list[Dataset]:
    """The `*.dcm` files directly in `folder`, read with pydicom."""
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise ValueError(f"no *.dcm files to upload in DICOM folder {folder}")
    return [pydicom.dcmread(p) for p in files]


def stow_series(url: str, source: Sequence[Dataset] | Path | str) -> tuple[str, str]:
    """Upload one series over STOW-RS; returns (StudyInstanceUID, SeriesInstanceUID).

    `source` is a sequence of datasets or a folder of `*.dcm` files of ONE series (a SEG is a
    series of one). Storing again the same instances is harmless (Orthanc keeps one copy).
    Raises ValueError for an empty or mixed-series source, PacsError if the PACS rejects an
    instance, PacsUnavailable if it cannot be reached.
    """
    datasets = _read_folder(Path(source)) if isinstance(source, (str, Path)) else list(source)
    if not datasets:
        raise ValueError("stow_series got no datasets to upload")
    series_uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series_uids) != 1:
        raise ValueError(f"stow_series uploads one series at a time, got {len(series_uids)}: {sorted(series_uids)}")
    client = make_client(url)
    for start in range(0, len(datasets), STOW_BATCH_SIZE):
        batch = datasets[start : start + STOW_BATCH_SIZE]
        with _pacs_errors(url, f"store {len(batch)} instances"):
            response = client.store_instances(batch)
        failed = response.get(_TAG_FAILED_SOP_SEQUENCE)
        if failed is not None and len(failed.value) > 0:
            uids = [str(item.ReferencedSOPInstanceUID) for item in failed.value]
            raise PacsError(f"PACS at {url} rejected {len(uids)} instance(s): {uids[:3]}")
    return str(datasets[0].StudyInstanceUID), series_uids.pop()


def list_series(url: str, modality: str | None = None) -> list[SeriesRef]:
    """Every series in the PACS (QIDO-RS, all pages), optionally only one modality."""
    client = make_client(url)
    search_filters = {"Modality": modality} if modality else {}
    with _pacs_errors(url, "search for series"):
        found = client.search_for_series(search_filters=search_filters, get_remaining=True)
    refs = []
    for attributes in found:
        ds = Dataset.from_json(attributes)
        refs.append(
            SeriesRef(
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                modality=str(ds.get("Modality", "")),
                instance_count=int(ds.get("NumberOfSeriesRelatedInstances", 0) or 0),
            )
        )
    return refs


def list_ct_series(url: str) -> list[SeriesRef]:
    """The CT series in the PACS (the stacks to label); other series are skipped with a log line."""
    ct_series = []
    for ref in list_series(url):
        if ref.modality != "CT":
            logger.info("skipping series %s: modality %s is not CT", ref.series_uid, ref.modality or "(none)")
            continue
        ct_series.append(ref)
    return ct_series


def fetch_series_to_cache(url: str, study_uid: str, series_uid: str, cache_dir: Path | str) -> Path:
    """Folder `cache_dir/<series_uid>/` holding the series' instances as `<SOPInstanceUID>.dcm`.

    Fetched over WADO-RS, in the stored transfer syntax, only when the folder is not complete yet; the download goes to a
    temporary folder renamed into place, so an interrupted fetch never looks complete.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / series_uid
    if (target / COMPLETE_MARKER).is_file():
        return target
    client = make_client(url)
    with _pacs_errors(url, f"retrieve series {series_uid}"):
        # As stored (transfer-syntax=*): asked for the default (Explicit VR Little Endian), Orthanc transcodes,
        # and answers 500 for a JPEG 2000 series it cannot transcode; ichal.ct_ingest decodes what is stored.
        instances = client.retrieve_series(study_uid, series_uid, media_types=(STORED_TRANSFER_SYNTAX,))
    if not instances:
        raise PacsError(f"PACS at {url} has no instances for series {series_uid} of study {study_uid}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{series_uid}.", dir=cache_dir))
    try:
        for ds in instances:
            ds.save_as(partial / f"{ds.SOPInstanceUID}.dcm", write_like_original=False)
        (partial / COMPLETE_MARKER).write_text(f"{len(instances)}\n")
        if target.exists():  # an interrupted fetch left an incomplete folder
            shutil.rmtree(target)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("fetched series %s (%d instances) into %s", series_uid, len(instances), target)
    return target


def list_labeled_series(url: str) -> dict[str, str]:
    """Map source series UID -> SEG series UID for every SEG in the PACS that references a series.

    Labeled/unlabeled status derived from the PACS (it survives a server restart). When several
    SEGs reference one series, the one with the latest (ContentDate, ContentTime) wins.
    SEGs without ReferencedSeriesSequence are skipped with a log line.
    """
    client = make_client(url)
    latest: dict[str, tuple[str, str]] = {}
    for ref in list_series(url, modality="SEG"):
        with _pacs_errors(url, f"retrieve metadata of SEG series {ref.series_uid}"):
            metadata = client.retrieve_series_metadata(ref.study_uid, ref.series_uid)
        # Only header attributes are needed: bulk data (the frames) are left out, not fetched.
        seg = Dataset.from_json(metadata[0], bulk_data_uri_handler=lambda uri: b"")
        referenced = seg.get("ReferencedSeriesSequence")
        if not referenced:
            logger.info("skipping SEG series %s: it references no source series", ref.series_uid)
            continue
        source_uid = str(referenced[0].SeriesInstanceUID)
        stamp = f"{seg.get('ContentDate', '')}{seg.get('ContentTime', '')}"
        if source_uid not in latest or stamp >= latest[source_uid][0]:
            latest[source_uid] = (stamp, ref.series_uid)
    return {source_uid: seg_uid for source_uid, (_, seg_uid) in latest.items()}


def series_folders(root: Path | str) -> list[Path]:
    """Folders at or under `root` that directly hold `*.dcm` files (one series each), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"DICOM folder {root} does not exist")
    return sorted({path.parent for path in root.rglob("*.dcm")})


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ichal.pacs upload URL FOLDER...`: STOW every series folder found under FOLDERs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ichal.pacs", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="upload DICOM series (one per folder) over STOW-RS")
    upload.add_argument("url", help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    upload.add_argument("folders", nargs="+", type=Path)
    upload.add_argument("--wait-seconds", type=float, default=30.0, help="wait this long for the PACS to answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wait_for_pacs(args.url, args.wait_seconds)
    folders = [folder for root in args.folders for folder in series_folders(root)]
    if not folders:
        parser.error(f"no *.dcm files under {[str(f) for f in args.folders]}")
    started = time.perf_counter()
    for folder in folders:
        study_uid, series_uid = stow_series(args.url, folder)
        logger.info("stored %s -> study %s series %s", folder, study_uid, series_uid)
    logger.info("uploaded %d series in %.1f s", len(folders), time.perf_counter() - started)


if __name__ == "__main__":
    main()
