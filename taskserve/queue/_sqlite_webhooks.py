"""SQLite's side of webhook deliveries: taking due ones under a lease and recording each try.

The outbox is the task row (migration 5): a delivery is due while the row is in the partial
index ``tasks_webhooks`` with ``coalesce(webhook_due, 0)`` in the past. The statements repeat
the index's condition and expression word for word, as SQLite needs to use a partial index.
"""

from __future__ import annotations

import sqlite3

PENDING = "webhook IS NOT NULL AND webhook_state IS NULL AND completed_at IS NOT NULL"
DUE = f"FROM tasks INDEXED BY tasks_webhooks WHERE {PENDING} AND coalesce(webhook_due, 0) <= ?"
PROBE = f"SELECT 1 {DUE} LIMIT 1"
LOST = "its sender stopped before it had an answer"


def take(conn: sqlite3.Connection, ts: float, limit: int, lease: float, tries: int) -> list[tuple[str, int]]:
    """Due deliveries, taken until ``ts + lease``; those whose tries ran out with their sender are failed."""
    conn.execute(
        f"UPDATE tasks SET webhook_state = 'failed', webhook_error = coalesce(webhook_error, '{LOST}')"
        f" WHERE rowid IN (SELECT rowid {DUE} AND webhook_attempts >= ? LIMIT 1000)",
        (ts, tries),
    )
    rows = conn.execute(
        "UPDATE tasks SET webhook_attempts = webhook_attempts + 1, webhook_due = ?"
        f" WHERE rowid IN (SELECT rowid {DUE} AND webhook_attempts < ? ORDER BY coalesce(webhook_due, 0) LIMIT ?)"
        " RETURNING id, webhook_attempts",
        (ts + lease, ts, tries, limit),
    ).fetchall()
    return [(task_id, attempts) for task_id, attempts in rows]


def settle(
    conn: sqlite3.Connection, task_id: str, attempt: int, error: str | None, retry_in: float | None, ts: float
) -> bool:
    """Record one try, if it is still the delivery's latest (``attempt`` fences it)."""
    if error is None:
        sets, params = "webhook_state = 'delivered', webhook_due = NULL", []
    elif retry_in is not None:
        sets, params = "webhook_error = ?, webhook_due = ?", [error, ts + retry_in]
    else:
        sets, params = "webhook_state = 'failed', webhook_error = ?, webhook_due = NULL", [error]
    cur = conn.execute(
        f"UPDATE tasks SET {sets} WHERE id = ? AND {PENDING} AND webhook_attempts = ?", (*params, task_id, attempt)
    )
    return cur.rowcount == 1
