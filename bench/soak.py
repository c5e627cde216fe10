"""A fault soak: many tasks of every kind while kill -9 hits workers, API servers and Redis.

    python bench/soak.py --tasks 400 --kills 12 --broker sqlite
    python bench/soak.py --tasks 400 --kills 12 --broker redis --seed 7

It starts, in a temporary directory, ``taskserve serve`` (the API with one worker), a
``taskserve worker`` host with two more, and for ``--broker redis`` a private
``redis-server`` with ``--appendonly yes --appendfsync always``. It submits N jobs of mixed
kinds (``bench/services/soak_service.py``) through taskserve's ``AsyncHTTPClient``, cancels
some, and meanwhile kills (SIGKILL) a worker, the API process, the worker host's supervisor
or Redis at random, restarting each one that does not restart itself. Then it checks:

- no accepted task lost: every submit answered 200 reaches a terminal state;
- none run twice to success: no input's task body returned twice, unless the process that
  returned first died (or Redis was down) before it could store the result;
- no wrong result: each result, error and cancel is what its input asks for;
- no terminal state changed: each first-seen terminal state is read again at the end;
- no process left behind: every process it started carries an environment marker (workers
  inherit it), none may remain once everything was stopped, and no worker may outlive its
  killed supervisor by more than 5 s.

Every job is submitted with task options (a priority, a tag), and half of them with an
idempotency key, as a careful user would: those resend the very same input after a lost
reply, and every submit of one must answer the same task (else a violation), so no input
of theirs may ever run twice to success. For the others a submit whose reply was lost (a
connection error or 503) may or may not have been stored: each of their submit requests
carries a fresh ``key``, so a lost reply that did create a task shows up as a run of an
input nobody was told about, which is counted as a duplicate, not as a violation. Exits 1 on any violation, keeping its
directory (logs, database) for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/soak.py`
    sys.path.insert(0, str(ROOT))

import taskserve  # noqa: E402
from bench.services.soak_service import colour  # noqa: E402
from bench.soak_cluster import LEASE, Cluster, Figures, Processes  # noqa: E402
from taskserve.exceptions import ClientError, InvalidTransition, QueueUnavailable, TaskNotFound  # noqa: E402

MAX_ATTEMPTS = 5
# kind -> weight; "cancel" jobs are slow tasks cancelled soon after their submit.
KINDS = {
    "quick": 30,
    "slow_sync": 12,
    "slow_async": 12,
    "failing": 8,
    "flaky": 10,
    "picture": 8,
    "checksum": 8,
    "cancel": 12,
}


# -- jobs ----------------------------------------------------------------------------------


@dataclass
class Submit:
    """One submit request: its input ``key`` is never reused."""

    key: str
    task_id: str | None = None
    refused: str = ""  # why we don't know whether it was stored (connection lost, 503)
    cancel_answer: str = ""  # "cancelled", "terminal" or "unknown"
    first_terminal: dict[str, Any] | None = None
    lost: str = ""


@dataclass
class Job:
    index: int
    kind: str  # a KINDS key
    route: str  # the task it calls
    args: dict[str, Any]
    submits: list[Submit] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # submit options (``.options(...)``)

    @property
    def keyed(self) -> bool:
        """Submitted with an idempotency key: every resend carries the same input."""
        return "idempotency_key" in self.options

    @property
    def accepted(self) -> Submit | None:
        return next((s for s in self.submits if s.task_id is not None), None)


def make_jobs(n: int, rng: random.Random, uploads: Path, marks: Path) -> list[Job]:
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=n)
    jobs = []
    for i, kind in enumerate(kinds):
        route, args = kind, dict[str, Any]()
        if kind == "quick":
            args = {"x": rng.randrange(1000)}
        elif kind in ("slow_sync", "slow_async"):
            args = {"seconds": round(rng.uniform(0.1, 0.8), 2)}
        elif kind == "flaky":
            args = {"marks": str(marks)}
        elif kind == "picture":
            args = {"size": rng.randrange(4, 48)}
        elif kind == "checksum":
            path = uploads / f"{i}.bin"
            path.write_bytes(rng.randbytes(rng.randrange(1, 64 * 1024)))
            args = {"upload": path}
        elif kind == "cancel":
            route = rng.choice(["slow_sync", "slow_async"])
            args = {"seconds": round(rng.uniform(2.0, 8.0), 2)}
        options: dict[str, Any] = {"priority": rng.choice([0, 0, 1, 5]), "tags": {"soak": kind}}
        if rng.random() < 0.5:
            options["idempotency_key"] = f"soak-{i}"
        jobs.append(Job(i, kind, route, args, options=options))
    return jobs


class Driver:
    """Submits and follows the jobs through the client, as a user's program would."""

    def __init__(self, client: taskserve.AsyncHTTPClient, rng: random.Random, deadline: float) -> None:
        self.client = client
        self.rng = rng
        self.deadline = deadline
        self.started = 0
        self.done = 0
        self.errors: Counter[str] = Counter()
        self.server_errors: dict[int, str] = {}  # status code -> the first message

    async def run(self, job: Job, slots: asyncio.Semaphore) -> None:
        async with slots:
            self.started += 1
            try:
                await self._run(job)
            finally:
                self.done += 1

    def _note(self, exc: Exception) -> str:
        reason = type(exc).__name__
        if isinstance(exc, ClientError) and exc.status_code is not None:
            reason += f" {exc.status_code}"
        self.errors[reason] += 1
        if isinstance(exc, ClientError) and exc.status_code is not None and exc.status_code >= 500:
            self.server_errors.setdefault(exc.status_code, str(exc))  # a server error is always a bug
        return reason

    async def _cancel(self, task: Any, submit: Submit) -> None:
        """Cancel, retrying as a user would; a 409 after an unanswered try says nothing."""
        for _ in range(20):
            try:
                submit.cancel_answer = (await task.cancel()).value
                return
            except InvalidTransition:
                submit.cancel_answer = "unknown" if submit.cancel_answer else "terminal"
                return
            except (ClientError, QueueUnavailable) as exc:
                self._note(exc)
                submit.cancel_answer = "unknown"
                await asyncio.sleep(0.2)

    async def _run(self, job: Job) -> None:
        endpoint = getattr(self.client, job.route).options(**job.options)
        task = None
        while task is None:
            if time.monotonic() > self.deadline:
                return
            submit = Submit(key=f"j{job.index}" if job.keyed else f"j{job.index}.{len(job.submits)}")
            job.submits.append(submit)
            try:
                task = await endpoint.submit(key=submit.key, **job.args)
                submit.task_id = task.id
            except (ClientError, QueueUnavailable) as exc:
                submit.refused = self._note(exc)
                await asyncio.sleep(self.rng.uniform(0.1, 0.5))
        if job.kind == "cancel":
            await asyncio.sleep(self.rng.uniform(0.0, 1.5))
            await self._cancel(task, submit)
        while time.monotonic() < self.deadline:
            try:
                if (await task.wait(timeout=min(30.0, max(0.1, self.deadline - time.monotonic())))).is_terminal:
                    submit.first_terminal = await task.status()
                    return
            except TaskNotFound:
                submit.lost = "404 while waiting"
                return
            except (ClientError, QueueUnavailable) as exc:
                self._note(exc)
                await asyncio.sleep(0.2)


