"""Settings: every knob of the service, read once from ``NORMSERVE_*`` environment variables.

    NORMSERVE_REPOSITORY=model_repository NORMSERVE_PORT=8000 NORMSERVE_PROVIDER=auto python -m service

Per-model batching overrides are one JSON object::

    NORMSERVE_MODELS='{"resnet18-bn": {"max_batch_size": 8, "max_queue_delay_ms": 2}}'
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ENDPOINT_GROUPS", "BatchingSettings", "EndpointGroup", "ModelOverride", "Settings"]

# What an API key can protect, by endpoint (service/access.py sorts requests into them). Health
# (/v2/health/*) is never behind the key: probes and load balancers carry none.
EndpointGroup = Literal["inference", "model_control", "metadata", "metrics"]
ENDPOINT_GROUPS: tuple[EndpointGroup, ...] = ("inference", "model_control", "metadata", "metrics")


class ModelOverride(BaseModel):
    """Batching settings for one model; a field left out falls back to the server-wide default."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_ms: float | None = Field(default=None, ge=0)


class BatchingSettings(BaseModel):
    """What one model's batcher runs with, once the defaults, the overrides and the model are combined."""

    max_batch_size: int  # 0: the model has no batch dimension, and each request runs alone
    max_queue_delay_s: float
    queue_limit: int
    intake_batches: float | None = 0.0  # None: the batcher's default for its cores
    idle_spin_s: float = 0.0  # how long the worker polls for the next request before it sleeps


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NORMSERVE_", extra="forbid", frozen=True)

    repository: Path = Field(default=Path("model_repository"), description="the model repository's root folder")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="the KServe v2 gRPC service's port, on the same host (Triton's default); 0 turns gRPC off",
    )
    grpc_max_connection_age_s: float | None = Field(
        default=None,
        gt=0,
        description="close each gRPC connection after this long (GOAWAY, its calls in flight finish), so that "
        "clients reconnect and a Kubernetes Service spreads them over new replicas; unset: never",
    )
    grpc_max_message_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="the largest gRPC message received or sent; unset: NORMSERVE_MAX_BODY_BYTES, as over HTTP "
        "(grpcio's own default is 4 MiB)",
    )

    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=1,
        description="worker processes, each a whole server (event loop, sessions, batchers) on the same ports "
        "(SO_REUSEPORT: the kernel spreads connections), restarted if one dies; auto: one per usable core. With "
        "more than one, each gets an equal share of the cores for onnxruntime's threads (service/workers.py)",
    )

    provider: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="auto: CUDA when it really loads, else CPU; cuda: CUDA, reported if it falls back"
    )
    require_gpu: bool = Field(default=False, description="stay not-ready if any model runs on CPU instead of CUDA")
    intra_op_threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads; 0 = its default")

    max_batch_size: int | None = Field(
        default=None, ge=1, description="cap on rows per batch; each model's own max_batch_size when unset"
    )
    max_queue_delay_ms: float = Field(
        default=0.0,
        ge=0,
        description="how long a batch waits for more rows once its first request is queued; with 0 a batch "
        "takes whatever queued while the previous one ran",
    )
    models: dict[str, ModelOverride] = Field(default_factory=dict, description="per-model batching overrides")
    queue_limit: int = Field(default=512, ge=1, description="queued requests per model before 503 + Retry-After")
    intake_batches: float | None = Field(
        default=None,
        ge=0,
        description="a model's requests in flight, in full batches' worth of rows, before the keep-alive connections "
        "it answers are read no further until it answers more: the kernel holds the excess, at no cost to the "
        "server (service/intake.py). Unset: 1 on one core (nothing overlaps), 2 on more (one batch computes while "
        "the next is parsed). 0: every connection is read, and past the queue limit refused with 503",
    )
    idle_spin_us: float = Field(
        default=200.0,
        ge=0,
        le=10_000,
        description="once a model's queue empties, how long its batcher keeps the event loop polling for the next "
        "request before it sleeps: a request within it is read at once, without the wake-up of an idle core "
        "(tens of µs on a virtual machine, and caches gone cold). It spins only while the last wait ended within "
        "it (a client that sends its next request as soon as it has its answer), when the core would have slept "
        "for less anyway; once a spin ends with nothing, it sleeps until requests come that close again. 0: sleep "
        "at once",
    )
    request_timeout_ms: float = Field(
        default=30_000,
        gt=0,
        description="the deadline of a request that sets none (Triton's 'timeout' parameter, in µs), and the "
        "longest one may set: a request that would wait longer is refused with 503 before its body is read",
    )
    batchnorm_queue_limit: int = Field(
        default=8,
        ge=1,
        description="requests the batchnorm endpoint queues per model version, for each of its two graphs, before "
        "it answers 503 (from the head); its own queues, so that a flood of it never takes infer's",
    )
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024, description="larger request bodies get 413")
    max_bodies_bytes: int = Field(
        default=256 * 2**20,
        ge=1024,
        description="request bodies held at once, from the first byte received to the answer: past it a new "
        "body gets 503 with Retry-After from its head (Content-Length) or as it passes the mark (chunked); at "
        "least max_body_bytes",
    )
    max_json_bytes: int = Field(
        default=2 * 2**20,
        ge=1024,
        description="larger request bodies that are all JSON (no binary tensors) get 413: parsing one holds the "
        "event loop, about 20 ms a megabyte",
    )
    max_header_bytes: int = Field(
        default=60 * 1024,
        ge=1024,
        description="a request line and headers larger than this get 431 and the connection is closed "
        "(Envoy's default, 60 KiB)",
    )
    max_header_count: int = Field(
        default=100, ge=8, description="a request with more header fields gets 431 (Envoy's default, 100)"
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request head not complete this long after its first byte gets 408 and the connection "
        "is closed (slowloris); a new connection that sends nothing for this long is closed",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a request body not complete this long after its head gets 408 and the connection is closed",
    )
    keep_alive_s: int = Field(
        default=75,
        ge=1,
        description="a connection idle this long between requests is closed (uvicorn's timeout_keep_alive); "
        "above the idle timeout of the load balancer or client pool in front (60 s is common), or requests sent "
        "as the server closes are lost",
    )
    max_connections: int = Field(
        default=4096,
        ge=1,
        description="open connections past this are answered 503 with Retry-After and closed; the soft "
        "open-file limit is raised to the hard one at start-up, and the cap lowered to fit it",
    )
    max_connections_per_client: int = Field(
        default=0,
        ge=0,
        description="open connections one client address may hold; past it, its new ones are answered 503 with "
        "Retry-After and closed, and other clients are served. 0: half of max_connections. Behind a load "
        "balancer or proxy every connection comes from its few addresses: raise it to max_connections there",
    )
    drain_s: float = Field(
        default=5.0,
        ge=0,
        description="on SIGTERM, how long readiness answers 503 while requests are still served (with "
        "Connection: close) before the listener closes; 0 closes it at once",
    )
    shutdown_timeout_s: int = Field(
        default=30, ge=0, description="once the listener is closed, how long accepted requests may take to finish"
    )

    model_control: Literal["none", "explicit"] = Field(
        default="none",
        description="Triton's model control modes. none: load and unload answer 403, the index stays readable; "
        "explicit: POST /v2/repository/models/{m}/load and /unload change what is served",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="the Host names a model control request may name, besides localhost, 127.0.0.1, ::1 and "
        "NORMSERVE_HOST (when it is not a wildcard); '*' for any. Another Host gets 403: a web page that resolves "
        "its own name to this server (DNS rebinding) sends a matching Host and Origin",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="when set, the endpoint groups in api_key_protects need it, as 'Authorization: Bearer <key>' "
        "or in the api_key_header header; 401 without it",
    )
    api_key_header: str = Field(default="x-api-key", description="the header that may carry the API key")
    api_key_protects: frozenset[EndpointGroup] = Field(
        default=frozenset(ENDPOINT_GROUPS),
        description="which endpoint groups need the API key: inference, model_control, metadata, metrics",
    )
    required_models: list[str] = Field(
        default_factory=list, description="models that must be loaded and ready for the server to be ready"
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    json_logs: bool = False

    @property
    def control_hosts(self) -> frozenset[str] | None:
        """The host names model control answers for (lower case, no port); None when any is allowed."""
        if "*" in self.allowed_hosts:
            return None
        names = {"localhost", "127.0.0.1", "::1", *(h.lower().strip("[]") for h in self.allowed_hosts)}
        if self.host not in ("0.0.0.0", "::", ""):
            names.add(self.host.lower().strip("[]"))
        return frozenset(names)

    @model_validator(mode="after")
    def _one_body_fits_the_bodies(self) -> Settings:
        if self.max_bodies_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_bodies_bytes ({self.max_bodies_bytes}) is less than max_body_bytes ({self.max_body_bytes}): "
                "a body of the largest size could never be received"
            )
        return self

    @field_validator("api_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < 16:
            raise ValueError(f"an API key needs at least 16 characters, got {len(key.get_secret_value())}")
        return key

    @field_validator("api_key_header")
    @classmethod
    def _lower_case(cls, header: str) -> str:
        return header.lower()

    def batching(self, model: str, model_max_batch_size: int) -> BatchingSettings:
        """Combine the server defaults, this model's override and the batch size the model was verified at.

        A model of max_batch_size 0 has no batch dimension: it keeps 0 and no queue delay, whatever the
        settings say (no request can join another's batch, so none should wait for one)."""
        if model_max_batch_size == 0:
            return BatchingSettings(
                max_batch_size=0,
                max_queue_delay_s=0.0,
                queue_limit=self.queue_limit,
                intake_batches=self.intake_batches,
                idle_spin_s=self.idle_spin_us / 1e6,
            )
        override = self.models.get(model, ModelOverride())
        wanted = override.max_batch_size or self.max_batch_size or model_max_batch_size
        delay_ms = override.max_queue_delay_ms if override.max_queue_delay_ms is not None else self.max_queue_delay_ms
        return BatchingSettings(
            max_batch_size=min(wanted, model_max_batch_size),
            max_queue_delay_s=delay_ms / 1000,
            queue_limit=self.queue_limit,
            intake_batches=self.intake_batches,
            idle_spin_s=self.idle_spin_us / 1e6,
        )
