"""The one typed settings object, read from the environment once at start-up.

Prefix ``SPANNER_``; the standard names DATABASE_URL, REDIS_URL, RABBITMQ_URL and RAY_ADDRESS are
read as they are. Each external service switches on by its URL; without it the embedded default
serves (a SQLite file under ``var/``, an in-process cache, no broker, a local Ray instance).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from spanner.errors import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPANNER_", extra="ignore", validate_default=True, populate_by_name=True
    )

    environment: Literal["development", "production"] = "development"
    ae_title: str = Field(
        default="SPANNER",
        min_length=1,
        max_length=16,
        description="Calling AE title the node actors use when a node names none",
    )

    database_url: str = Field(
        default="", validation_alias=AliasChoices("DATABASE_URL", "SPANNER_DATABASE_URL")
    )
    redis_url: str = Field(default="", validation_alias=AliasChoices("REDIS_URL", "SPANNER_REDIS_URL"))
    rabbitmq_url: str = Field(
        default="", validation_alias=AliasChoices("RABBITMQ_URL", "SPANNER_RABBITMQ_URL")
    )
    ray_address: str = Field(default="", validation_alias=AliasChoices("RAY_ADDRESS", "SPANNER_RAY_ADDRESS"))
    config: Path | None = Field(default=None, description="YAML file of nodes and spans loaded at start-up")
    var_dir: Path = Path("var")

    namespace: str = Field(default="spanner", description="Ray namespace holding the node actors")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(default=8265, ge=1, le=65535)
    replicas: int = Field(default=1, ge=1, description="Serve replicas of the HTTP ingress")
    max_ongoing_requests: int = Field(
        default=1000, ge=1,
        description="Requests Serve hands one replica at once; above the admission bounds, so that admission "
        "(which knows deadlines) decides, not Serve's queue",
    )
    admission_max_active: int = Field(
        default=64, ge=1, le=10000, description="Spanning queries one replica runs at once"
    )
    admission_max_waiting: int = Field(
        default=512, ge=0, le=100000,
        description="Spanning queries that may wait for a slot per replica; beyond it 503 with Retry-After",
    )

    default_timeout_s: float = Field(default=10.0, gt=0, le=600)
    max_timeout_s: float = Field(default=300.0, gt=0)
    node_grace_s: float = Field(
        default=1.5, ge=0, le=5,
        description="Of each query's deadline, the part kept back (at most a third of it) for the node "
        "actors' answers to come back, the merge, the response and the way through Serve's proxy, which "
        "a loaded machine slows: the node actors get the rest, so the answer reaches the client by the "
        "deadline",
    )
    cancel_grace_s: float = Field(
        default=1.0, ge=0, description="After C-CANCEL, wait this long before aborting"
    )
    circuit_failures: int = Field(
        default=3, ge=1, description="Consecutive connection failures that open a circuit"
    )
    circuit_cooldown_s: float = Field(default=15.0, gt=0)
    pool_idle_s: float = Field(default=30.0, gt=0, description="Idle associations are released after this")
    retrieve_timeout_s: float = Field(default=600.0, gt=0, description="Deadline of a whole retrieval")
    store_ae: str = Field(
        default="SPANNER", min_length=1, max_length=16,
        description="Proxy retrieval: AE title of the spanner's storage SCP, which every archive must know "
        "as a move destination (with this host and SPANNER_STORE_PORT)",
    )
    store_port: int = Field(
        default=11115, ge=0, le=65535,
        description="Proxy retrieval: port of the spanner's storage SCP, on SPANNER_SCP_HOST (one process "
        "per deployment owns it)",
    )
    spool_dir: Path | None = Field(
        default=None, description="Proxy retrieval: directory of the instance spool (empty: VAR_DIR/spool)"
    )
    spool_max_bytes: int = Field(
        default=20 << 30, gt=0,
        description="Proxy retrieval: most bytes the spool holds; the oldest instances go first when full",
    )
    spool_ttl_s: float = Field(
        default=3600.0, gt=0,
        description="Proxy retrieval: seconds a spooled instance may serve a repeated retrieval",
    )
    merge_inline_max: int = Field(
        default=5000, ge=0, description="Up to this many matches merge in the ingress"
    )
    merge_partitions: int = Field(default=4, ge=1, le=64)
    query_history: int = Field(default=100, ge=1, le=10000, description="Records GET /api/v1/queries lists")

    scp_host: str = Field(default="127.0.0.1", description="Address the DICOM front listens on")
    scp_port: int = Field(default=11114, ge=0, le=65535, description="Port of the DICOM front (0: any free)")
    scp_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias=AliasChoices("SPANNER_URL", "SPANNER_SCP_URL", "scp_url"),
        description="Base URL of the HTTP API the DICOM front forwards to",
    )
    scp_max_associations: int = Field(
        default=32, ge=1, description="Established associations the DICOM front serves at once"
    )
    scp_max_connections_per_peer: int = Field(
        default=16, ge=1,
        description="DICOM front: open connections from one IP address, associated or not; more are rejected",
    )
    scp_acse_timeout_s: float = Field(
        default=5.0, gt=0, le=300,
        description="DICOM front: ARTIM, how long a new connection may take to send its A-ASSOCIATE-RQ",
    )
    scp_network_timeout_s: float = Field(
        default=60.0, gt=0, description="DICOM front: an association idle this long (no request) is aborted"
    )
    instance_id: str = Field(
        default="", max_length=32, pattern=r"^[A-Za-z0-9._-]*$",
        description="This deployment's ID in loop protection (empty: derived from AE title, host and port)",
    )
    scp_span_cache_ttl_s: float = Field(
        default=5.0, ge=0, description="How long the DICOM front trusts its copy of the span table"
    )
    scp_api_key: str = Field(
        default="", repr=False,
        description="API key the DICOM front sends to the API: role dicom_front, the only role that may "
        "name the DICOM caller for the audit trail (`spanner run` makes one for its own front when unset)"
    )

    cache_prefix: str = Field(
        default="spanner:", min_length=1, max_length=64,
        description="Prefix of every query-cache key: deployments sharing one Redis keep apart by it",
    )
    cache_max_bytes: int = Field(
        default=1 << 20, ge=0, description="Answers larger than this (bytes of JSON) are not cached"
    )
    cache_memory_entries: int = Field(
        default=1000, ge=0, description="In-process cache (no REDIS_URL): at most this many answers"
    )
    cache_memory_bytes: int = Field(
        default=64 << 20, ge=0, description="In-process cache (no REDIS_URL): at most this many bytes"
    )
    cache_timeout_s: float = Field(
        default=0.2, gt=0, le=5, description="Redis connect and reply timeout: a slow cache is skipped"
    )
    cache_retry_s: float = Field(
        default=2.0, ge=0, description="After a Redis failure, queries skip the cache this long"
    )

    events_exchange: str = Field(
        default="spanner.events", min_length=1, max_length=255,
        description="Topic exchange the events go to (RABBITMQ_URL set)",
    )
    events_poll_s: float = Field(
        default=1.0, gt=0, le=60, description="How often the relay looks at the outbox when not nudged"
    )
    events_gap_wait_s: float = Field(
        default=2.0, ge=0, le=60,
        description="How long the relay waits for an earlier, not yet committed event before passing it",
    )
    events_retention_hours: float = Field(
        default=24.0, ge=0, description="Published events stay in the outbox this long (0: deleted at once)"
    )
    requests_queue: str = Field(
        default="spanner.requests", max_length=200,
        description="Queue of AMQP spanning-query requests; '' turns the consumer off",
    )
    amqp_prefetch: int = Field(default=8, ge=1, le=1000, description="AMQP requests in flight per replica")
    amqp_delivery_limit: int = Field(
        default=3, ge=1, le=100,
        description="Deliveries of one request before the broker dead-letters it (a crash loop ends there)",
    )
    amqp_timeout_s: float = Field(default=5.0, gt=0, le=60, description="RabbitMQ connect and socket timeout")
    amqp_retry_s: float = Field(
        default=2.0, gt=0, le=300, description="Pause before reconnecting to RabbitMQ"
    )

    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line (for Fluentd); text: for a terminal"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Root log level of every process; DEBUG may show patient data"
    )

    auth_enabled: bool = Field(
        default=True, description="Every /api route needs an API key; only development may turn it off"
    )
    auth_cache_ttl_s: float = Field(
        default=5.0, ge=0, le=300,
        description="How long a replica trusts a key it looked up: a revocation takes effect within it",
    )
    audit_retention_days: int = Field(
        default=365, ge=0, description="Query and retrieval records older than this are purged (0: never)"
    )

    cors_origins: str = Field(
        default="",
        description="Origins (comma-separated, e.g. 'http://127.0.0.1:3000') whose pages may call the API "
        "and the DICOMweb front from a browser (CORS: Authorization and Accept allowed, preflight answered); "
        "'*' allows any; empty turns CORS off",
    )

    demo_fleet: bool = Field(
        default=True, description="Start three simulated PACS when no node is configured"
    )
    demo_base_port: int = Field(default=11120, ge=1, le=65530)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        self.var_dir = self.var_dir.resolve()  # replicas and workers may run in another directory
        if self.environment == "production":
            if not self.database_url.startswith("postgresql"):
                raise ValueError(
                    "production needs DATABASE_URL pointing at PostgreSQL (SQLite is for development)"
                )
            if self.demo_fleet:
                raise ValueError("production must not start the demo fleet: set SPANNER_DEMO_FLEET=false")
            if not self.auth_enabled:
                raise ValueError("production must not turn API keys off: remove SPANNER_AUTH_ENABLED=false")
        return self

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: str) -> str:
        for origin in _split_origins(value):
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"cors_origins: {origin!r} is not an origin; write scheme://host[:port] "
                                 "without a path or trailing slash, e.g. http://127.0.0.1:3000, or '*'")
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        """The allowed origins of ``cors_origins``, each once."""
        return list(dict.fromkeys(_split_origins(self.cors_origins)))

    @property
    def effective_spool_dir(self) -> Path:
        return (self.spool_dir or self.var_dir / "spool").resolve()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'spanner.db').resolve()}"


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")


def _split_origins(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, validated once; errors become ConfigError with the reason."""
    return load_settings()


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
