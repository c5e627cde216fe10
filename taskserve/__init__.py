"""taskserve: serve model inference as durable async tasks.

Example:
    >>> import taskserve
    >>> @taskserve.service
    ... class Service:
    ...     @taskserve.task
    ...     def generate(self, prompt: str) -> str: ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._types import TERMINAL_STATUSES, TaskStatus
from .client import AsyncHTTPClient, AsyncTask, SyncHTTPClient, Task
from .exceptions import (
    AuthenticationError,
    ClientError,
    IdempotencyConflict,
    InvalidTransition,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    Retry,
    ServiceDefinitionError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TaskNotReady,
    TaskserveError,
    ValidationFailed,
    WebhookVerificationError,
)
from .reporting import progress
from .service import Endpoint, Service, api, service, task
from .webhooks import verify_webhook

__all__ = [
    "AsyncHTTPClient",
    "AsyncTask",
    "AuthenticationError",
    "ClientError",
    "Endpoint",
    "IdempotencyConflict",
    "InvalidTransition",
    "PayloadTooLarge",
    "QueueFull",
    "QueueUnavailable",
    "Retry",
    "Service",
    "ServiceDefinitionError",
    "SyncHTTPClient",
    "TERMINAL_STATUSES",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskNotFound",
    "TaskNotReady",
    "TaskStatus",
    "TaskserveError",
    "ValidationFailed",
    "WebhookVerificationError",
    "__version__",
    "api",
    "progress",
    "service",
    "task",
    "verify_webhook",
]
