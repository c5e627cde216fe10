"""The load generator: `python -m bench.loadgen` reads one JSON job on stdin, prints JSON results.

Every system is driven by this same code. A job's work is split over several processes, each
running threads that own one driver (one HTTP connection, or one Celery client), so no single
event loop or interpreter lock caps the offered load. All threads start together after they
have connected. Every loop is bounded by a count and by the job's deadline.

Jobs:
  run      submit tasks and poll (or long-poll) each to its end, `window` in flight per thread;
           with "verify", then fetch and check every result (after the measured window)
  check    fetch the status of given ids (and with "verify", check their results)
  submit   enqueue tasks in bulk (submit_many in chunks) without waiting for them
  drain    watch ids being drained by workers started after READY is printed
  prefill  store finished results directly (Celery only)
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from bench.drivers import PENDING, RUNNING, SUCCESS, TERMINAL, make_driver

now = time.monotonic  # CLOCK_MONOTONIC: one clock for all processes on the machine


def task_args(task: str, i: int, job: dict) -> dict:
    if task == "noop":
        return {"x": i}
    if task == "sleep":
        return {"ms": job.get("sleep_ms", 100)}
    return {"prompt": f"bench image {i}"}


def expected_result(task: str, i: int, job: dict) -> Any:
    return task_args(task, i, job).get("x", task_args(task, i, job).get("ms"))


# -- the parallel engine -------------------------------------------------------------------


def _child(job: dict, shards: list[list], work: Callable, barriers: tuple[Any, Any], out: Any) -> None:
    drivers = [make_driver(job["driver"]) for _ in shards]
    results: list[list] = [[] for _ in shards]

    def thread_main(k: int) -> None:
        try:
            drivers[k].connect()
            started.wait()
            results[k] = work(drivers[k], shards[k], job)
        except Exception:
            results[k] = [{"error": traceback.format_exc(limit=3)}]
        try:
            # Results are checked only once every thread everywhere is done measuring.
            finished.wait()
            if job.get("verify"):
                _verify_results(drivers[k], results[k], job)
        except Exception:
            results[k].append({"error": traceback.format_exc(limit=3)})
        finally:
            drivers[k].close()

    started = threading.Barrier(len(shards), action=barriers[0].wait)
    finished = threading.Barrier(len(shards), action=barriers[1].wait)
    threads = [threading.Thread(target=thread_main, args=(k,)) for k in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put([record for part in results for record in part])


def parallel(job: dict, items: list, work: Callable) -> list[dict]:
    """Run `work(driver, shard, job)` over `items` split across procs x threads; join the records."""
    procs = max(1, min(job.get("procs", 4), len(items)))
    threads = max(1, job.get("threads", 8))
    shards = [items[k :: procs * threads] for k in range(procs * threads)]
    shards = [s for s in shards if s] or [[]]
    groups = [g for g in (shards[p::procs] for p in range(procs)) if g]
    # spawn, not fork: a child must not share the parent's sockets (Celery's pools included).
    ctx = multiprocessing.get_context("spawn")
    barriers, out = (ctx.Barrier(len(groups)), ctx.Barrier(len(groups))), ctx.Queue()
    children = [ctx.Process(target=_child, args=(job, g, work, barriers, out)) for g in groups]
    for c in children:
        c.start()
    records = [r for _ in children for r in out.get(timeout=job.get("deadline_s", 120) + 120)]
    for c in children:
        c.join(timeout=10)
    return records


# -- job bodies ------------------------------------------------------------------------------


def _run_shard(driver: Any, indices: list[int], job: dict) -> list[dict]:
    task, window, mode = job["task"], job.get("window", 1), job.get("mode", "poll")
    poll, deadline = job.get("poll_ms", 2) / 1000, now() + job.get("deadline_s", 120)
    task_timeout = job.get("task_timeout_s", 60)  # a task not done by then counts as lost
    stop_submitting = now() + job.get("max_seconds", 1e9)  # bounded in time as well as count
    todo, inflight, done = deque(indices), [], []
    while todo or inflight:
        if now() > stop_submitting:
            todo.clear()
        while todo and len(inflight) < window:
            record = {"i": todo.popleft(), "t0": now()}
            try:
                record["id"] = driver.submit(task, task_args(task, record["i"], job))
                inflight.append(record)
            except Exception as exc:
                done.append({**record, "word": "error", "t1": now(), "error": str(exc)})
        for record in list(inflight):
            try:
                if mode == "wait":
                    word, info = driver.wait(task, record["id"], job.get("wait_s", 10))
                else:
                    word, info = driver.status(task, record["id"])
            except Exception as exc:
                word, info = "error", {"error": str(exc)}
            t = now()
            record["polls"] = record.get("polls", 0) + 1
            if word == RUNNING:
                record.setdefault("run0", t)
                record["run1"] = t
            if word in TERMINAL or word == "error" or t > deadline or t - record["t0"] > task_timeout:
                record.update(word=word if word in TERMINAL or word == "error" else "timeout", t1=t, info=info)
                inflight.remove(record)
                done.append(record)
        if inflight and mode == "poll":
            time.sleep(poll)
    return done


def _check_shard(driver: Any, items: list[list], job: dict) -> list[dict]:
    task, out = job["task"], []
    for i, task_id in items:
        record: dict[str, Any] = {"i": i, "id": task_id}
        try:
            record["word"], record["info"] = driver.status(task, task_id)
        except Exception as exc:
            record["word"], record["error"] = "error", str(exc)
        out.append(record)
    return out


def _verify_results(driver: Any, records: list[dict], job: dict) -> None:
    """Fetch the result of every successful task (every `verify_every`-th one) and check it."""
    every = job.get("verify_every", 1)
    for record in records:
        if record.get("word") == SUCCESS and record["i"] % every == 0:
            try:
                record["ok"] = _result_ok(job["task"], record["i"], driver.result(job["task"], record["id"]), job)
            except Exception as exc:
                record["ok"], record["get_error"] = False, str(exc)


def _result_ok(task: str, i: int, value: Any, job: dict) -> bool:
    if task != "image":
        return value == expected_result(task, i, job)
    from PIL import Image

    from bench.services.render import render

    image = Image.open(io.BytesIO(value))
    image.load()
    want = render(task_args(task, i, job)["prompt"])
    return image.size == (256, 256) and image.convert("RGB").tobytes() == want.tobytes()


def job_run(job: dict) -> dict:
    first = job.get("first_index", 0)
    records = parallel(job, list(range(first, first + job["n"])), _run_shard)
    return {"records": records}


def job_check(job: dict) -> dict:
    return {"records": parallel(job, job["ids"], _check_shard)}


def _submit_shard(driver: Any, blocks: list[list[int]], job: dict) -> list[dict]:
    task, chunk, out = job["task"], job.get("chunk", 1000), []
    for block in blocks:
        for start in range(0, len(block), chunk):
            indices = block[start : start + chunk]
            task_ids = driver.submit_many(task, [task_args(task, i, job) for i in indices])
            out.extend({"i": i, "id": t} for i, t in zip(indices, task_ids, strict=True))
        out[-1]["tail"] = True  # the last task this submitter enqueued
    return out


def job_submit(job: dict) -> dict:
    """Enqueue `n` tasks in bulk: each submitter sends one contiguous block, in chunks."""
    first, n = job.get("first_index", 0), job["n"]
    submitters = job.get("procs", 1) * job.get("threads", 1)
    size = -(-n // submitters)
    blocks = [list(range(first + k, min(first + k + size, first + n))) for k in range(0, n, size)]
    t0 = now()
    records = sorted(parallel(job, blocks, _submit_shard), key=lambda r: r["i"])
    if any("error" in r for r in records):
        raise RuntimeError(next(r["error"] for r in records if "error" in r))
    tails = [r["id"] for r in records if r.get("tail")]
    return {"ids": [[r["i"], r["id"]] for r in records], "tails": tails, "seconds": now() - t0}


def job_drain(job: dict) -> dict:
    """Time a drain: from the first task seen taken to every task seen terminal."""
    driver, task, ids = make_driver(job["driver"]), job["task"], job["ids"]
    driver.connect()
    deadline = now() + job.get("deadline_s", 120)
    first_word = first_seen = driver.status(task, ids[0][1])[0]
    print("READY", flush=True)
    while first_word == PENDING and now() < deadline:
        time.sleep(0.002)
        first_word = driver.status(task, ids[0][1])[0]
    t_first = now()
    # The last tasks enqueued finish last: every submitter's last one, and the last five.
    tail = list(dict.fromkeys(job.get("tails", []) + [task_id for _, task_id in ids[-5:]]))
    while tail and now() < deadline:
        tail = [t for t in tail if driver.status(task, t)[0] not in TERMINAL]
        if tail:
            time.sleep(0.005)
    t_done = now()
    # The tail may finish before stragglers elsewhere: confirm all (or a sample, when only
    # settling a pre-fill), and wait for any left.
    checked = random.sample(ids, min(job["sample"], len(ids))) if job.get("sample") else ids
    records = job_check({**job, "ids": checked})["records"]
    left = stragglers = [r for r in records if r["word"] not in TERMINAL]
    while left and now() < deadline:
        time.sleep(0.02)
        for r in left:
            r["word"], r["info"] = driver.status(task, r["id"])
        left = [r for r in left if r["word"] not in TERMINAL]
        t_done = now()
    if job.get("verify"):
        _verify_results(driver, stragglers, job)
    return {"records": records, "t_first": t_first, "t_done": t_done, "first_seen": first_seen}


def job_prefill(job: dict) -> dict:
    t0 = now()
    make_driver(job["driver"]).prefill(job["n"])
    return {"seconds": now() - t0}


JOBS = {"run": job_run, "check": job_check, "submit": job_submit, "drain": job_drain, "prefill": job_prefill}


def main() -> None:
    job = json.loads(sys.stdin.read())
    result = JOBS[job["job"]](job)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    # Run the package's copy of this module, so spawned children find the job bodies there.
    from bench.loadgen import main as package_main

    package_main()
