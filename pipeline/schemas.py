"""The JSON shapes of API.md, as pydantic models: what clients send and what they get back."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from pipeline.jobs import Source, Stage, Status

MAX_PROMPT_CHARS = 1024
MAX_BODY_BYTES = 64 * 1024

# API.md's 400 sentences, by the pydantic error types that lead to them.
INVALID_BODY = "Invalid request body"
NO_PROMPT = "No prompt provided"
PROMPT_TOO_LONG = f"Prompt too long (max {MAX_PROMPT_CHARS} characters)"
_MESSAGES = {"json_invalid": INVALID_BODY, "json_type": INVALID_BODY, "model_type": INVALID_BODY,
             "model_attributes_type": INVALID_BODY, "missing": NO_PROMPT, "string_type": NO_PROMPT,
             "no_prompt": NO_PROMPT, "prompt_too_long": PROMPT_TOO_LONG}


class GenerateRequest(BaseModel):
    prompt: str

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
    return _MESSAGES.get(exc.errors()[0]["type"], INVALID_BODY)


class GenerateResponse(BaseModel):
    job_id: str
    status: Status


class MeshReport(BaseModel):
    """What a client needs to decide without downloading (API.md §2), trimesh's numbers for the delivered GLB."""

    faces: int
    vertices: int
    watertight: bool
    size_m: tuple[float, float, float]  # extents along x, y, z, metres
    volume_m3: float | None  # cubic metres; null unless watertight


class JobStatus(BaseModel):
    """API.md §2. Each field is the job's field of the same name (pipeline.jobs.Job), so the status route copies
    them by name."""

    job_id: str
    status: Status
    stage: Stage
    progress: int
    created_at: str
    prompt: str | None  # null only for a job made from an uploaded picture without a caption
    error: str | None = None
    model_version: str | None = None
    source: Source = Source.prompt
    resolution: int | None = None
    face_limit: int | None = None
    size_m: float | None = None
    mesh: MeshReport | None = None


class Example(BaseModel):
    job_id: str
    name: str
    description: str
    image_url: str


class ExamplesResponse(BaseModel):
    examples: list[Example]


class ErrorBody(BaseModel):
    error: str
