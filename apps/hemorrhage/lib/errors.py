"""Turning bad requests into clear HTTP errors instead of stack traces."""

from __future__ import annotations

import re

from fastapi import HTTPException

# Datastore ids are file stems: letters, digits, dot, dash, underscore; never a path.
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def client_error(message: str, status: int = 400) -> HTTPException:
    """An error the client caused (4xx) with a message that says what to do."""
    return HTTPException(status_code=status, detail=message)


def check_image_id(image_id: object) -> str:
    """Return `image_id` if it is a plain datastore id; raise a 400 for path-like or malformed ids."""
    if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id) or ".." in image_id:
        raise client_error(f"invalid image id {image_id!r}: ids are plain names like 'ct_0007', never paths")
    return image_id
