"""The JSON shapes of API.md, as pydantic models: what clients send and what they get back."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from pipeline.jobs import Stage, Status

MAX_PROMPT_CHARS = 1024
MAX_BODY_BYTES = 64 * 1024

# API.md's 400 sentences, by the pydantic error types that lead to them.
INVALID_BODY = "Invalid request body"
NO_PROMPT = "No prompt provided"
PROMPT_TOO_LONG = f"Prompt too long (max {MAX_PROMPT_CHARS} characters)"
_MESSAGES = {"json_invalid": INVALID_BODY, "json_type": INVALID_BODY, "model_type": INVALID_BODY,
             "model_attributes_type": INVALID_BODY, "missing": NO_PROMPT, "string_type": NO_PROMPT,
             "no_prompt": NO_PROMPT, "prompt_too_long": PROMPT_TOO_LONG}


MAX_CALLBACK_URL_CHARS = 2048
CALLBACK_URL_INVALID = "callback_url must be an https URL"
# Errors whose own message is the sentence (the ones above map by type).
_OWN_MESSAGE = {"callback_url"}


class GenerateRequest(BaseModel):
    prompt: str
    # Where the finished job's status object is POSTed, signed (pipeline/webhooks.py checks the address at
    # submission and again at each delivery).
    callback_url: str | None = None

    @field_validator("callback_url", mode="before")
    @classmethod
    def _a_url(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_CALLBACK_URL_CHARS:
            raise PydanticCustomError("callback_url", CALLBACK_URL_INVALID)
        return value.strip()

    @field_validator("prompt")
    @classmethod
    def _stripped_and_bounded(cls, value: str) -> str:
        """Stored as sent, less leading and trailing whitespace (API.md §1)."""
        value = value.strip()
        if not value:
            raise PydanticCustomError("no_prompt", NO_PROMPT)
        if len(value) > MAX_PROMPT_CHARS:
            raise PydanticCustomError("prompt_too_long", PROMPT_TOO_LONG)
        return value


def request_error(exc: ValidationError) -> str:
    """The API.md sentence for a request body that failed validation: the first error decides."""
    first = exc.errors()[0]
    if first["type"] in _OWN_MESSAGE:
        return first["msg"]
    return _MESSAGES.get(first["type"], INVALID_BODY)


class GenerateResponse(BaseModel):
    job_id: str
    status: Status


class JobStatus(BaseModel):
    """API.md §2. Each field is the job's field of the same name (pipeline.jobs.Job), so the status route copies
    them by name; only `expires_at` is derived (JobStore.status_of)."""

    job_id: str
    status: Status
    stage: Stage
    progress: int
    created_at: str
    prompt: str
    error: str | None = None
    model_version: str | None = None
    # When the sweeper removes the job and its files (GROK3D_RETENTION_DAYS after created_at); null: kept forever.
    expires_at: str | None = None
    callback_url: str | None = None
    # The webhook's delivery: null without a callback_url; pending (not yet answered), retrying (an attempt
    # failed, another is scheduled), delivered (a 2xx), failed (no 2xx within 24 hours).
    webhook_status: Literal["pending", "retrying", "delivered", "failed"] | None = None


class JobList(BaseModel):
    """GET /api/jobs: a page of the caller's jobs, newest first; `next_cursor` fetches the next page (null on the
    last one)."""

    jobs: list[JobStatus]
    next_cursor: str | None = None


class Example(BaseModel):
    job_id: str
    name: str
    description: str
    image_url: str


class ExamplesResponse(BaseModel):
    examples: list[Example]


class ErrorBody(BaseModel):
    error: str
