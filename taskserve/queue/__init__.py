"""The durable task store. ``Queue.from_url`` picks the backend from the broker URL."""

from __future__ import annotations

from .base import DEFAULT_RETENTION, Queue

__all__ = ["DEFAULT_RETENTION", "Queue"]
