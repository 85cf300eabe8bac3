"""The JSON shapes of API.md, as pydantic models: what clients send and what they get back."""

from __future__ import annotations

from pydantic import BaseModel

MAX_PROMPT_CHARS = 1024
MAX_BODY_BYTES = 64 * 1024


class GenerateRequest(BaseModel):
    prompt: str


class GenerateResponse(BaseModel):
    job_id: str
    status: str


class JobStatus(BaseModel):
    job_id: str
    status: str
    stage: str
    progress: int
    created_at: str
    prompt: str
    error: str | None = None
    model_version: str | None = None


class Example(BaseModel):
    job_id: str
    name: str
    description: str
    image_url: str


class ExamplesResponse(BaseModel):
    examples: list[Example]


class ErrorBody(BaseModel):
    error: str
