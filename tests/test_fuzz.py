"""The OpenAPI document is the contract clients are generated from: schemathesis fuzzes a real
server from its own /docs.json (tests/fuzz/run.py) and every finding fails the suite.

Zero server errors, and every answer of a documented status and schema; every request the
document admits accepted, every one it forbids refused. A small fixed-seed budget here (CI);
``scripts/fuzz`` runs the same with a large one. Cases it found are kept as regular tests in
tests/test_hardening.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("schemathesis")

import pytest

from .fuzz.run import fuzz


@pytest.mark.timeout(240)  # about 50 s on an idle 2-core machine; more when the suite runs beside it
def test_docs_json_holds_under_fuzzing() -> None:
    found = fuzz(examples=5, seed=1, workers=1, max_time=None, quick=True)
    assert found == 0, "schemathesis found the findings printed above"
