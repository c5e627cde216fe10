"""Benchmark taskserve against a ceiling, BentoML and Celery in one run, with one load generator.

    python bench/run.py                      # the full table (6–8 minutes on 2 cores)
    python bench/run.py --quick              # smaller counts, one repeat (about a minute)
    python bench/run.py --only taskserve,ceiling --scenarios 1,2

Peers are installed into bench/.venvs/ on first use. Figures, ratios and checks are printed and
written to bench/results/ (latest.md, latest.json and a time-stamped copy).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import own, procs, report
from bench.procs import LoadGen, Unavailable
from bench.scenarios import Bench, Settings
from bench.systems import CELERY_REDIS_DB, CELERY_REQUIREMENTS, OPT_IN, TS_REDIS_DB, all_systems

T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts and one repeat")
    parser.add_argument(
        "--only",
        default="",
        help="systems, comma-separated: ceiling,taskserve,bentoml,celery (or celery-solo, celery-prefork);"
        " bentoml-2w runs only when named",
    )
    parser.add_argument(
        "--scenarios",
        default="1,2,3,4,5,6,7,8",
        help="scenario numbers, comma-separated (7: batching a real model, 8: taskserve's clients; taskserve only)",
    )
    parser.add_argument("--repeats", type=int, help="repeats of every measurement (default 3, 1 with --quick)")
    return parser.parse_args(argv)


def loadgen_python() -> Path:
    """The load generator runs where Celery's client is installed (its HTTP client is stdlib)."""
    try:
        return procs.ensure_venv("celery", CELERY_REQUIREMENTS) / "bin" / "python"
    except Unavailable as exc:
        say(f"Celery's venv is unavailable ({exc}); the load generator runs in the project venv")
        return procs.TASKSERVE_VENV / "bin" / "python"


def busy_fraction(seconds: float = 1.0) -> float:
    """How much of the machine's CPU was in use over `seconds`, before the bench starts anything."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


WATCH = procs.CpuWatch()
INTERFERENCE: dict[str, float] = {}


def guarded(what: str, name: str, errors: dict[str, str], fn: object, *args: object) -> None:
    say(f"{name}: {what}")
    began, foreign = time.monotonic(), WATCH.foreign
    try:
        fn(*args)  # type: ignore[operator]
    except Unavailable as exc:
        errors[name] = "; ".join(filter(None, [errors.get(name), f"{what}: {exc}"]))
        say(f"{name}: skipped {what}: {exc}")
    except Exception as exc:  # one system failing must not end the run for the others
        errors[name] = "; ".join(filter(None, [errors.get(name), f"{what} failed: {exc!r}"]))
        say(f"{name}: {what} failed: {exc!r}\n{traceback.format_exc(limit=4)}")
    finally:
        share = (WATCH.foreign - foreign) / ((os.cpu_count() or 1) * (time.monotonic() - began))
        if share > 0.05:
            INTERFERENCE[f"{name}: {what}"] = round(share, 3)
            say(f"warning: other processes used {share:.0%} of the CPU during {name}: {what}")


def exit_on_signal(signum: int, frame: object) -> None:
    # SIGTERM (`timeout`, a CI runner) would otherwise end the run without its `finally` blocks,
    # leaving the servers and workers it started running.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on_signal)
    args = parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.repeats:
        settings.repeats = args.repeats
    wanted = {int(x) for x in args.scenarios.split(",") if x.strip()}
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    systems = [
        s
        for s in all_systems()
        if s.name in only or (s.name.startswith("celery") and "celery" in only) or (not only and s.name not in OPT_IN)
    ]
    say(f"systems {', '.join(s.name for s in systems)}; scenarios {sorted(wanted)}; {settings}")

    busy = busy_fraction()
    if busy > 0.15:
        say(f"warning: {busy:.0%} of the CPU was busy before the bench started; figures will be lower and noisier")
    WATCH.start()
    lg = LoadGen(loadgen_python())
    skipped: dict[str, str] = {}
    ready = []
    for system in systems:
        try:
            system.prepare()
            ready.append(system)
        except Unavailable as exc:
            skipped[system.name] = str(exc)
            say(f"{system.name}: skipped: {exc}")

    benches = {s.name: Bench(s, lg, settings, say) for s in ready}
    try:
        for system in ready:
            if shared := sorted(wanted & {1, 2, 5, 6} & system.scenarios):
                what = "scenario" + ("s " if len(shared) > 1 else " ") + ", ".join(map(str, shared))
                guarded(what, system.name, skipped, benches[system.name].main_block, wanted)
        if 3 in wanted:
            for system in ready:
                for broker in system.drains:
                    guarded(f"scenario 3 on {broker}", system.name, skipped, benches[system.name].drain, broker)
        for system in ready:
            for variant in benches[system.name].concurrency_variants(wanted):
                guarded(f"scenario 4 ({variant})", system.name, skipped, benches[system.name].concurrency, variant)
        if "taskserve" in benches:
            out = benches["taskserve"].out
            if 7 in wanted:
                guarded("scenario 7 (batching a real model)", "taskserve", skipped, own.batching, out, args.quick)
            if 8 in wanted:
                guarded("scenario 8 (clients)", "taskserve", skipped, own.clients, out, args.quick)
    finally:
        for db in (TS_REDIS_DB, CELERY_REDIS_DB):
            try:
                procs.redis(db, "FLUSHDB")
            except OSError:
                pass

    results = {name: bench.out for name, bench in benches.items()}
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
        "seconds": round(time.monotonic() - T0, 1),
        "cpu_busy_before": round(busy, 3),
        "cpu_used_by_others": INTERFERENCE,
    }
    WATCH.stop()
    print()
    print(report.write(results, [s.name for s in systems if s.name in results], skipped, settings, wanted, meta))
    say(f"done; written to {procs.RESULTS}/latest.md and latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
