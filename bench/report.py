"""The table of figures, the targets as ratios, and the files written to bench/results/."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from bench.procs import RESULTS
from bench.scenarios import Settings

Results = dict[str, dict[str, Any]]


def rows(s: Settings) -> list[tuple[int, str, str, str]]:
    """(scenario, metric key, label, number format) for every line of the table."""
    k = f"{s.stored_n // 1000}k"
    return [
        (1, "s1_fresh", f"1 throughput {s.throughput_n} noop, fresh (tasks/s)", "{:.0f}"),
        (1, "s1_fresh_options", "1 the same, submit options in use (tasks/s)", "{:.0f}"),
        (1, "s1_stored", f"1 throughput {s.throughput_n} noop, {k} stored (tasks/s)", "{:.0f}"),
        (1, "prefill_s", f"1 pre-fill of {k} stored tasks (s)", "{:.1f}"),
        (2, "s2_poll_p50", f"2 latency p50, poll every {s.latency_poll_ms:g} ms (ms)", "{:.2f}"),
        (2, "s2_poll_p90", "2 latency p90, poll (ms)", "{:.2f}"),
        (2, "s2_poll_p99", "2 latency p99, poll (ms)", "{:.2f}"),
        (2, "s2_wait_p50", "2 latency p50, wait/long poll (ms)", "{:.2f}"),
        (2, "s2_wait_p90", "2 latency p90, wait (ms)", "{:.2f}"),
        (2, "s2_wait_p99", "2 latency p99, wait (ms)", "{:.2f}"),
        (3, "s3_sqlite", f"3 drain {s.drain_n} on SQLite, 2 workers (tasks/s)", "{:.0f}"),
        (3, "s3_sqlite_options", "3 the same, submit options in use (tasks/s)", "{:.0f}"),
        (3, "s3_redis", f"3 drain {s.drain_n} on Redis, 2 workers (tasks/s)", "{:.0f}"),
        (3, "s3_redis_options", "3 the same, submit options in use (tasks/s)", "{:.0f}"),
        (4, "s4_default_makespan", f"4 makespan {s.burst_n} x sleep({s.sleep_ms}), default (s)", "{:.2f}"),
        (4, "s4_default_peak", "4 peak running, default", "{:.0f}"),
        (4, "s4_c8_makespan", f"4 makespan {s.burst_n} x sleep({s.sleep_ms}), 8 per worker (s)", "{:.2f}"),
        (4, "s4_c8_peak", "4 peak running, 8 per worker", "{:.0f}"),
        (5, "s5_rate", f"5 images {s.images_n} x 256x256 PNG (tasks/s)", "{:.0f}"),
        (6, "rss_idle.main", "6 RSS idle, main process (MB)", "{:.0f}"),
        (6, "rss_idle.workers", "6 RSS idle, workers together (MB)", "{:.0f}"),
        (6, "rss_after_s1.main", "6 RSS after scenario 1, main (MB)", "{:.0f}"),
        (6, "rss_after_s1.workers", "6 RSS after scenario 1, workers (MB)", "{:.0f}"),
        (6, "bytes_per_task_db", "6 store bytes per stored task, database file", "{:.0f}"),
        (6, "bytes_per_task", "6 store bytes per stored task, with -wal / Redis", "{:.0f}"),
        (7, "s7_model_1", "7 MiniLM alone, batch 1 (sentences/s)", "{:.1f}"),
        (7, "s7_model_64", "7 MiniLM alone, batch 64 (sentences/s)", "{:.1f}"),
        (7, "s7_batched", "7 MiniLM through taskserve, batched (sentences/s)", "{:.1f}"),
        (7, "s7_unbatched", "7 MiniLM through taskserve, unbatched (sentences/s)", "{:.1f}"),
        *[(8, f"s8_async_{n}", f"8 AsyncHTTPClient shared by {n} (tasks/s)", "{:.0f}") for n in (1, 8, 64, 256)],
        *[(8, f"s8_sync_{n}", f"8 SyncHTTPClient shared by {n} threads (tasks/s)", "{:.0f}") for n in (1, 8, 64, 256)],
        (8, "s8_map", "8 map() over no-op tasks, end to end (tasks/s)", "{:.0f}"),
        (8, "s8_map_requests", "8 map(): HTTP requests it took", "{:.0f}"),
    ]


def _get(result: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(result, dict) or part not in result:
            return None
        result = result[part]
    return result


def median(result: dict | None, key: str) -> float | None:
    value = _get(result or {}, key)
    if isinstance(value, list):
        value = [v for v in value if v is not None]
        return statistics.median(value) if value else None
    return value


def cell(result: dict | None, key: str, fmt: str) -> str:
    value = _get(result or {}, key)
    if value is None:
        return "–"
    if isinstance(value, list):
        value = [v for v in value if v is not None]
        if not value:
            return "–"
        if len(value) == 1:
            return fmt.format(value[0])
        return f"{fmt.format(statistics.median(value))} ({fmt.format(min(value))}–{fmt.format(max(value))})"
    return fmt.format(value)


def targets(res: Results) -> list[tuple[str, str, str, str]]:
    """(target, required, measured, verdict): the goals taskserve is held to, against its peers."""
    ts, bt, ce = res.get("taskserve"), res.get("bentoml"), res.get("ceiling")
    celery_redis = [m for name in ("celery-solo", "celery-prefork") if (m := median(res.get(name), "s3_redis"))]
    lines = []

    def ratio(
        label: str, a: float | None, b: float | None, need: float | None, fmt: str = "{:.2f}x", at_most: bool = False
    ) -> None:
        if a is None or b is None or not b:
            lines.append((label, _need(need, at_most, fmt), "–", "not measured"))
            return
        r = a / b
        verdict = "info" if need is None else ("PASS" if (r <= need if at_most else r >= need) else "FAIL")
        lines.append((label, _need(need, at_most, fmt), fmt.format(r), verdict))

    ratio("1 fresh: taskserve / BentoML", median(ts, "s1_fresh"), median(bt, "s1_fresh"), 2)
    ratio("1 stored: taskserve / BentoML", median(ts, "s1_stored"), median(bt, "s1_stored"), 7)
    ratio("1 taskserve stored / fresh", median(ts, "s1_stored"), median(ts, "s1_fresh"), 0.85)
    ratio("1 fresh: taskserve / ceiling", median(ts, "s1_fresh"), median(ce, "s1_fresh"), None, "{:.0%}")
    ratio("1 stored: taskserve / ceiling", median(ts, "s1_stored"), median(ce, "s1_stored"), None, "{:.0%}")
    ratio("1 fresh: BentoML / ceiling", median(bt, "s1_fresh"), median(ce, "s1_fresh"), None, "{:.0%}")
    ratio("1 stored: BentoML / ceiling", median(bt, "s1_stored"), median(ce, "s1_stored"), None, "{:.0%}")
    ratio("2 p50 poll: taskserve / BentoML", median(ts, "s2_poll_p50"), median(bt, "s2_poll_p50"), 0.5, at_most=True)
    ratio("2 p50 wait: taskserve (ms)", median(ts, "s2_wait_p50"), 1.0, 3.5, "{:.2f} ms", at_most=True)
    ratio("3 SQLite drain: taskserve (tasks/s)", median(ts, "s3_sqlite"), 1.0, 5000, "{:.0f}")
    ratio("3 Redis drain: taskserve / best Celery", median(ts, "s3_redis"), max(celery_redis, default=None), 2)
    ratio("1 fresh: with options / without", median(ts, "s1_fresh_options"), median(ts, "s1_fresh"), 0.9, "{:.0%}")
    ratio(
        "3 SQLite drain: with options / without",
        median(ts, "s3_sqlite_options"),
        median(ts, "s3_sqlite"),
        0.9,
        "{:.0%}",
    )
    ratio(
        "3 Redis drain: with options / without", median(ts, "s3_redis_options"), median(ts, "s3_redis"), 0.9, "{:.0%}"
    )
    ratio("7 batched / model alone at 64", median(ts, "s7_batched"), median(ts, "s7_model_64"), 0.7, "{:.0%}")
    ratio("7 batched / unbatched", median(ts, "s7_batched"), median(ts, "s7_unbatched"), 3)
    ratio("7 model alone: batch 64 / batch 1", median(ts, "s7_model_64"), median(ts, "s7_model_1"), None)
    ratio("8 AsyncHTTPClient: 256 / 8 callers", median(ts, "s8_async_256"), median(ts, "s8_async_8"), 0.9)
    ratio("8 SyncHTTPClient: 256 / 8 threads", median(ts, "s8_sync_256"), median(ts, "s8_sync_8"), None)
    ratio("8 map() (tasks/s)", median(ts, "s8_map"), 1.0, 5000, "{:.0f}")
    return lines


def _need(need: float | None, at_most: bool, fmt: str) -> str:
    if need is None:
        return "(info)"
    return ("≤ " if at_most else "≥ ") + fmt.format(need)


def table(res: Results, systems: list[str], s: Settings, wanted: set[int]) -> list[list[str]]:
    header = ["metric", *systems]
    body = [
        [label, *(cell(res.get(name), key, fmt) for name in systems)] for sc, key, label, fmt in rows(s) if sc in wanted
    ]
    body = [line for line in body if any(c != "–" for c in line[1:])]
    return [header, *body]


def render_text(grid: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in grid
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(grid: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in grid]
    lines.insert(1, "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(grid[0]))) + "|")
    return "\n".join(lines)


def checks_text(res: Results) -> list[str]:
    lines = []
    for name, result in res.items():
        for scenario, notes in (result.get("checks") or {}).items():
            bad = [n for n in notes if not n.startswith("ok")]
            sizes = ", ".join(n.split("[")[-1].rstrip("]") for n in notes)
            if len(set(sizes.split(", "))) == 1:
                sizes = sizes.split(", ")[0]
            summary = "; ".join(sorted(set(bad))) if bad else f"ok in all {len(notes)} runs [{sizes}]"
            lines.append(f"{name:15} {scenario:22} {summary}")
        for key, cut in (result.get("repeats_cut") or {}).items():
            lines.append(f"{name:15} {key:22} repeated {cut} times only, to stay within the time budget")
    return lines


def write(res: Results, systems: list[str], skipped: dict[str, str], s: Settings, wanted: set[int], meta: dict) -> str:
    grid = table(res, systems, s, wanted)
    goal_lines = targets(res)
    text = [render_text(grid), "", "Targets (medians over repeats):"]
    text += [f"  {t:42} required {r:>9}  measured {m:>10}  {v}" for t, r, m, v in goal_lines]
    text += ["", "Checks (every task: lost, duplicated, failed, run twice, wrong result):"] + [
        "  " + c for c in checks_text(res)
    ]
    if skipped:
        text += ["", "Skipped:"] + [f"  {name}: {why}" for name, why in skipped.items()]
    others = meta.get("cpu_used_by_others") or {}
    if others:
        text += ["", "Other processes were using the CPU (these figures are lower and noisier than they should be):"]
        text += [f"  {step}: {share:.0%} of the machine" for step, share in others.items()]
    about = f"`{meta['command']}` — {meta['machine']}; {meta['seconds']:.0f} s"
    about += f"; CPU busy before the start {meta['cpu_busy_before']:.0%}"
    md = [f"# Benchmark {meta['started']}", "", about, "", render_markdown(grid), ""]
    md += ["## Targets", "", "| target | required | measured | verdict |", "| --- | ---: | ---: | --- |"]
    md += [f"| {t} | {r} | {m} | {v} |" for t, r, m, v in goal_lines]
    md += ["", "## Checks", "", "```", *checks_text(res), "```"]
    if skipped:
        md += ["", "## Skipped", ""] + [f"- **{name}**: {why}" for name, why in skipped.items()]
    if others:
        md += ["", "## Other load on the machine", ""] + [
            f"- {step}: {share:.0%} of the CPU" for step, share in others.items()
        ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"meta": meta, "settings": s.__dict__, "results": res, "skipped": skipped, "targets": goal_lines}
    for name in (f"bench-{stamp}", "latest"):
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
        (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    return "\n".join(text)
