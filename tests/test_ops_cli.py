"""The operator's commands against a real ``taskserve serve``, on both brokers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
from click.testing import CliRunner, Result

from taskserve.cli import cli

from .conftest import Server, free_port, wait_until


def run(server: Server | str, *args: str) -> Result:
    url = server if isinstance(server, str) else server.url
    return CliRunner().invoke(cli, [*args, "--url", url])


def submit(server: Server, route: str, body: dict[str, object], **params: str) -> str:
    response = httpx.post(f"{server.url}{route}/submit", json=body, params=params, timeout=10)
    response.raise_for_status()
    task_id: str = response.json()["task_id"]
    return task_id


def status(server: Server, task_id: str) -> str:
    value: str = httpx.get(f"{server.url}/tasks/{task_id}", timeout=10).json()["status"]
    return value


def test_tasks_lists_ids_in_full_with_filters(served: Server) -> None:
    tag = f"cli:{uuid.uuid4().hex}"
    ids = [submit(served, "/echo", {"text": "hi"}, tag=tag) for _ in range(2)]
    result = run(served, "tasks", "--tag", tag)
    assert result.exit_code == 0, result.output
    assert all(task_id in result.output for task_id in ids)
    as_json = json.loads(run(served, "tasks", "--tag", tag, "--route", "echo", "--json").output)
    assert [t["task_id"] for t in as_json["tasks"]] == ids[::-1]


def test_task_shows_a_failure_and_retry_makes_a_new_task(served: Server) -> None:
    failed = submit(served, "/fail", {"message": "broken on purpose"})
    wait_until(lambda: status(served, failed) == "failure")
    shown = run(served, "task", failed)
    assert shown.exit_code == 0 and failed in shown.output and "broken on purpose" in shown.output
    retried = run(served, "retry", failed)
    assert retried.exit_code == 0 and f"(retry of {failed})" in retried.output
    assert status(served, retried.output.split()[0]) in ("pending", "in_progress", "failure")


def test_cancel_ends_a_waiting_task(served: Server) -> None:
    task_id = submit(served, "/slow_async", {"seconds": 30}, delay="60")
    result = run(served, "cancel", task_id)
    assert result.exit_code == 0 and result.output.strip() == f"{task_id} cancelled"


def test_queues_and_workers_tables(served: Server) -> None:
    queues = run(served, "queues")
    assert queues.exit_code == 0 and "/echo" in queues.output and "/capped" in queues.output
    workers = run(served, "workers")
    ids = [w["id"] for w in httpx.get(f"{served.url}/workers", timeout=10).json()["workers"]]
    assert workers.exit_code == 0 and ids and all(i in workers.output for i in ids)


def test_errors_are_one_message_and_a_non_zero_exit(served: Server) -> None:
    missing = run(served, "task", "no-such-task")
    assert missing.exit_code == 1 and "Error:" in missing.output and "Traceback" not in missing.output
    down = run(f"http://127.0.0.1:{free_port()}", "queues")
    assert down.exit_code == 1 and "Cannot reach the taskserve server" in down.output


def answers(path: Path) -> dict[int, dict[str, object]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_line = {row["line"]: row for row in rows}
    assert len(by_line) == len(rows), "a line was answered twice"
    return by_line


def test_submit_writes_one_answer_a_line_and_resumes(served: Server, tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"a": 1, "b": 2}\n{"a": "x"}\n\n{"a": 5}\n')
    first = run(served, "submit", "add", str(source), "--output", str(out), "--concurrency", "2")
    assert first.exit_code == 0, first.output
    rows = answers(out)
    assert rows[1]["status"] == "success" and rows[1]["result"] == 3 and rows[4]["result"] == 6
    assert rows[2]["status"] == "rejected" and "error" in rows[2] and set(rows) == {1, 2, 4}
    # More input, and an answer cut short by a crash: only those lines run again.
    source.write_text(source.read_text() + '{"a": 10}\n')
    out.write_text(out.read_text() + '{"line": 4, "task_')
    second = run(served, "submit", "/add", str(source), "--output", str(out))
    assert second.exit_code == 0, second.output
    again = answers(out)
    assert set(again) == {1, 2, 4, 5} and again[1]["task_id"] == rows[1]["task_id"] and again[5]["result"] == 11


def test_submit_records_failures_with_their_error(served: Server, tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"message": "bad input"}\n')
    result = run(served, "submit", "fail", str(source), "--output", str(out))
    assert result.exit_code == 0, result.output
    (row,) = answers(out).values()
    assert row["status"] == "failure" and "bad input" in str(row["error"]) and "result" not in row
    unknown = run(served, "submit", "nope", str(source), "--output", str(out))
    assert unknown.exit_code == 1 and "No task endpoint 'nope'" in unknown.output


def test_submit_finds_again_a_task_whose_answer_was_lost(served: Server, tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"a": 1}\n{"a": 2}\n')
    assert run(served, "submit", "add", str(source), "--output", str(out)).exit_code == 0
    first = answers(out)
    # As if the run died after submitting line 2 but before writing its answer.
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines() if '"line": 2' not in line))
    assert run(served, "submit", "add", str(source), "--output", str(out)).exit_code == 0
    assert answers(out)[2]["task_id"] == first[2]["task_id"]


def test_the_installed_command_reads_taskserve_url_and_draws_its_bar_on_stderr(served: Server, tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"text": "one"}\n{"text": "two"}\n')
    env = {**os.environ, "TASKSERVE_URL": served.url, "COLUMNS": "200"}
    command = [sys.executable, "-m", "taskserve", "submit", "echo", str(source), "--output", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "2 lines answered" in done.stderr
    assert sorted(row["result"] for row in answers(out).values()) == ["one", "two"]
    listed = subprocess.run(
        [sys.executable, "-m", "taskserve", "tasks", "--route", "/echo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and all(row["task_id"] in listed.stdout for row in answers(out).values())
