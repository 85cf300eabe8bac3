"""Configuration from the environment: every setting of DESIGN.md, in one place, with its default."""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.prompts import DEFAULT_PROMPT_TEMPLATE, validate_prompt_template

class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    port: int = Field(8000, alias="PORT")
    data_dir: Path = Field(Path("./data"), alias="GROK3D_DATA_DIR")
    queue_max: int = Field(100, alias="GROK3D_QUEUE_MAX", ge=1)
    retry_after_s: int = Field(10, alias="GROK3D_RETRY_AFTER_S", ge=0)
    image_concurrency: int = Field(4, alias="GROK3D_IMAGE_CONCURRENCY", ge=1)
    reconstruct_concurrency: int = Field(16, alias="GROK3D_RECONSTRUCT_CONCURRENCY", ge=1)
    model_size_m: float = Field(0.5, alias="GROK3D_MODEL_SIZE_M", gt=0)
    cors_origins: str = Field("*", alias="GROK3D_CORS_ORIGINS")
    lease_s: float = Field(60.0, alias="GROK3D_LEASE_S", gt=0)
    # BentoML's traffic timeout of the API service: a request that has not started its answer by then is a 504
    # (bentoml_fixes.FirstByteTimeout: a stream that has started, such as the events route, runs on).
    request_timeout_s: float = Field(60.0, alias="GROK3D_REQUEST_TIMEOUT_S", gt=0)

    # The job life cycle (pipeline/lifecycle.py, pipeline/webhooks.py, pipeline/events.py).
    retention_days: float | None = Field(None, alias="GROK3D_RETENTION_DAYS", gt=0)  # None: keep forever
    sweep_interval_s: float = Field(600.0, alias="GROK3D_SWEEP_INTERVAL_S", gt=0)
    webhook_secret: str | None = Field(None, alias="GROK3D_WEBHOOK_SECRET")
    webhook_allow_private: bool = Field(False, alias="GROK3D_WEBHOOK_ALLOW_PRIVATE")
    webhook_timeout_s: float = Field(10.0, alias="GROK3D_WEBHOOK_TIMEOUT_S", gt=0)
    webhook_backoff_s: float = Field(5.0, alias="GROK3D_WEBHOOK_BACKOFF_S", gt=0)
    sse_heartbeat_s: float = Field(15.0, alias="GROK3D_SSE_HEARTBEAT_S", gt=0)
    # The job store: an SQLAlchemy URL (postgresql+psycopg://user:pw@host:5432/grok3d for several replicas);
    # unset, the SQLite file in the data folder.
    database_url: str | None = Field(None, alias="GROK3D_DATABASE_URL")
    # The job's files: a folder (unset: $GROK3D_DATA_DIR/jobs) or s3://bucket/prefix; GROK3D_S3_ENDPOINT for an S3
    # server other than AWS (credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
    assets_url: str | None = Field(None, alias="GROK3D_ASSETS_URL")
    s3_endpoint: str | None = Field(None, alias="GROK3D_S3_ENDPOINT")
    # 0: downloads stream through the API; N > 0: GET answers a redirect to a presigned URL valid N seconds.
    assets_redirect_s: int = Field(0, alias="GROK3D_ASSETS_REDIRECT_S", ge=0, le=7 * 86400)
    # Who may use the job routes: `open` (anyone who reaches the port) or `keys` (API keys, pipeline/auth.py).
    auth: Literal["open", "keys"] = Field("open", alias="GROK3D_AUTH")
    # Jobs per UTC day, whoever submits them: the ceiling on the xAI spend in both modes (0: none).
    daily_job_limit: int = Field(1000, alias="GROK3D_DAILY_JOB_LIMIT", ge=0)

    xai_api_key: str | None = Field(None, alias="XAI_API_KEY")
    xai_base_url: str = Field("https://api.x.ai/v1", alias="XAI_BASE_URL")
    xai_image_model: str = Field("grok-imagine-image", alias="XAI_IMAGE_MODEL")
    xai_timeout_s: float = Field(60.0, alias="XAI_TIMEOUT_S", gt=0)
    xai_max_retries: int = Field(5, alias="XAI_MAX_RETRIES", ge=0)
    prompt_template: str = Field(DEFAULT_PROMPT_TEMPLATE, alias="GROK3D_PROMPT_TEMPLATE")

    # A TripoSR service deployed elsewhere (http://triposr:3000): the API service then calls it over HTTP and
    # starts no TripoSR worker of its own. Unset, `bentoml serve` runs both services on this machine.
    triposr_url: str | None = Field(None, alias="GROK3D_TRIPOSR_URL")
    triposr_model: str = Field("triposr:latest", alias="TRIPOSR_MODEL")
    triposr_device: str | None = Field(None, alias="TRIPOSR_DEVICE")
    triposr_precision: Literal["auto", "fp32", "mixed", "bf16"] = Field("auto", alias="TRIPOSR_PRECISION")
    triposr_mc_resolution: int = Field(256, alias="TRIPOSR_MC_RESOLUTION", ge=8, le=1024)
    triposr_mc_threshold: float = Field(25.0, alias="TRIPOSR_MC_THRESHOLD")
    triposr_max_batch_size: int = Field(8, alias="TRIPOSR_MAX_BATCH_SIZE", ge=2)
    triposr_max_latency_ms: int = Field(300_000, alias="TRIPOSR_MAX_LATENCY_MS", ge=1)

    blender_workers: int = Field(2, alias="GROK3D_BLENDER_WORKERS", ge=1)
    blender_python: str | None = Field(None, alias="GROK3D_BLENDER_PYTHON")
    convert_timeout_s: float = Field(300.0, alias="GROK3D_CONVERT_TIMEOUT_S", gt=0)
    bake_size: int = Field(1024, alias="GROK3D_BAKE_SIZE", ge=0)  # 0: keep vertex colours, no texture

    # For tests only: "module:function" returning a pipeline.stages.Stages that replaces every real stage. Refused
    # unless GROK3D_ALLOW_TEST_STAGES=1 too, so that an inherited variable can never serve stand-ins by accident.
    stages_factory: str | None = Field(None, alias="GROK3D_STAGES")
    allow_test_stages: bool = Field(False, alias="GROK3D_ALLOW_TEST_STAGES")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, value: str) -> str:
        return validate_prompt_template(value)

    @field_validator("bake_size")
    @classmethod
    def _bake_size(cls, value: int) -> int:
        if 0 < value < 16:
            raise ValueError("GROK3D_BAKE_SIZE must be 0 (no baking) or at least 16")
        return value

    @field_validator("retention_days", "webhook_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_secret")
    @classmethod
    def _a_webhook_secret(cls, value: str | None) -> str | None:
        """Standard Webhooks' form: `whsec_` and the key in base64 (24 to 64 bytes, as the specification says)."""
        if value is None:
            return None
        value = value.strip()
        try:
            key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not value.startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError("GROK3D_WEBHOOK_SECRET must be whsec_ followed by 24 to 64 random bytes in base64, e.g. "
                             "python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\"")
        return value

    @field_validator("xai_api_key")
    @classmethod
    def _blank_key_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @model_validator(mode="after")
    def _test_stages_need_consent(self) -> Settings:
        if self.stages_factory and not self.allow_test_stages:
            raise ValueError(
                f"GROK3D_STAGES={self.stages_factory} replaces every real stage (xAI, TripoSR, Blender) with test "
                "stand-ins, and is refused in a deployment: unset it, or set GROK3D_ALLOW_TEST_STAGES=1 where test "
                "stages are meant (the test suite)")
        return self

    @field_validator("triposr_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        value = (value or "").strip().rstrip("/") or None
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("GROK3D_TRIPOSR_URL must be the TripoSR service's http:// or https:// URL")
        return value

    @field_validator("assets_url", "s3_endpoint")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return (value or "").strip() or None

    @field_validator("database_url")
    @classmethod
    def _known_engine(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("GROK3D_DATABASE_URL must be an SQLAlchemy URL of SQLite or PostgreSQL, such as "
                             "postgresql+psycopg://user:password@host:5432/grok3d")
        return value

    @property
    def store_url(self) -> str:
        """The job store's SQLAlchemy URL: GROK3D_DATABASE_URL, else the SQLite file in the data folder."""
        # Imported here: every process reads the settings, and those that keep no jobs (the TripoSR worker,
        # BentoML's arbiter) need not load SQLAlchemy for them.
        from pipeline.db import sqlite_url

        return self.database_url or sqlite_url(self.db_path)

    @property
    def retention_s(self) -> float | None:
        return self.retention_days * 86400 if self.retention_days is not None else None

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "grok3d.db"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def promoted_examples_dir(self) -> Path:
        return self.data_dir / "examples"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    settings.data_dir = settings.data_dir.resolve()
    return settings

