"""The six scenarios. Each runs one system, repeats its measurement, checks every task it ran,
and adds figures to `out` (metric name -> list of per-repeat values)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bench import procs
from bench.procs import LoadGen
from bench.systems import CELERY_REDIS_DB, Celery, Running, System


@dataclass
class Settings:
    repeats: int = 3
    submitters: int = 32
    loadgen_procs: int = 2
    throughput_n: int = 2000
    throughput_poll_ms: float = 5
    stored_n: int = 100_000
    latency_n: int = 200
    latency_poll_ms: float = 2
    drain_n: int = 20_000
    burst_n: int = 200
    sleep_ms: int = 100
    images_n: int = 100
    task_timeout_s: float = 60
    # A run stops submitting after `run_cap_s`; a measurement is repeated only while its repeats
    # so far took less than `budget_s`, so one slow system cannot stretch the run for ever.
    run_cap_s: float = 6
    budget_s: float = 45

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            repeats=1, throughput_n=400, stored_n=5000, latency_n=60, drain_n=2000, burst_n=40, images_n=20, run_cap_s=5
        )


class Bench:
    """One system's measurements within a run: a load generator, settings and the figures."""

    def __init__(self, system: System, lg: LoadGen, settings: Settings, say: Callable[[str], None] = print) -> None:
        self.system, self.lg, self.s, self.say = system, lg, settings, say
        self.out: dict[str, Any] = {"checks": {}}
        self._index = 0

    def add(self, key: str, value: Any) -> None:
        self.out.setdefault(key, []).append(value)

    def repeats(self, key: str) -> Iterator[int]:
        """Yield repeat numbers: `settings.repeats` of them, fewer once `budget_s` is spent (for a
        peer only: taskserve's figures are the ones held to targets, so they always get them all)."""
        began = time.monotonic()
        for k in range(self.s.repeats):
            spent = time.monotonic() - began
            if k and spent / k + spent > self.s.budget_s and self.system.name != "taskserve":
                self.out.setdefault("repeats_cut", {})[key] = f"{k} of {self.s.repeats}"
                return
            yield k

    # -- helpers ---------------------------------------------------------------------------

    def run(
        self,
        running: Running,
        task: str,
        n: int,
        *,
        threads: int,
        mode: str = "poll",
        poll_ms: float = 5,
        window: int = 1,
        procs_: int | None = None,
    ) -> list[dict]:
        """Drive `n` tasks through the load generator; the records carry the runs logged meanwhile."""
        first, self._index = self._index, self._index + n
        procs_ = procs_ or self.s.loadgen_procs
        job = {
            "job": "run",
            "driver": running.driver,
            "task": task,
            "n": n,
            "first_index": first,
            "procs": procs_,
            "threads": max(1, threads // procs_),
            "mode": mode,
            "poll_ms": poll_ms,
            "window": window,
            "sleep_ms": self.s.sleep_ms,
            "deadline_s": 300,
            "task_timeout_s": self.s.task_timeout_s,
            "max_seconds": self.s.run_cap_s,
            "verify": True,
        }
        offset = running.exec_offset()
        records = self.lg(job)["records"]
        running.extra["stored"] = running.extra.get("stored", 0) + sum(1 for r in records if "id" in r)
        running.extra["runs"] = running.executions(offset)
        return records

    def verify(
        self,
        name: str,
        running: Running,
        task: str,
        records: list[dict],
        expected: int,
        *,
        runs: list[list[str]] | None = None,
    ) -> None:
        """Count tasks rejected, lost, failed, run twice or answered wrongly (the load generator
        fetched and checked the results: `ok` on a record).

        `runs` are the lines the tasks themselves logged (bench/services/execlog.py): each task
        that succeeded must appear exactly once. The ceiling runs nothing, so it logs nothing.
        """
        runs = running.extra.get("runs", []) if runs is None else runs
        every = 10 if name.startswith("s3") else 1  # a drain checks every tenth result
        ids = [[r["i"], r["id"]] for r in records if "id" in r]
        words = Counter(r.get("word") for r in records if "id" in r)
        executed = Counter(int(line[1]) for line in runs if line and line[0] == task and task in ("noop", "image"))
        succeeded = {r["i"] for r in records if r.get("word") == "success"}
        problems = {
            "rejected at submit": sum(1 for r in records if "id" not in r),
            "never finished": words["timeout"] + words["error"],
            "not success": sum(n for w, n in words.items() if w not in ("success", "timeout", "error")),
            "run twice": sum(1 for r in records if (r.get("info") or {}).get("attempts", 1) > 1)
            + sum(1 for i in succeeded if executed[i] > 1)
            + (max(0, len(runs) - len(ids)) if task == "sleep" else 0),
            "success never run": sum(1 for i in succeeded if executed[i] == 0)
            if self.system.name != "ceiling" and task != "sleep"
            else 0,
        }
        problems["wrong result"] = sum(1 for r in records if r.get("ok") is False and "get_error" not in r)
        problems["result fetch failed"] = sum(1 for r in records if "get_error" in r)
        problems["result not checked"] = sum(
            1 for r in records if r.get("word") == "success" and "ok" not in r and r["i"] % every == 0
        )
        size = f"{len(records)} tasks" if len(records) >= expected else f"{len(records)} of {expected} tasks: time cap"
        errors = [r.get("error") or (r.get("info") or {}).get("error") for r in records if r.get("word") != "success"]
        errors += [r["get_error"] for r in records if "get_error" in r]
        note = ", ".join(f"{k} {v}" for k, v in problems.items() if v) or "ok"
        if errors and errors[0]:
            note += f" (first error: {str(errors[0])[:100]})"
        self.out["checks"].setdefault(name, []).append(f"{note} [{size}]")

    def warm_up(self, running: Running) -> None:
        self.run(running, "noop", 64, threads=self.s.submitters, poll_ms=self.s.throughput_poll_ms)

    # -- scenarios 1, 2, 5, 6 share one start of the system -------------------------------

    def main_block(self, wanted: set[int]) -> None:
        """Scenarios 1, 2, 5, 6 (and 4's default variant where that is the same set-up) on one start."""
        running = self.system.start()
        try:
            mem0 = procs.redis_used_memory(CELERY_REDIS_DB) if isinstance(self.system, Celery) else 0
            self.warm_up(running)  # also waits for workers that boot after the API answers
            time.sleep(0.5)
            self.out["rss_idle"] = running.memory()
            if 2 in wanted:
                self.say("  2 latency")
                self.latency(running)
            if 5 in wanted and 5 in self.system.scenarios:
                self.say("  5 images")
                self.images(running)
            if 4 in wanted and self.s4_in_main:
                self.say("  4 concurrency (default)")
                self.concurrency("default", running)
            if wanted & {1, 6}:
                self.say("  1 throughput, fresh")
                self.throughput(running, "s1_fresh", options=self.system.name == "taskserve")
                self.out["rss_after_s1"] = running.memory()
            if 1 in wanted:
                self.say(f"  1 pre-fill {self.s.stored_n}")
                self.prefill(running)
                self.say("  1 throughput, stored")
                self.throughput(running, "s1_stored")
            if 6 in wanted:
                self.footprint(running, mem0)
        finally:
            running.stop()

    @property
    def s4_in_main(self) -> bool:
        # Celery needs `task_track_started` for scenario 4, which costs it elsewhere: a start of its own.
        return 4 in self.system.scenarios and not isinstance(self.system, Celery)

    def concurrency_variants(self, wanted: set[int]) -> list[str]:
        if 4 not in wanted or 4 not in self.system.scenarios:
            return []
        variants = self.system.concurrency_variants
        return [v for v in variants if v != "default"] if self.s4_in_main and wanted & {1, 2, 5, 6} else list(variants)

    def throughput(self, running: Running, key: str, options: bool = False) -> None:
        """Scenario 1; with ``options`` (taskserve), each repeat runs again with submit options in
        use right after, so the two figures are side by side (``{key}_options``)."""
        n = self.s.throughput_n
        for _ in self.repeats(key):
            for variant, run in ((key, running), *(((f"{key}_options", with_options(running)),) if options else ())):
                records = self.run(run, "noop", n, threads=self.s.submitters, poll_ms=self.s.throughput_poll_ms)
                self.add(variant, _rate(records))
                self.add(f"{variant}_polls", statistics.mean(r.get("polls", 0) for r in records) if records else None)
                self.verify(variant, running, "noop", records, n)

    def latency(self, running: Running) -> None:
        modes = ["poll"] + (["wait"] if self.system.name == "taskserve" or isinstance(self.system, Celery) else [])
        for mode in modes:
            for _ in self.repeats(f"s2_{mode}"):
                records = self.run(
                    running, "noop", self.s.latency_n, threads=1, procs_=1, mode=mode, poll_ms=self.s.latency_poll_ms
                )
                ms = [1000 * (r["t1"] - r["t0"]) for r in records if r.get("word") == "success"]
                cuts = statistics.quantiles(ms, n=100, method="inclusive")
                for p in (50, 90, 99):
                    self.add(f"s2_{mode}_p{p}", cuts[p - 1])
                self.verify(f"s2_{mode}", running, "noop", records, self.s.latency_n)

    def images(self, running: Running) -> None:
        for _ in self.repeats("s5"):
            records = self.run(running, "image", self.s.images_n, threads=8, poll_ms=self.s.throughput_poll_ms)
            self.add("s5_rate", _rate(records))
            self.verify("s5_images", running, "image", records, self.s.images_n)

    def prefill(self, running: Running) -> None:
        n, t0 = self.s.stored_n, time.monotonic()
        if isinstance(self.system, Celery):
            self.lg({"job": "prefill", "driver": running.driver, "n": n})
        elif not self.system.prefill_direct(running, n):
            submitted = self.lg(self._bulk_job(running, n, 10**9))
            if self.system.name != "ceiling":  # the ceiling's tasks are done on arrival
                self.lg(
                    {
                        "job": "drain",
                        "driver": running.driver,
                        "task": "noop",
                        "ids": submitted["ids"],
                        "sample": 1000,
                        "deadline_s": 600,
                        "procs": 2,
                        "threads": 4,
                    }
                )
        running.extra["stored"] = running.extra.get("stored", 0) + n
        self.out["prefill_s"] = time.monotonic() - t0

    def _bulk_job(self, running: Running, n: int, first: int) -> dict:
        """Bulk enqueue: `submit_many` in chunks of 1,000 over one connection; Celery, which has
        no bulk call and spends about a millisecond of CPU per `send_task`, from 4 submitters."""
        spread = {"procs": 2, "threads": 2} if isinstance(self.system, Celery) else {"procs": 1, "threads": 1}
        return {
            "job": "submit",
            "driver": running.driver,
            "task": "noop",
            "n": n,
            "first_index": first,
            "chunk": 1000,
            **spread,
        }

    def footprint(self, running: Running, mem0: int) -> None:
        stored = running.extra.get("stored", 0)
        size = self.system.store_bytes(running)
        if isinstance(self.system, Celery):
            size = procs.redis_used_memory(CELERY_REDIS_DB) - mem0
        if size is not None and stored:
            self.out["bytes_per_task"] = size / stored
            self.out["stored"] = stored
        if (db_only := self.system.store_bytes(running, wal=False)) is not None and stored:
            self.out["bytes_per_task_db"] = db_only / stored

    # -- scenario 3: bulk enqueue, then drain with two worker processes --------------------

    def drain(self, broker: str) -> None:
        """Scenario 3; for taskserve each repeat drains again with submit options in use
        (``s3_{broker}_options``), right after, on a fresh start."""
        key = f"s3_{broker}"
        for _ in self.repeats(key):
            self._drain(broker, key, False)
            if self.system.name == "taskserve":
                self._drain(broker, f"{key}_options", True)

    def _drain(self, broker: str, key: str, options: bool) -> None:
        n = self.s.drain_n
        running = self.system.start(broker=broker, workers=0)
        if options:
            running = with_options(running)
        workers: list[procs.Proc] = []
        try:
            first, self._index = self._index, self._index + n
            submitted = self.lg(self._bulk_job(running, n, first))
            watch = self.lg.open(
                {
                    "job": "drain",
                    "driver": running.driver,
                    "task": "noop",
                    "ids": submitted["ids"],
                    "tails": submitted["tails"],
                    "deadline_s": 300,
                    "procs": 2,
                    "threads": 4,
                    "verify": True,
                    "verify_every": 10,
                }
            )
            self.lg.wait_ready(watch)
            workers = self.system.start_workers(running, 2)
            out = self.lg.finish(watch)
            if out["first_seen"] != "pending":
                self.out["checks"].setdefault(key, []).append(
                    "warning: the first task was taken before the watch began"
                )
            self.add(key, n / (out["t_done"] - out["t_first"]))
            self.add(f"{key}_by_timestamps", _timestamp_rate(out["records"]))
            self.verify(key, running, "noop", out["records"], n, runs=running.executions(0))
        finally:
            for proc in workers:
                procs.stop(proc)
            running.stop()

    # -- scenario 4: many sleeping tasks at once ------------------------------------------

    def concurrency(self, variant: str, running: Running | None = None) -> None:
        n, key = self.s.burst_n, f"s4_{variant}"
        own = running is None
        running = running or self.system.start(concurrency=variant, track_started=True)
        try:
            if own:
                self.warm_up(running)
            for _ in self.repeats(key):
                threads = 8
                records = self.run(running, "sleep", n, threads=threads, window=-(-n // threads), poll_ms=20)
                self.add(f"{key}_makespan", _span(records))
                # Exact: the sleeps log their own start and end. Sampled: statuses seen in_progress.
                self.add(
                    f"{key}_peak",
                    _peak([(float(a), float(b)) for kind, a, b in running.extra["runs"] if kind == "sleep"]),
                )
                self.add(f"{key}_peak_sampled", _peak([(r["run0"], r["run1"]) for r in records if "run0" in r]))
                self.verify(key, running, "sleep", records, n)
        finally:
            if own:
                running.stop()


# Submit options of the "options in use" variants: a priority, two tags and an idempotency key
# per submit (per request for submit_many, its items keyed KEY#i): what SPEC §7 asks to cost
# the fast path no more than 10 %.
BENCH_OPTIONS = "priority=3&tag=team:bench&tag=run:7"


def with_options(running: Running) -> Running:
    """The same running system, driven with submit options in use."""
    return dataclasses.replace(running, driver={**running.driver, "options": BENCH_OPTIONS, "keyed": True})


def _rate(records: list[dict]) -> float:
    """Tasks that succeeded per second, from the first submit to the last success seen."""
    done = [r["t1"] for r in records if r.get("word") == "success"]
    return len(done) / (max(done) - min(r["t0"] for r in records)) if done else 0.0


def _span(records: list[dict]) -> float:
    return max(r["t1"] for r in records) - min(r["t0"] for r in records)


def _peak(intervals: list[tuple[Any, Any]]) -> int:
    """Most intervals open at one instant (an end and a start at the same time do not overlap)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _timestamp_rate(records: list[dict]) -> float | None:
    """Drain rate by the system's own clocks: first start (or completion) to last completion."""
    done = [t for r in records if (t := _ts((r.get("info") or {}).get("completed_at"))) is not None]
    began = [t for r in records if (t := _ts((r.get("info") or {}).get("started_at"))) is not None] or done
    if len(done) < len(records) or not done or max(done) <= min(began):
        return None
    return len(done) / (max(done) - min(began))
