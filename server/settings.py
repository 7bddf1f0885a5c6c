"""One frozen :class:`Settings`, built from the environment (SPEC §1).

Every ``CHINWAG_*`` variable has exactly one home: here. A bad value fails
at start-up with a message naming the variable, never later at request time.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

__all__ = ["Settings", "SettingsError"]


class SettingsError(ValueError):
    """A configuration variable has a value chinwag cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not 0 <= value < float("inf"):
        raise SettingsError(f"{name} must be a non-negative number, got {raw!r}")
    return value


def _database_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("CHINWAG_DATABASE_URL", "").strip()
    if not raw:
        return None
    if not raw.startswith(("postgresql://", "postgres://")):
        # Never echo the value: it may hold a password.
        raise SettingsError("CHINWAG_DATABASE_URL must be a postgresql://… URL")
    return raw


def _redis_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("CHINWAG_REDIS_URL", "").strip()
    if not raw:
        return None
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        # Never echo the value: it may hold a password.
        raise SettingsError("CHINWAG_REDIS_URL must be a redis://, rediss:// or unix:// URL")
    return raw


def _bool(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 3002
    db_path: Path = Path("chinwag.db")
    #: ``postgresql://…``: the store and the ledger live there instead of ``db_path``.
    database_url: str | None = field(default=None, repr=False)
    jwt_secret: str = field(default="", repr=False)
    jwt_public_key: str | None = field(default=None, repr=False)
    jwt_ttl_s: int = 3600
    sse_heartbeat_ms: int = 10_000
    provider: str = "simulated"
    bedrock_endpoint_url: str | None = None
    bedrock_read_timeout_ms: int = 120_000
    upstream_max_attempts: int = 3
    sim_ttft_ms: int = 50
    sim_tokens_per_s: int = 50
    sim_answer_tokens: int = 200
    observe_ring: int = 4096
    stream_buffer_ms: int = 30_000
    disconnect_grace_ms: int = 0
    rate_limit: int = 100
    max_streams_per_user: int = 20
    max_streams: int = 10_000
    max_body_bytes: int = 1_048_576
    shutdown_grace_ms: int = 10_000
    slow_client_timeout_ms: int = 30_000
    retention_days: int = 0
    cors_origins: tuple[str, ...] = ("*",)
    test_scenarios: bool = False
    models_file: Path | None = None
    #: This process's name in a cluster (SPEC §9); host name + pid by default.
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    #: ``redis://…``: cluster mode (SPEC §9); coordination goes through Redis (server.cluster).
    redis_url: str | None = field(default=None, repr=False)
    #: A node that has not renewed its lease for this long is dead (SPEC §9).
    node_lease_ms: int = 10_000
    #: What one credit is worth in US dollars: ``cost_usd`` of /api/v1/chat's usage event.
    credit_usd: float = 0.00001
    memory_top_k: int = 5
    memory_token_budget: int = 500

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``CHINWAG_*`` variables; unset ones take the SPEC §1 defaults."""
        env = os.environ if env is None else env
        d = cls()
        provider = env.get("CHINWAG_PROVIDER", d.provider).strip() or d.provider
        if provider not in {"simulated", "bedrock"}:
            raise SettingsError(
                f"CHINWAG_PROVIDER must be 'simulated' or 'bedrock', got {provider!r}"
            )
        secret = env.get("CHINWAG_JWT_SECRET", "")
        if secret and len(secret.encode()) < 32:
            raise SettingsError("CHINWAG_JWT_SECRET must be at least 32 bytes")
        origins = tuple(
            o.strip() for o in env.get("CHINWAG_CORS_ORIGINS", "*").split(",") if o.strip()
        )
        models_file = env.get("CHINWAG_MODELS_FILE")
        return cls(
            host=env.get("CHINWAG_HOST", d.host) or d.host,
            port=_int(env, "CHINWAG_PORT", d.port),
            db_path=Path(env.get("CHINWAG_DB", str(d.db_path)) or d.db_path),
            database_url=_database_url(env),
            jwt_secret=secret,
            jwt_public_key=env.get("CHINWAG_JWT_PUBLIC_KEY") or None,
            jwt_ttl_s=_int(env, "CHINWAG_JWT_TTL_S", d.jwt_ttl_s, minimum=1),
            sse_heartbeat_ms=_int(env, "CHINWAG_SSE_HEARTBEAT_MS", d.sse_heartbeat_ms, minimum=1),
            provider=provider,
            bedrock_endpoint_url=env.get("CHINWAG_BEDROCK_ENDPOINT_URL") or None,
            bedrock_read_timeout_ms=_int(
                env, "CHINWAG_BEDROCK_READ_TIMEOUT_MS", d.bedrock_read_timeout_ms, minimum=1
            ),
            upstream_max_attempts=_int(
                env, "CHINWAG_UPSTREAM_MAX_ATTEMPTS", d.upstream_max_attempts, minimum=1
            ),
            sim_ttft_ms=_int(env, "CHINWAG_SIM_TTFT_MS", d.sim_ttft_ms),
            sim_tokens_per_s=_int(env, "CHINWAG_SIM_TOKENS_PER_S", d.sim_tokens_per_s),
            sim_answer_tokens=_int(
                env, "CHINWAG_SIM_ANSWER_TOKENS", d.sim_answer_tokens, minimum=1
            ),
            observe_ring=_int(env, "CHINWAG_OBSERVE_RING", d.observe_ring, minimum=16),
            stream_buffer_ms=_int(env, "CHINWAG_STREAM_BUFFER_MS", d.stream_buffer_ms),
            disconnect_grace_ms=_int(env, "CHINWAG_DISCONNECT_GRACE_MS", d.disconnect_grace_ms),
            rate_limit=_int(env, "CHINWAG_RATE_LIMIT", d.rate_limit, minimum=1),
            max_streams_per_user=_int(
                env, "CHINWAG_MAX_STREAMS_PER_USER", d.max_streams_per_user, minimum=1
            ),
            max_streams=_int(env, "CHINWAG_MAX_STREAMS", d.max_streams, minimum=1),
            max_body_bytes=_int(env, "CHINWAG_MAX_BODY_BYTES", d.max_body_bytes, minimum=64),
            shutdown_grace_ms=_int(env, "CHINWAG_SHUTDOWN_GRACE_MS", d.shutdown_grace_ms),
            retention_days=_int(env, "CHINWAG_RETENTION_DAYS", d.retention_days),
            slow_client_timeout_ms=_int(
                env, "CHINWAG_SLOW_CLIENT_TIMEOUT_MS", d.slow_client_timeout_ms, minimum=100
            ),
            cors_origins=origins or ("*",),
            test_scenarios=_bool(env, "CHINWAG_TEST_SCENARIOS"),
            models_file=Path(models_file) if models_file else None,
            node_id=env.get("CHINWAG_NODE_ID", "").strip() or d.node_id,
            redis_url=_redis_url(env),
            node_lease_ms=_int(env, "CHINWAG_NODE_LEASE_MS", d.node_lease_ms, minimum=100),
            credit_usd=_float(env, "CHINWAG_CREDIT_USD", d.credit_usd),
            memory_top_k=_int(env, "CHINWAG_MEMORY_TOP_K", d.memory_top_k, minimum=1),
            memory_token_budget=_int(
                env, "CHINWAG_MEMORY_TOKEN_BUDGET", d.memory_token_budget, minimum=1
            ),
        )

    def with_secret(self) -> Settings:
        """Return settings whose ``jwt_secret`` is set.

        With ``CHINWAG_JWT_SECRET`` unset, a random secret is created once and
        kept beside the DB (``<db>.secret``, mode 0600), so tokens survive a
        restart and the CLI's ``chinwag token`` agrees with the server.
        """
        if self.jwt_secret:
            return self
        path = self.db_path.with_name(self.db_path.name + ".secret")
        if path.exists():
            secret = path.read_text().strip()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            secret = secrets.token_urlsafe(48)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret)
        return replace(self, jwt_secret=secret)

    @property
    def database(self) -> str:
        """Where the store and the ledger live: the PostgreSQL URL, else the SQLite path."""
        return self.database_url or str(self.db_path)

    def describe(self) -> dict[str, object]:
        """Settings for logs: never the secret, the key or a connection password."""
        from ledger import mask_url

        hidden = {"jwt_secret", "jwt_public_key", "database_url", "redis_url"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        out["database"] = mask_url(self.database_url) if self.database_url else str(self.db_path)
        out["redis"] = mask_url(self.redis_url) if self.redis_url else None
        return out
