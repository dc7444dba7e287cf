"""Check-outs: a stack served to one annotator is not served to another until saved or expired.

MONAI Label has no notion of several annotators (its issues #1661, #787); this registry is ours.
"""

from __future__ import annotations

import time

from ichal.state import StateDB


class CheckoutRegistry:
    """Which client holds which image, with expiry; durable and shared across processes (the `checkouts` table)."""

    def __init__(self, state: StateDB, expiry_seconds: float):
        if not expiry_seconds > 0:
            raise ValueError(f"check-out expiry must be positive, got {expiry_seconds} s")
        self.expiry_seconds = expiry_seconds
        self._state = state

    def held_by_others(self, client: str, now: float | None = None) -> set[str]:
        """Images checked out (not expired) to clients other than `client`."""
        now = time.time() if now is None else now
        return {image for image, holder in self._state.live_checkouts(now, self.expiry_seconds).items() if holder != client}

    def holder(self, image: str, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        return self._state.live_checkouts(now, self.expiry_seconds).get(image)

    def checkout_first_free(self, client: str, candidates: list[str], now: float | None = None) -> str | None:
        """Atomically check out to `client` the first of `candidates` nobody else holds; None if all are held."""
        now = time.time() if now is None else now
        return self._state.claim_first_free(client, candidates, now, self.expiry_seconds)

    def release(self, image: str) -> None:
        self._state.release_checkout(image)
