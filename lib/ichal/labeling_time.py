"""Labeling time learned from use: raw annotator events, active seconds per saved label, time-model refits.

The server sees when a client was served a stack, fetched or pre-labeled it, and saved its final label
(DESIGN.md, Serving). Active time is the sum of gaps between that client's events on the stack, each
gap capped at an idle limit, so a lunch break does not count as labeling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

if TYPE_CHECKING:  # ichal.state stores LabelEvents, so it imports this module, not the other way round
    from ichal.state import StateDB

EventKind = Literal["served", "fetched", "infer", "saved"]
EVENT_KINDS: tuple[str, ...] = ("served", "fetched", "infer", "saved")


@dataclass(frozen=True)
class LabelEvent:
    """One thing a client did with a stack at `ts` (Unix seconds)."""

    ts: float
    client: str
    image: str
    kind: str


@dataclass(frozen=True)
class MeasuredTime:
    """Active seconds one client spent from first touching `image` to saving its final label."""

    image: str
    client: str
    seconds: float
    started: float
    saved: float


def active_seconds(event_times: Sequence[float], idle_limit_seconds: float) -> float:
    """Sum of gaps between consecutive sorted `event_times`, each gap capped at `idle_limit_seconds`."""
    if idle_limit_seconds <= 0:
        raise ValueError(f"idle limit must be positive, got {idle_limit_seconds} s")
    times = sorted(event_times)
    return float(sum(min(b - a, idle_limit_seconds) for a, b in zip(times, times[1:])))


def measured_times(events: Sequence[LabelEvent], idle_limit_seconds: float) -> list[MeasuredTime]:
    """One `MeasuredTime` per `saved` event that follows a `served` or `fetched` event of the same client.

    A session runs from the client's first event on the image after its previous save; saves with no
    earlier event (labels uploaded without being served) have no measurable time and are skipped.
    """
    sessions: dict[tuple[str, str], list[float]] = {}
    results: list[MeasuredTime] = []
    for event in sorted(events, key=lambda e: e.ts):
        key = (event.client, event.image)
        if event.kind == "saved":
            times = sessions.pop(key, [])
            if times:
                times.append(event.ts)
                results.append(
                    MeasuredTime(event.image, event.client, active_seconds(times, idle_limit_seconds), times[0], event.ts)
                )
        elif event.kind in ("served", "fetched") or key in sessions:
            sessions.setdefault(key, []).append(event.ts)
    return results


class EventLog:
    """Durable raw event log (the `events` table, one transaction per event): nothing is ever dropped or edited."""

    def __init__(self, state: StateDB):
        self._state = state

    def record(self, client: str, image: str, kind: str, ts: float | None = None) -> LabelEvent:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
        event = LabelEvent(ts=time.time() if ts is None else ts, client=client, image=image, kind=kind)
        self._state.record_event(event)
        return event

    def events(self, client: str | None = None, image: str | None = None) -> list[LabelEvent]:
        """All events, or (with both) one client's events on one image."""
        return self._state.events(client, image)
