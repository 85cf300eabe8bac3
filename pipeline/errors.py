"""Errors that cross the stage boundary.

A stage raises `StageError` with one sentence a user can act on; the orchestrator stores that sentence as the
job's `error`. Any other exception is a bug: it is logged with its traceback and the user sees a generic
sentence for the stage that failed.
"""


class StageError(Exception):
    """A stage failed for a reason the user should read (the message is shown as is)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        # True when the orchestrator should run the stage again after a pause (an overloaded service). A backend
        # that retries by itself (the xAI client) raises its final error with False, so retries do not multiply.
        self.retryable = retryable


class StageUnavailable(StageError):
    """The stage has no working backend in this deployment (not configured, not built yet)."""
