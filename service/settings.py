"""Server settings: one object, read from flags and ``SAMPSERVE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMPSERVE_", extra="forbid")

    repo: Path = Field(Path("model_repo"), description="The model repository to serve.")
    host: str = Field("127.0.0.1", description="Address to bind; loopback unless told otherwise.")
    http_port: int = Field(8000, ge=0, le=65535, description="REST port (0: pick a free one).")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: pick a free one).")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads per instance (all cores).")
    instances: int = Field(2, ge=1, le=16, description=(
        "Runtime instances per model version, each running one batch at a time (Triton's instance_group "
        "count); a model's config.json may override it. Two beat one here: docs/benchmarks.md."))
    poll_interval_s: float = Field(2.0, gt=0, description="How often the repository is checked for versions.")
    request_timeout_s: float = Field(30.0, gt=0, description="A request still queued after this gets 504.")
    max_texts_per_request: int = Field(256, ge=1, description="More texts in one request get 400.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    drain_grace_s: float = Field(20.0, ge=0, description="After SIGTERM, time allowed to finish accepted work.")
