"""Every error taskserve raises on purpose.

TaskserveError
├── ServiceDefinitionError     a service class or signature taskserve cannot serve
├── QueueError
│   ├── QueueUnavailable       the broker cannot be reached (HTTP 503)
│   └── TaskNotFound           no such task on this route (HTTP 404)
├── InvalidTransition          retry/cancel on a task in the wrong state (HTTP 409)
├── ValidationFailed           arguments do not match the signature (HTTP 422)
├── PayloadTooLarge            request body over the limit (HTTP 413)
├── ClientError                the client could not talk to the server
│   └── AuthenticationError    no API key, or one the server refuses (HTTP 401)
├── TaskNotReady               get() before the task finished
├── TaskFailed                 get() on a failed task; carries the remote error
├── TaskCancelled              get() on a cancelled task
├── Retry                      raised by task code to ask for another attempt
└── WebhookVerificationError   verify_webhook(): a webhook that is not signed with the secret, or too old
"""

from __future__ import annotations

from typing import Any


class TaskserveError(Exception):
    pass


class ServiceDefinitionError(TaskserveError, TypeError):
    pass


class QueueError(TaskserveError):
    pass


class QueueUnavailable(QueueError):
    pass


class TaskNotFound(QueueError, LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"No such task: {task_id!r}.")
        self.task_id = task_id


class InvalidTransition(TaskserveError):
    def __init__(self, message: str, status: Any = None) -> None:
        super().__init__(message)
        self.status = status


class IdempotencyConflict(TaskserveError):
    """An idempotency key already names a task of this route with other arguments (HTTP 409)."""

    def __init__(self, key: str, task_id: str) -> None:
        super().__init__(
            f"Idempotency key {key!r} was already used for task {task_id!r} with other arguments; "
            "use a new key for a new request, or send the same arguments to get that task back."
        )
        self.key = key
        self.task_id = task_id


class QueueFull(TaskserveError):
    """The route already holds its ``max_queue`` pending tasks; nothing was queued (HTTP 429).

    ``retry_after`` is the server's estimate, in seconds, of when there will be room, from
    how fast the route's queue has drained lately.
    """

    def __init__(self, message: str, retry_after: float | None = None, *, route: str = "", excess: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.route = route
        self.excess = excess  # how many pending tasks must go before this submit fits


class ValidationFailed(TaskserveError, ValueError):
    """Arguments that do not fit the endpoint's signature; ``detail`` lists each field."""

    def __init__(self, message: str, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or []


class PayloadTooLarge(TaskserveError):
    pass


class ClientError(TaskserveError):
    """The server answered with an error the client has no more specific exception for."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthenticationError(ClientError):
    """The server wants an API key and got none, or one it does not accept (HTTP 401).

    Give the client ``api_key=`` or set ``TASKSERVE_API_KEY``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, 401)


class _TaskOutcomeError(TaskserveError):
    def __init__(self, message: str, task: Any = None, status: Any = None) -> None:
        super().__init__(message)
        self.task = task
        self.status = status


class TaskNotReady(_TaskOutcomeError):
    pass


class TaskFailed(_TaskOutcomeError):
    """The task ended as ``failure``; ``error`` is the remote ``Type: message``."""

    @property
    def error(self) -> str:
        return str(self)


class TaskCancelled(_TaskOutcomeError):
    pass


class Retry(TaskserveError):
    """Raise from task code to run the task again after ``delay`` seconds.

    The retry counts against ``max_attempts``; past it the task ends as ``failure``.
    """

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"Retry requested in {delay}s")
        self.delay = delay


class WebhookVerificationError(TaskserveError, ValueError):
    """A webhook request that ``verify_webhook`` refuses: answer it 400 and do not act on it.

    The message says why: a missing header, a signature made with another secret (or over
    another body), or a timestamp outside the tolerance (a replayed request, or a clock far off).
    """
