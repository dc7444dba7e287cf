"""Check-outs: a stack served to one annotator is not served to another until saved or expired.

MONAI Label has no notion of several annotators (its issues #1661, #787); this registry is ours.
"""

from __future__ import annotations

import time
from pathlib import Path

from ichal.state import JsonStore


class CheckoutRegistry:
    """Which client holds which image, with expiry; durable and shared across processes."""

    def __init__(self, path: str | Path, expiry_seconds: float):
        if not expiry_seconds > 0:
            raise ValueError(f"check-out expiry must be positive, got {expiry_seconds} s")
        self.expiry_seconds = expiry_seconds
        self._store = JsonStore(path, default=dict)

    def _live(self, checkouts: dict, now: float) -> dict:
        return {image: c for image, c in checkouts.items() if now - c["ts"] < self.expiry_seconds}

    def held_by_others(self, client: str, now: float | None = None) -> set[str]:
        """Images checked out (not expired) to clients other than `client`."""
        now = time.time() if now is None else now
        return {image for image, c in self._live(self._store.read(), now).items() if c["client"] != client}

    def holder(self, image: str, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        entry = self._live(self._store.read(), now).get(image)
        return entry["client"] if entry else None

    def checkout_first_free(self, client: str, candidates: list[str], now: float | None = None) -> str | None:
        """Atomically check out to `client` the first of `candidates` nobody else holds; None if all are held."""
        now = time.time() if now is None else now
        chosen: list[str] = []

        def claim(checkouts: dict) -> dict:
            live = self._live(checkouts, now)
            for image in candidates:
                holder = live.get(image, {}).get("client")
                if holder in (None, client):
                    live[image] = {"client": client, "ts": now}
                    chosen.append(image)
                    break
            return live

        self._store.update(claim)
        return chosen[0] if chosen else None

    def release(self, image: str) -> None:
        def drop(checkouts: dict) -> None:
            checkouts.pop(image, None)

        self._store.update(drop)
