"""The HTTP side: a Starlette app over a queue. It never instantiates the service."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
