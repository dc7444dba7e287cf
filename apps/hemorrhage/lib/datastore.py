"""Local datastore that validates saved labels and never loses or half-writes an update.

MONAI Label's LocalDatastore copies any uploaded file into labels/final and rewrites datastore_v2.json
in place from its in-memory copy; with scoring and training in subprocesses that loses updates. Here
labels are checked against their image first, files are written atomically, and info updates are
read-modify-write under the datastore's lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel

from ichal.io import (
    Volume,
    VolumeError,
    atomic_write_bytes,
    check_ct_hu,
    check_label,
    read_nifti,
    read_nifti_grid,
    write_nifti,
)

from .errors import check_image_id, client_error

logger = logging.getLogger(__name__)


class HemorrhageDatastore(LocalDatastore):
    """`on_final_label(image_id, client_id, label)` is called after a final label is stored (`label`: the
    stored mask on the image's grid)."""

    on_final_label: Callable[[str, str | None, Volume], None] | None = None
    # Request threads queue on this before taking the inter-process file lock: filelock makes threads of
    # one process that wait for it poll with 50 ms sleeps, which under 8 annotators was a third of a save.
    _thread_lock = threading.RLock()
    _lock_depth = 0

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The datastore lock: one thread of this process at a time, one process at a time. Re-entrant
        (a second FileLock on the same file in one process would wait for itself forever)."""
        with self._thread_lock:
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            with FileLock(self._lock_file):
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0

    def _reconcile_datastore(self) -> None:
        # Every process (the server, each scoring and training subprocess) reconciles the file list at
        # start; unlocked, its read-modify-write undid labels the server saved meanwhile, which were
        # then served again to another annotator (benchmarks/annotators.py). Under the lock it cannot.
        with self._locked():
            self._reload_if_changed()
            super()._reconcile_datastore()

    def has_final_label(self, image_id: str) -> bool:
        """Whether `image_id` has a final label now (after what other processes and threads stored)."""
        self._init_from_datastore_file()
        obj = self._datastore.objects.get(image_id)
        return obj is not None and "final" in obj.labels

    def labels_tagged(self, tag: str) -> dict[str, Dict[str, Any]]:
        """image id -> label info, of every image with a label tagged `tag` (e.g. the machine labels)."""
        self._init_from_datastore_file()
        return {image_id: obj.labels[tag].info for image_id, obj in self._datastore.objects.items() if tag in obj.labels}

    def image_infos(self, image_ids: list[str]) -> dict[str, Dict[str, Any]]:
        """The info dicts of `image_ids` (all known), from one reload instead of one per image."""
        self._init_from_datastore_file()
        objects = self._datastore.objects
        return {image_id: objects[image_id].image.info for image_id in image_ids if image_id in objects}

    def _reload_if_changed(self) -> None:
        """Under the lock: reload datastore_v2.json only if another process wrote it since we last did."""
        if os.path.exists(self._datastore_config_path) and os.stat(self._datastore_config_path).st_mtime != self._config_ts:
            self._reload_unlocked()

    def get_image_uri(self, image_id: str) -> str:
        check_image_id(image_id)
        self.reload()
        if image_id not in self._datastore.objects:
            raise client_error(f"unknown image id {image_id!r}", status=404)
        return super().get_image_uri(image_id)

    def reload(self) -> None:
        """Pick up changes other processes (scoring, training) wrote to datastore_v2.json."""
        self._init_from_datastore_file()

    # Readers see what the scoring and training subprocesses stored (a cheap mtime check).
    def json(self):
        self._init_from_datastore_file()
        return super().json()

    def status(self) -> Dict[str, Any]:
        self._init_from_datastore_file()
        return super().status()

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        self._init_from_datastore_file()
        self._known(image_id)
        return super().get_image_info(image_id)

    def _known(self, image_id: object) -> str:
        """`image_id` if it is a plain id of an image in this datastore: 400 for path-like ids, 404 for unknown."""
        check_image_id(image_id)
        if image_id not in self._datastore.objects:
            raise client_error(f"unknown image id {image_id!r}", status=404)
        return str(image_id)

    def _labeled(self, image_id: object, tag: object) -> tuple[str, str]:
        self._init_from_datastore_file()
        self._known(image_id)
        check_image_id(tag)
        if tag not in self._datastore.objects[image_id].labels:
            raise client_error(f"image {image_id!r} has no label tagged {tag!r}", status=404)
        return str(image_id), str(tag)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(*self._labeled(label_id, label_tag))

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        return super().get_label_info(*self._labeled(label_id, label_tag))

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        label_id, label_tag = self._labeled(label_id, label_tag)
        with self._locked():
            self._reload_if_changed()
            self._datastore.objects[label_id].labels[label_tag].info.update(info)
            self._update_datastore_file(lock=False)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        super().remove_label(*self._labeled(label_id, label_tag))

    def remove_image(self, image_id: str) -> None:
        self._init_from_datastore_file()
        super().remove_image(self._known(image_id))

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """Add an uploaded CT volume under `image_id`: a new plain id, a readable 3D NIfTI in HU, stored
        re-encoded and atomically, so what is served is exactly what was checked."""
        check_image_id(image_id)
        self._init_from_datastore_file()
        if image_id in self._datastore.objects:
            raise client_error(f"image id {image_id!r} is taken; choose another id (images are never overwritten)", 409)
        try:
            volume = read_nifti(image_filename)
            check_ct_hu(volume.array, name=f"uploaded image {image_id!r}")
        except VolumeError as error:
            raise client_error(f"image rejected: {error}", status=422) from error
        name = self._filename(image_id, ".nii.gz")
        write_nifti(volume.array, volume.affine, os.path.join(self._datastore.image_path(), name))
        with self._locked():
            self._reload_if_changed()
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=".nii.gz"))
            self._update_datastore_file(lock=False)
        return image_id

    def _reload_unlocked(self) -> None:
        if os.path.exists(self._datastore_config_path):
            with open(self._datastore_config_path) as handle:
                model = LocalDatastoreModel.model_validate_json(handle.read())
            # Complete before it is published: request threads read `self._datastore` without the lock, and
            # MONAI Label's version assigns it before setting base_path, so a reader in between resolved
            # label paths against the working directory and saved labels outside the datastore.
            model.base_path = self._datastore_path
            self._datastore = model
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """Reload datastore_v2.json when another process changed it. Unchanged (the common case) is a stat
        without the lock: readers do not queue behind a writer for nothing."""
        try:
            if os.stat(self._datastore_config_path).st_mtime == self._config_ts:
                return
        except FileNotFoundError:
            return
        try:
            with self._locked():
                self._reload_if_changed()
        except ValueError as error:
            # As MONAI Label does: keep serving the last good state rather than failing every request.
            logger.error(f"datastore file unreadable, keeping the last good state: {error}")
            if throw_exception:
                raise

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            # pydantic's own serializer: ~5x faster than model_dump + json.dumps, and this runs under the lock.
            document = self._datastore.model_dump_json(exclude={"base_path"}, fallback=str)
            atomic_write_bytes(self._datastore_config_path, document.encode())
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with self._locked():
                write()
        else:
            write()

    def update_image_infos(self, updates: dict[str, Dict[str, Any]]) -> None:
        """Merge `updates[image_id]` into each image's info: one lock, one datastore write."""
        for image_id in updates:
            check_image_id(image_id)
        with self._locked():
            self._reload_if_changed()
            unknown = sorted(set(updates) - set(self._datastore.objects))
            if unknown:
                raise client_error(f"unknown image id {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""), status=404)
            for image_id, info in updates.items():
                self._datastore.objects[image_id].image.info.update(info)
            self._update_datastore_file(lock=False)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self.update_image_infos({image_id: info})

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """Validate the uploaded label against its image, then store it atomically as NIfTI."""
        image_uri = self.get_image_uri(image_id)
        check_image_id(label_tag)
        try:
            label = read_nifti(label_filename)
            image_shape, image_affine = read_nifti_grid(image_uri)
            mask = check_label(label.array, image_shape, name=f"label for {image_id!r}")
        except VolumeError as error:
            raise client_error(f"label rejected: {error}", status=422) from error
        if not np.allclose(label.affine, image_affine, atol=1e-3):
            logger.info(f"label for {image_id} has a different affine; storing it on the image's grid")
        name = self._filename(image_id, ".nii.gz")
        label_path = os.path.join(self._datastore.label_path(label_tag), name)
        # Re-encoded on the image's grid and written atomically: what is stored is exactly what was checked.
        write_nifti(mask, image_affine, label_path)
        with self._locked():
            self._reload_if_changed()
            info = {**(label_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id].labels[label_tag] = DataModel(info=info, ext=".nii.gz")
            self._update_datastore_file(lock=False)
        if label_tag == "final" and self.on_final_label is not None:
            client = (label_info or {}).get("client_id")
            self.on_final_label(image_id, str(client) if client else None, Volume(mask, image_affine))
        return image_id
