"""Scenarios 7 and 8 of bench/run.py: taskserve's own scripts, batching a real model and clients.

They measure taskserve against itself (the model alone, one client at several concurrencies),
not against the peers, so bench/run.py runs the scripts as they are (each starts its own
server) and takes their figures from ``--json``. Scenario 7 needs ``.venv-ml`` (``./scripts/ml_env``).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.procs import ROOT, TASKSERVE_VENV, Unavailable

ML_VENV = ROOT / ".venv-ml"


def _run(python: Path, script: str, args: list[str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="taskserve-bench-") as tmp:
        out = Path(tmp) / "figures.json"
        done = subprocess.run(
            [str(python), script, *args, "--json", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{script} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
        figures: dict[str, Any] = json.loads(out.read_text())
        return figures


def batching(out: dict[str, Any], quick: bool) -> None:
    """The MiniLM example: model alone at batch 1 and 64, taskserve batched and unbatched."""
    python = ML_VENV / "bin" / "python"
    if not python.exists():
        raise Unavailable("scenario 7 needs .venv-ml: run ./scripts/ml_env once")
    args = ["--repeats", "1", "--items", "256", "--single-items", "48"] if quick else []
    medians = _run(python, "bench/batching.py", args, timeout=1200)["medians"]
    for key, name in (
        ("s7_model_1", "model alone, batch 1"),
        ("s7_model_64", "model alone, batch 64"),
        ("s7_batched", "taskserve, batched"),
        ("s7_unbatched", "taskserve, unbatched"),
    ):
        out.setdefault(key, []).append(medians[name])


def clients(out: dict[str, Any], quick: bool) -> None:
    """One AsyncHTTPClient shared by 1–256 coroutines, one SyncHTTPClient by threads, and map()."""
    args = ["--seconds", "2" if quick else "4", "--map-tasks", "2000" if quick else "10000"]
    figures = _run(TASKSERVE_VENV / "bin" / "python", "bench/clients.py", args, timeout=600)
    levels = figures["levels"]
    for kind in ("async", "sync"):
        for level, rate in zip(levels, figures[kind].get("shipped", []), strict=False):
            out.setdefault(f"s8_{kind}_{level}", []).append(rate)
    out.setdefault("s8_map", []).append(figures["map"]["rate"])
    out.setdefault("s8_map_requests", []).append(figures["map"]["requests"])
