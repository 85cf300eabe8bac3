"""The JSON shapes of API.md, as pydantic models: what clients send and what they get back."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from pipeline.jobs import Source, Stage, Status
from pipeline.uploads import NOT_BASE64

MAX_PROMPT_CHARS = 1024
MAX_BODY_BYTES = 64 * 1024  # a JSON body without a picture

# The options of a job (API.md §1): inclusive bounds.
RESOLUTION_RANGE = (32, 512)  # marching-cubes cells per side: 512 takes 8x the memory and time of 256
FACE_LIMIT_RANGE = (100, 1_000_000)  # 1,000,000 is what the Blender converter takes (converters/blender/pool.py)
SIZE_M_RANGE = (0.01, 100.0)  # metres: from a bead to a building

# API.md's 400 sentences, by the pydantic error types that lead to them.
INVALID_BODY = "Invalid request body"
NO_PROMPT = "No prompt provided"
PROMPT_TOO_LONG = f"Prompt too long (max {MAX_PROMPT_CHARS} characters)"
BAD_RESOLUTION = f"resolution must be a whole number from {RESOLUTION_RANGE[0]} to {RESOLUTION_RANGE[1]}"
BAD_FACE_LIMIT = f"face_limit must be a whole number from {FACE_LIMIT_RANGE[0]} to {FACE_LIMIT_RANGE[1]}"
BAD_SIZE_M = f"size_m must be a number of metres from {SIZE_M_RANGE[0]:g} to {SIZE_M_RANGE[1]:g}"
BAD_IMAGE = NOT_BASE64
_MESSAGES = {"json_invalid": INVALID_BODY, "json_type": INVALID_BODY, "model_type": INVALID_BODY,
             "model_attributes_type": INVALID_BODY, "missing": NO_PROMPT, "string_type": NO_PROMPT,
             "no_prompt": NO_PROMPT, "prompt_too_long": PROMPT_TOO_LONG}
_OPTION_ERROR = "invalid_option"  # its message is the sentence


def _whole_number(value: object, bounds: tuple[int, int], message: str) -> int:
    """An integer within `bounds`: a JSON integer, or a form field's digits. Booleans and fractions are not."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        raise PydanticCustomError(_OPTION_ERROR, message)
    return value


def _metres(value: object, bounds: tuple[float, float], message: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise PydanticCustomError(_OPTION_ERROR, message) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not bounds[0] <= value <= bounds[1]:
        raise PydanticCustomError(_OPTION_ERROR, message)  # NaN and infinities fail the bounds too
    return float(value)


MAX_CALLBACK_URL_CHARS = 2048
CALLBACK_URL_INVALID = "callback_url must be an https URL"


class GenerateRequest(BaseModel):
    """API.md §1: a prompt, or a picture (`image`, base64 in JSON; a file part in multipart/form-data) with an
    optional caption in `prompt`; and the job's options. Fields a client does not know are ignored."""

    # What the OpenAPI schema says of it: a prompt, or a picture, or both.
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["prompt"]}, {"required": ["image"]}]})

    prompt: str | None = None
    image: str | None = None
    resolution: int | None = None
    face_limit: int | None = None
    size_m: float | None = None
    # Where the finished job's status object is POSTed, signed (pipeline/webhooks.py checks the address at
    # submission and again at each delivery).
    callback_url: str | None = None

    @field_validator("callback_url", mode="before")
    @classmethod
    def _a_url(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_CALLBACK_URL_CHARS:
            raise PydanticCustomError(_OPTION_ERROR, CALLBACK_URL_INVALID)
        return value.strip()

    @field_validator("image", mode="before")
    @classmethod
    def _image_is_text(cls, value: object) -> object:
        if value is not None and not isinstance(value, str):
            raise PydanticCustomError(_OPTION_ERROR, BAD_IMAGE)
        return value

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: object) -> int | None:
        return None if value is None else _whole_number(value, RESOLUTION_RANGE, BAD_RESOLUTION)

    @field_validator("face_limit", mode="before")
    @classmethod
    def _face_limit(cls, value: object) -> int | None:
        return None if value is None else _whole_number(value, FACE_LIMIT_RANGE, BAD_FACE_LIMIT)

    @field_validator("size_m", mode="before")
    @classmethod
    def _size_m(cls, value: object) -> float | None:
        return None if value is None else _metres(value, SIZE_M_RANGE, BAD_SIZE_M)

    def with_image(self, present: bool) -> GenerateRequest:
        """Check the prompt: stored as sent, less leading and trailing whitespace (API.md §1). Without a picture
        it is required; with one it is an optional caption (blank: none)."""
        prompt = self.prompt.strip() if self.prompt is not None else None
        if len(prompt or "") > MAX_PROMPT_CHARS:
            raise ValidationError.from_exception_data("GenerateRequest", [_custom("prompt_too_long", PROMPT_TOO_LONG)])
        if not prompt and not present:
            raise ValidationError.from_exception_data("GenerateRequest", [_custom("no_prompt", NO_PROMPT)])
        return self.model_copy(update={"prompt": prompt or None})


def _custom(kind: str, message: str) -> dict:
    return {"type": PydanticCustomError(kind, message), "loc": ("prompt",), "input": None}


def request_error(exc: ValidationError) -> str:
    """The API.md sentence for a request body that failed validation: the first error decides."""
    error = exc.errors()[0]
    if error["type"] == _OPTION_ERROR:
        return error["msg"]
    return _MESSAGES.get(error["type"], INVALID_BODY)


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
    them by name; only `expires_at` is derived (JobStore.status_of)."""

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
