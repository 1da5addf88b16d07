"""Server settings: one object, read from flags and ``SAMPSERVE_*`` environment variables.

Both entry points (``sampserve serve`` and ``python -m service``) build their flags from these
fields, so a flag, its variable and its default cannot drift apart. Defaults are chosen so that a
server started with none of them is safe to leave running: loopback only, every size and time
bounded, nothing a client sends kept for good. docs/design.md says why each default is what it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.repository import OrtProvider


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMPSERVE_", extra="forbid")

    # -- where and what ----------------------------------------------------------------------
    repo: Path = Field(Path("model_repo"), description="The model repository to serve.")
    host: str = Field("127.0.0.1", description="Address to bind; loopback unless told otherwise.")
    http_port: int = Field(8000, ge=0, le=65535, description="REST port (0: pick a free one).")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: pick a free one).")
    metrics_port: int | None = Field(None, ge=0, le=65535, description=(
        "Serve /metrics on its own port (0: pick a free one) instead of the REST port."))
    plugins: list[str] = Field(default_factory=list, description=(
        "Python modules imported at start, e.g. to register runtimes (service.runtimes.RUNTIMES)."))

    # -- compute -----------------------------------------------------------------------------
    ort_providers: list[OrtProvider] = Field(["tensorrt", "cuda", "cpu"], min_length=1, description=(
        "onnxruntime execution providers in order of preference; those this onnxruntime build lacks are skipped "
        "and the CPU one always comes last (a model's config.json onnxruntime.providers overrides)."))
    engine_cache: Path = Field(Path("~/.cache/sampserve/tensorrt"), description=(
        "Where onnxruntime's TensorRT provider keeps the engines it builds on this node, one folder per model "
        "version (used only where that provider is present)."))
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads per instance (all cores).")
    instances: int = Field(2, ge=1, le=16, description=(
        "Runtime instances per model version, each running one batch at a time (Triton's instance_group "
        "count); a model's config.json may override it."))
    runtime_timeout_s: float = Field(30.0, gt=0, description=(
        "A runtime call still running after this fails its requests (504) and its instance is replaced."))
    max_hung_calls: int = Field(2, ge=1, description=(
        "Runtime calls of one model version still stuck past runtime_timeout_s that make liveness false."))

    # -- repository --------------------------------------------------------------------------
    poll_interval_s: float = Field(2.0, gt=0, description="How often the repository is checked for versions.")
    retry_failed_s: float = Field(30.0, gt=0, description=(
        "First wait before a version that failed to load is tried again (doubles each time, up to 1 h)."))
    model_control_mode: Literal["poll", "explicit", "none"] = Field("poll", description=(
        "poll: versions appear and go as the repository changes; none: the repository as it was at start; "
        "explicit: models load and unload only through the v2 repository API (needs an API key)."))
    load_models: list[str] = Field(default_factory=list, description=(
        "explicit mode: the models loaded at start ('*': all); the others wait for a load call."))
    strict_readiness: bool = Field(False, description=(
        "Server readiness requires every model in the repository to be ready (Triton's --strict-readiness); "
        "off: one ready model is enough, and per-model readiness tells the rest."))

    # -- request limits ----------------------------------------------------------------------
    request_timeout_s: float = Field(30.0, gt=0, description="A request still queued after this gets 504.")
    max_texts_per_request: int = Field(256, ge=1, description=(
        "More texts in one request get 400 (and never more than half a model's queue)."))
    max_text_chars: int = Field(100_000, ge=16, description=(
        "Longer texts get 400 before tokenizing; with truncate they are cut to this first."))
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description=(
        "Larger request bodies (REST) and messages (gRPC) are refused while reading: 413 / RESOURCE_EXHAUSTED."))

    # -- connections -------------------------------------------------------------------------
    max_connections: int = Field(2048, ge=1, description="Open connections per port; more are refused.")
    idle_timeout_s: float = Field(5.0, gt=0, description="REST: a keep-alive connection idle this long is closed.")
    header_timeout_s: float = Field(10.0, gt=0, description=(
        "REST: a connection that has not sent complete request headers in this long is closed (slowloris)."))
    body_timeout_s: float = Field(30.0, gt=0, description="REST: a request body not received in full by then gets 408.")
    grpc_max_message_bytes: int = Field(3 * 1024 * 1024, ge=1024, description=(
        "gRPC: larger messages are refused (RESOURCE_EXHAUSTED) from their length prefix, before they arrive."))
    grpc_max_concurrent_streams: int = Field(128, ge=1, description=(
        "gRPC: calls in flight per connection; with grpc_max_message_bytes it bounds what one connection "
        "can make the server buffer."))
    grpc_max_connection_idle_s: float = Field(300.0, gt=0, description="gRPC: idle connections get GOAWAY after this.")
    grpc_max_connection_age_s: float = Field(600.0, gt=0, description=(
        "gRPC: connections get GOAWAY after this, so clients spread over replicas added later."))
    grpc_max_connection_age_grace_s: float = Field(30.0, ge=0, description=(
        "gRPC: calls in flight on an aged connection get this long to finish."))
    grpc_keepalive_min_ping_interval_s: float = Field(10.0, gt=0, description=(
        "gRPC: clients pinging more often than this are sent GOAWAY (too_many_pings)."))
    grpc_handshake_timeout_s: float = Field(10.0, gt=0, description=(
        "gRPC: a connection that has not completed its TLS / HTTP/2 handshake by then is closed."))

    # -- access ------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description=(
        "Inference routes and methods require 'Authorization: Bearer <key>'; health and metrics stay open."))
    api_key_file: Path | None = Field(None, description="Read the API key from this file (e.g. a mounted Secret).")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: HTTPS and gRPC over TLS.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(None, description=(
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS) on both ports."))
    docs: bool = Field(True, description="Serve the OpenAPI document and /docs.")

    # -- operability -------------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or as one JSON object each.")
    access_log: bool = Field(True, description="One log line per request: id, model, version, status, latency.")
    otlp_endpoint: str | None = Field(None, description=(
        "Send OpenTelemetry traces to this OTLP/HTTP endpoint (e.g. http://127.0.0.1:4318/v1/traces); off when unset."))
    drain_grace_s: float = Field(20.0, ge=0, description=(
        "After SIGTERM, time allowed to finish accepted work; the process exits within this plus 5 s."))

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        """A certificate without its key (or a client CA without a server certificate) is a typo, not a choice."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api_key or api_key_file, not both")
        if self.model_control_mode == "explicit" and self.api_key is None and self.api_key_file is None:
            raise ValueError("model_control_mode explicit lets clients load and unload models: it needs api_key "
                             "or api_key_file")
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError("load_models applies to model_control_mode explicit (the other modes load every model)")
        return self

    def resolved_api_key(self) -> bytes | None:
        """The key clients must send, or None when access is open."""
        if self.api_key_file is not None:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
            if not key:
                raise ValueError(f"{self.api_key_file}: the API key file is empty")
            return key.encode()
        return self.api_key.get_secret_value().encode() if self.api_key is not None else None

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None