# -- checks --------------------------------------------------------------------------------


def expected_result(job: Job, key: str) -> Any:
    if job.route == "quick":
        return job.args["x"] ** 2 + len(key)
    if job.route == "slow_sync":
        return f"sync:{key}"
    if job.route == "slow_async":
        return f"async:{key}"
    if job.route == "flaky":
        return f"flaky:{key}"
    if job.route == "checksum":
        return f"{key}:{hashlib.sha256(Path(job.args['upload']).read_bytes()).hexdigest()}"
    return None


async def check_result(job: Job, submit: Submit, task: Any) -> str | None:
    """Why the stored result of a successful task is wrong, or None."""
    result = await task.get()
    if job.route == "picture":
        size = job.args["size"]
        if result.size != (size, size) or result.convert("RGB").getpixel((0, 0)) != colour(submit.key):
            return f"picture {result.size} {result.getpixel((0, 0))}"
        return None
    expected = expected_result(job, submit.key)
    return None if result == expected else f"{result!r} != {expected!r}"


def outcome_problem(job: Job, submit: Submit, status: dict[str, Any]) -> str | None:
    """Why a terminal status is not one this input may end in, or None."""
    value, error = status["status"], status.get("error") or ""
    worker_lost = value == "failure" and error.startswith("WorkerLost") and status["attempts"] >= MAX_ATTEMPTS
    if job.kind == "cancel":
        if submit.cancel_answer == "cancelled" and value != "cancelled":
            return f"cancel answered 'cancelled' but the task ended {value}"
        if submit.cancel_answer == "terminal" and value == "cancelled":
            return "cancel answered 409 (already finished) but the task ended cancelled"
        return None if value in ("success", "cancelled") or worker_lost else f"ended {value}: {error}"
    if value == "cancelled":
        return "cancelled, though nobody cancelled it"
    if job.kind == "failing":
        return None if error == f"ValueError: bad {submit.key}" or worker_lost else f"ended {value}: {error!r}"
    if value != "success":
        return None if worker_lost else f"ended {value}: {error!r}"
    if job.kind == "flaky" and status["attempts"] < 2:
        return f"succeeded in {status['attempts']} attempt(s), though its first run raised an error in retry_on"
    return None


