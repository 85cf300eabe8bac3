"""What the TripoSR service and its callers agree on: the model source's form and the typed reconstruct answer.
Kept free of torch, so the API service can import it without loading the model's libraries."""

from __future__ import annotations

import base64
import re
from enum import Enum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer, model_validator

_STORE_TAG = re.compile(r"[a-z0-9][a-z0-9_.-]*(:[A-Za-z0-9_.-]+)?")


def is_store_tag(source: str) -> bool:
    """A TRIPOSR_MODEL value naming the BentoML model store (`triposr:abc123`, `triposr`), not an existing folder."""
    return not Path(source).is_dir() and _STORE_TAG.fullmatch(source) is not None


def _from_base64(value: object) -> object:
    return base64.b64decode(value, validate=True) if isinstance(value, str) else value


# Bytes that cross BentoML's transports: as they are where BentoML pickles (between its own processes), as base64
# (RFC 4648 §4) where it speaks JSON (HTTP from elsewhere), since JSON has no bytes.
WireBytes = Annotated[bytes, BeforeValidator(_from_base64),
                      PlainSerializer(lambda data: base64.b64encode(data).decode("ascii"), return_type=str,
                                      when_used="json")]


# The marching-cubes grids the service accepts per picture (cells per side), as TRIPOSR_MC_RESOLUTION's bounds.
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024


class Picture(BaseModel):
    """One framed picture for the model: PNG or JPEG bytes (a batch item of `reconstruct`), and the job's
    marching-cubes grid (cells per side; None: the service's TRIPOSR_MC_RESOLUTION)."""

    data: WireBytes
    resolution: int | None = Field(None, ge=MIN_RESOLUTION, le=MAX_RESOLUTION)


class Failure(str, Enum):
    """Why one picture of a batch gave no mesh. A batch answers item by item: one bad picture fails alone."""

    unreadable_picture = "unreadable_picture"  # the bytes did not decode as an image
    no_surface = "no_surface"  # the density field never crossed the threshold: nothing to mesh


class ReconstructAnswer(BaseModel):
    """The answer for one picture: exactly one of `glb` (binary glTF in API.md's delivery frame) and `failure`,
    and the version of the model that ran the batch (a BentoML tag, or `folder:<name>@<sha-12>`)."""

    glb: WireBytes | None = None
    failure: Failure | None = None
    model_version: str

    @model_validator(mode="after")
    def _one_of(self) -> ReconstructAnswer:
        if (self.glb is None) == (self.failure is None):
            raise ValueError("a reconstruct answer has either a glb or a failure")
        return self
