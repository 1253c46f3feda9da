"""One typed settings object, read from ``THREADLINE_*`` environment variables.

Every field here is documented in the README's configuration table; keep them in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEV_ENDPOINTS_FILE", "Settings", "sql_dir"]

# Written into the data dir by `threadline dev` while it runs, so that other CLI commands
# (`threadline keys …`, `threadline migrate`) find the embedded stack without configuration.
DEV_ENDPOINTS_FILE = "endpoints.env"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THREADLINE_", extra="ignore", frozen=True)

    # HTTP server
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(
        default=0,
        ge=0,
        le=256,
        description=(
            "Server worker processes on the one port (serve and dev); 0 = one per CPU. Each has "
            "its own event loop, pool and caches; 1 runs the server in the launching process."
        ),
    )

    # Postgres: the source of truth.
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/threadline",
        validation_alias=AliasChoices("THREADLINE_DATABASE_URL", "DATABASE_URL"),
    )
    db_pool_min_size: int = Field(default=2, ge=0)
    db_pool_max_size: int = Field(default=20, ge=1)
    migrate_on_start: bool = True

    # S3-compatible object storage for channel records.
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_bucket: str = "threadline"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    # Object GETs in flight per worker: many readers catching up from cold history would
    # otherwise open one S3 connection per chunk at once (thousands, kept idle afterwards).
    s3_max_concurrent_reads: int = Field(default=32, ge=1)

    # ClickHouse (HTTP interface) for session lists.
    clickhouse_url: str = "http://default:@127.0.0.1:8123/threadline"
    list_source: Literal["auto", "clickhouse", "postgres"] = Field(
        default="auto",
        description=(
            "Where lists and counts come from. auto: ClickHouse once the replication slot exists "
            "and ClickHouse answers, else Postgres. Either way Postgres is the fallback."
        ),
    )
    min_lsn_wait_seconds: float = Field(
        default=5.0, gt=0, le=60, description="How long a list with minLsn waits for replication (then 503)."
    )

    # Auth
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=300)
    session_token_default_ttl_seconds: int = Field(default=3600, ge=60)
    session_token_max_ttl_seconds: int = Field(default=86400, ge=60)
    cors_allow_origins: str = "*"
    public_url: str | None = Field(
        default=None,
        description="The base URL clients reach this server at (behind a proxy); used in returned URLs.",
    )
    auth_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long a verified key/secret is cached; revocation lag."
    )

    # Replication of sessions into ClickHouse (one leader across all instances)
    replication_enabled: bool = True
    replication_batch_rows: int = Field(default=5000, ge=1, le=100_000)
    replication_poll_interval_seconds: float = Field(default=0.1, gt=0, le=10)

    # Channels and Durable Streams
    long_poll_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="How long a live=long-poll read waits for new data (then 204).",
    )
    sse_heartbeat_seconds: float = Field(
        default=15.0, gt=0, le=300, description="Idle SSE connections get a comment line this often."
    )
    sse_send_timeout_seconds: float = Field(
        default=30.0, gt=0, description="An SSE reader that takes no bytes for this long is dropped."
    )
    sse_max_buffered_bytes: int = Field(
        default=1024 * 1024,
        ge=64 * 1024,
        description=(
            "Most unsent bytes the server holds for one SSE reader: a behind reader's catch-up is "
            "read in steps of this size and written only as fast as its socket takes it."
        ),
    )
    dependency_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description=(
            "Bound on a request's Postgres and S3 calls (waiting for a pooled connection included): "
            "a stalled dependency answers 503 within it. Commits keep their own bound. A list's "
            "ClickHouse query falls back to Postgres after it (at most 10 s)."
        ),
    )
    commit_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        le=60,
        description="Bound on each statement of a group commit, COMMIT included.",
    )
    commit_outcome_wait_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description=(
            "When COMMIT's reply is lost (timeout, connection dropped), how long to ask Postgres "
            "whether it committed before answering outcome_unknown."
        ),
    )
    commit_concurrency: int = Field(
        default=2,
        ge=1,
        le=32,
        description=(
            "Group commits in flight at once: their object PUTs overlap, and those with no stream "
            "in common commit concurrently (per stream they commit in order)."
        ),
    )
    chunk_cache_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, description="In-memory cache of recent record chunks, per instance."
    )
    max_read_bytes: int = Field(
        default=8 * 1024 * 1024, ge=64 * 1024, description="Most record bytes one catch-up read returns."
    )
    maintenance_interval_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often the maintenance leader compacts, collects garbage and retires expired streams.",
    )
    gc_grace_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How long an unreferenced or orphan object stays in the bucket before it is deleted.",
    )
    orphan_sweep_interval_seconds: float = Field(
        default=3600.0, gt=0, description="How often the bucket is listed for objects no index row knows."
    )
    orphan_min_age_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="An object no row knows is deleted only this long after its PUT (a flush commits "
        "within ~2 minutes of its PUT or fails).",
    )
    compact_min_chunks: int = Field(
        default=16, ge=2, description="Chunks in shared batch objects before a stream is compacted."
    )
    compact_min_age_seconds: float = Field(
        default=60.0, ge=0, description="Only batch objects at least this old are compacted (tails stay put)."
    )

    # Durable Streams subscriptions (docs/subscriptions.md)
    webhook_allowed_hosts: str = Field(
        default="",
        description=(
            "Hosts subscription webhooks may call, comma-separated: exact names or IPs, *.example.com, "
            "or * for any public host. Wildcards admit public https hosts only; private, loopback and "
            "link-local addresses, and plain http, need the host listed exactly. Empty: no webhooks."
        ),
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="How long one webhook delivery may take before it counts as failed.",
    )
    subscription_sweep_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description=(
            "How often each instance looks for expired leases, due webhook retries and wakes a crash "
            "or a lost notification left undone (appends wake subscriptions at once; this is the backstop)."
        ),
    )

    # Logging
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    access_log: str = Field(
        default="sample:100",
        pattern=r"^(all|errors|off|sample:[1-9][0-9]{0,8})$",
        description="Which requests get an access-log line: all, errors (status >= 400), "
        "sample:N (errors and one in N of the rest) or off.",
    )

    # Embedded stack (`threadline dev`)
    data_dir: Path = Path(".threadline")

    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.cors_allow_origins.split(",") if origin.strip()]


# Where the SQL files live: inside the wheel, or at the repository root in a checkout. Found once
# at import, so asking for them later touches no file system (it is asked on the event loop).
_BUNDLED_SQL = Path(__file__).parent / "_sql"
_SQL_ROOT = _BUNDLED_SQL if _BUNDLED_SQL.is_dir() else Path(__file__).resolve().parents[2]


def sql_dir(name: Literal["pg_migrations", "clickhouse_schema"]) -> Path:
    return _SQL_ROOT / name