@dataclass
class Run:
    event: str
    pid: int
    at: float


def read_runs(path: Path) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = defaultdict(list)
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                runs[parts[2]].append(Run(parts[0], int(parts[3]), float(parts[4])))
    return runs


def excused(run: Run, figures: Figures) -> str | None:
    """Why a run that returned may have been stored by nobody: its process died, or Redis did."""
    died = figures.dead.get(run.pid)
    if died is not None and died >= run.at - 0.01:
        return "its process died"
    for down, up in figures.outages:
        if down - 1.0 <= run.at <= up + LEASE + 2.0:
            return "Redis was down"
    return None


async def check(
    jobs: list[Job], client: taskserve.AsyncHTTPClient, runs: dict[str, list[Run]], figures: Figures
) -> dict[str, int]:
    tally: Counter[str] = Counter()
    v = figures.violations
    for job in jobs:
        submit = job.accepted
        answered = {other.task_id for other in job.submits if other.task_id is not None}
        if job.keyed and len(answered) > 1:
            v.append(f"idempotency key of job {job.index} answered {len(answered)} tasks: {sorted(answered)}")
        if job.keyed:
            tally["resent with its idempotency key"] += len(job.submits) - 1
        for other in job.submits:
            if job.keyed:
                break  # one input for every resend: a second task of it would run it twice (checked below)
            if other.task_id is None and any(r.event == "start" for r in runs.get(other.key, [])):
                tally["stored though the reply was lost (duplicates)"] += 1
        if submit is None:
            v.append(f"job {job.index} ({job.kind}) was never accepted before the deadline")
            continue
        assert submit.task_id is not None
        task = getattr(client, job.route).task(submit.task_id)
        if submit.lost:
            v.append(f"task lost: {submit.key} {submit.task_id} ({submit.lost})")
            continue
        try:
            status = await task.status()
        except TaskNotFound:
            v.append(f"task lost: {submit.key} {submit.task_id} (404 at the end)")
            continue
        first = submit.first_terminal
        if first is None:
            v.append(f"task never finished: {submit.key} {submit.task_id} is {status['status']}")
            continue
        keep = ("status", "completed_at", "error")
        if any(first[k] != status[k] for k in keep):
            v.append(f"terminal state changed: {submit.key} {[first[k] for k in keep]} -> {[status[k] for k in keep]}")
        tally[f"ended {status['status']}"] += 1
        planned = 2 if job.kind == "flaky" and status["status"] == "success" else 1
        tally["ran again after a kill (attempts beyond the planned)"] += status["attempts"] > planned
        if (problem := outcome_problem(job, submit, status)) is not None:
            v.append(f"wrong outcome: {job.kind} {submit.key} {submit.task_id}: {problem}")
        elif status["status"] == "failure" and (status.get("error") or "").startswith("WorkerLost"):
            tally["failed after losing its worker 5 times"] += 1
        if status["status"] == "success":
            if (problem := await check_result(job, submit, task)) is not None:
                v.append(f"wrong result: {job.kind} {submit.key}: {problem}")
            if not any(r.event == "end" for r in runs.get(submit.key, [])):
                v.append(f"wrong result: {submit.key} succeeded, but no run of it returned")
        returned = [r for r in runs.get(submit.key, []) if r.event == "end"]
        for run in returned[:-1]:  # each return but the last must have been cut off before its store
            reason = excused(run, figures)
            if reason is None:
                v.append(
                    f"ran twice to success: {submit.key} {submit.task_id} returned in pid {run.pid} at "
                    f"{run.at:.3f} and again in {[(r.pid, round(r.at, 3)) for r in returned[1:]]}"
                )
            else:
                tally[f"returned more than once ({reason})"] += 1
    return dict(tally)


