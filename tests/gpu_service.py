"""Services that ask for GPUs; the tests read which GPUs each worker was given."""

from __future__ import annotations

import os

import taskserve


class _Visible:
    @taskserve.task
    def visible(self) -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@taskserve.service(resources={"gpu": 1})
class OneGpu(_Visible):
    pass


@taskserve.service(resources={"gpu": 2})
class TwoGpus(_Visible):
    pass


@taskserve.service(resources={"gpu": 0.5})
class HalfGpu(_Visible):
    pass
