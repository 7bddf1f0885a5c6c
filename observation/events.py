"""Immutable values handed out by a stream: one Event, one Batch of them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """One published event.

    ``id`` is the per-stream sequence number (1, 2, 3, ... with no gaps).
    ``wire`` is the event already encoded for the wire (SSE bytes): the
    manager's ``encode`` ran exactly once, at publish, and every reader
    shares these bytes.
    """

    id: int
    name: str
    data: str
    wire: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    """Everything one reader takes on one wake-up.

    ``events`` are consecutive ids in order. ``skipped`` > 0 means the
    reader fell more than the ring behind and this many events were dropped
    *just before* ``events[0]`` (``events`` may then be empty only when the
    stream's ring was released at expiry). ``wire`` is the concatenation of
    the events' wire bytes: one write per wake-up.
    """

    events: tuple[Event, ...]
    skipped: int
    wire: bytes