# -- the run -------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, procs: Processes, run_log: Path, figures: Figures) -> dict[str, Any]:
    rng = random.Random(args.seed)
    cluster = Cluster(procs, args.broker, rng, figures)
    (procs.workdir / "uploads").mkdir()
    (procs.workdir / "marks").mkdir()
    jobs = make_jobs(args.tasks, rng, procs.workdir / "uploads", procs.workdir / "marks")
    await cluster.start()
    began = time.monotonic()
    deadline = began + args.max_seconds
    async with taskserve.AsyncHTTPClient(cluster.url) as client:
        driver = Driver(client, rng, deadline)
        slots = asyncio.Semaphore(args.in_flight)
        runners = [asyncio.create_task(driver.run(job, slots)) for job in jobs]
        try:
            kinds = cluster.kill_kinds()
            plan = rng.sample(kinds, len(kinds)) + [rng.choice(kinds) for _ in range(max(0, args.kills - len(kinds)))]
            for i, what in enumerate(plan[: args.kills]):
                # Spread the kills over the run: the i-th once that share of the jobs has started.
                while driver.started < (i + 1) * len(jobs) / (args.kills + 1) and time.monotonic() < deadline:
                    cluster.check_orphans()
                    await asyncio.sleep(0.05)
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                await cluster.kill(what)
                procs.reap()
                cluster.check_orphans()
            while driver.done < len(jobs) and time.monotonic() < deadline:
                cluster.check_orphans()
                await asyncio.sleep(0.1)
        finally:  # also when interrupted: no request may outlive the client
            for runner in runners:
                runner.cancel()
            results = await asyncio.gather(*runners, return_exceptions=True)
        for error in results:
            if isinstance(error, Exception):
                figures.violations.append(f"the soak's own driver failed: {error!r}")
        duration = time.monotonic() - began
        for code, message in driver.server_errors.items():
            figures.violations.append(f"HTTP {code} answered {driver.errors[f'ClientError {code}']} time(s): {message}")
        await cluster.http_up("/healthz")
        tally = await check(jobs, client, read_runs(run_log), figures)
    await cluster.stop()
    submits = [s for job in jobs for s in job.submits]
    return {
        "broker": args.broker,
        "seed": args.seed,
        "jobs": len(jobs),
        "jobs by kind": dict(Counter(job.kind for job in jobs)),
        "submit requests": len(submits),
        "accepted": sum(s.task_id is not None for s in submits),
        "submits without an answer (resent; a new input unless keyed)": sum(s.task_id is None for s in submits),
        "cancel answers": dict(Counter(s.cancel_answer for j in jobs if j.kind == "cancel" for s in j.submits[-1:])),
        "client errors seen": dict(driver.errors),
        "kills": dict(figures.kills),
        "workers orphaned by a supervisor kill (each must exit within 5 s)": figures.orphaned,
        "API restarts: seconds until it answered again (max)": _spread(figures.api_downtime),
        "Redis restarts: seconds down (max)": _spread(figures.redis_downtime),
        "duration (s)": round(duration, 1),
        **tally,
    }


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{sum(values) / len(values):.2f} mean ({max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=400, help="jobs to submit")
    parser.add_argument("--kills", type=int, default=12, help="kill -9s, spread over the run")
    parser.add_argument("--broker", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--seed", type=int, default=None, help="the random seed (printed; reuse it to repeat a run)")
    parser.add_argument("--in-flight", type=int, default=48, help="jobs followed at once")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="give up waiting after this long")
    parser.add_argument("--keep", action="store_true", help="keep the working directory even without violations")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    if args.broker == "redis" and shutil.which("redis-server") is None:
        print("--broker redis needs the redis-server program on PATH", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="taskserve-soak-"))
    run_log = workdir / "runs.log"
    procs = Processes(workdir, run_log)
    figures = Figures()
    print(f"soak: {args.tasks} jobs, {args.kills} kills, broker {args.broker}, seed {args.seed}, in {workdir}")

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell started us ignoring it
    ok = False
    try:
        try:
            report = asyncio.run(soak(args, procs, run_log, figures))
        except KeyboardInterrupt:
            print("interrupted: stopping every process the soak started")
            return 130
        width = max(map(len, report))
        lines = [f"  {name:<{width}}  {value}" for name, value in report.items()]
        lines += [f"VIOLATION {violation}" for violation in figures.violations]
        lines.append(f"violations: {len(figures.violations)}")
        print("\n".join(lines))
        (workdir / "report.txt").write_text("\n".join(lines) + "\n")  # kept with the logs when it failed
        ok = not figures.violations
    finally:
        procs.kill_everything()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs and store kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
