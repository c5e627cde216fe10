"""Schemathesis hooks for the fuzz run: a .npy file part goes out as the bytes generated for it."""

from __future__ import annotations

import schemathesis

schemathesis.serializer.alias("application/x-npy", "application/octet-stream")
