"""All configuration, in one place.

Values come from, in order of precedence:
1. ``TIDECHAT_<NAME>`` variables (Flask's ``from_prefixed_env``: JSON values are parsed,
   so ``TIDECHAT_PING_INTERVAL=2.5`` is a float);
2. the conventional platform variables below (``REDIS_URL``, ``DATABASE_URL``, ...);
3. the defaults in ``DEFAULTS``.

The web process and the Celery worker both build their config here, through
``app.create_app``, so they always agree on key prefixes, TTLs and URLs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from tidechat import broker, redis_conn
from tidechat.redis_keys import RedisKeys

ROOT = Path(__file__).resolve().parent.parent
# Local state of a run: SQLite file, embedded Redis data, the generated secret key.
INSTANCE_DIR = Path(os.environ.get("TIDECHAT_INSTANCE_PATH") or ROOT / "instance")

DEFAULTS: dict[str, Any] = {
    # Services
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_MAX_CONNECTIONS": 10,  # per process, for API calls (SSE uses the hub's two)
    # On a Redis Cluster (REDIS_URL redis+cluster://host:port): generations are spread over
    # this many hash-tag buckets, and each web process runs one stream reader per bucket.
    # Every process of a deployment must agree on it; changing it strands running answers.
    "REDIS_CLUSTER_BUCKETS": 16,
    "DATABASE_URL": f"sqlite:///{INSTANCE_DIR / 'tidechat.db'}",
    # Per process: connections opened as needed and kept, more opened for a burst and
    # closed after each use, and how long a request waits for one once all are in use (then
    # 503 "busy"). Size them to the server's max_connections over every web and worker
    # process. No overflow by default: under gevent a burst past the kept connections opened
    # and closed one per answer (a new PostgreSQL backend each time, first tokens 30 % later).
    "DATABASE_POOL_SIZE": 30,
    "DATABASE_MAX_OVERFLOW": 0,
    "DATABASE_POOL_TIMEOUT": 10.0,
    "OPENAI_API_KEY": "",
    "OPENAI_BASE_URL": "",
    "OPENAI_TIMEOUT": 60.0,  # seconds without a byte from the model before giving up
    "ANSWER_DEADLINE": 600.0,  # seconds an answer may take in all, then upstream_timeout
    "TOKEN_DEADLINE": 120.0,  # seconds without a token (keep-alives don't count), likewise
    "OPENAI_MAX_RETRIES": 2,  # retries of the request itself (429/5xx/connect), never mid-stream
    # Seconds an idle connection to the model server is kept for the next answer. The HTTP
    # library's own 5 s closed it between most of a person's messages, so their next answer
    # paid a new TCP and TLS handshake; a server that closes sooner is noticed (its EOF) and
    # a new one opened. Kept under the idle limits of NATs and firewalls that drop silently.
    "OPENAI_KEEPALIVE": 60.0,
    "DEFAULT_MODEL": "gpt-4o-mini",
    "BACKEND_LABEL": "",  # a name for the model server on the page (default: none shown)
    # What a request may ask of the model (tidechat/policy.py)
    # The models offered and accepted, comma-separated (empty: those the backend lists).
    "MODELS": "",
    "MAX_OUTPUT_TOKENS": 1024,  # max_tokens of every answer (0: the model server's own)
    "CONTEXT_TOKENS": 8000,  # history sent per answer, oldest turns dropped first
    # How a partial answer is continued after a deploy handed it on (worker/model_client.py):
    # "completion" (llama.cpp, ChatML models), "continue_final_message" (vLLM), or "none"
    # (it ends "interrupted" and the page offers Continue).
    "CONTINUATION": "none",
    # Flask / accounts (tidechat/accounts.py)
    "SECRET_KEY": "",  # required in "open" and "invite" modes
    "SECRET_KEY_FALLBACKS": [],  # old keys still accepted while sessions move to the new one
    # "guest": anyone chats, with an identity per browser, and may sign up to keep it;
    # "open": sign-up open to all, sign-in required; "invite": sign-up by invitation only.
    "AUTH_MODE": "guest",
    "ADMIN_EMAILS": "",  # comma-separated; if empty, the first account is the admin
    "SESSION_DAYS": 30,  # a sign-in ends after this many days unused
    "INVITE_DAYS": 7,  # an invitation expires after this many days
    "MIN_PASSWORD_CHARS": 10,
    # Sign-in with an OpenID Connect provider (off unless OIDC_ISSUER is set)
    "OIDC_ISSUER": "",
    "OIDC_CLIENT_ID": "",
    "OIDC_CLIENT_SECRET": "",
    "OIDC_LABEL": "Single sign-on",
    "MAX_CONTENT_LENGTH": 1024 * 1024,  # bytes of a request body
    "BODY_TIMEOUT": 15.0,  # seconds a client may take to send a request body (408 past it)
    "MAX_MESSAGE_CHARS": 32_000,  # characters of one user message (413 past it)
    # Abuse and cost limits (tidechat/limits.py): per account, and per client address (which
    # many people may share behind one NAT, so those are wider).
    "RATE_LIMIT_MESSAGES": "20/minute;500/day",  # answers started: send, regenerate, continue
    "RATE_LIMIT_MESSAGES_IP": "60/minute;3000/day",
    "RATE_LIMIT_WRITES": "120/minute",  # every other write (create, rename, delete, cancel)
    "RATE_LIMIT_WRITES_IP": "600/minute",
    "RATE_LIMIT_AUTH_IP": "10/minute;100/day",  # sign-up and sign-in attempts
    "MAX_ACTIVE_ANSWERS": 3,  # answers queued or streaming at once
    "MAX_ACTIVE_ANSWERS_IP": 12,
    "MAX_STREAMS": 24,  # open event streams (tabs, devices)
    "MAX_STREAMS_IP": 120,
    "MAX_QUEUED": 500,  # answers waiting for a worker, app-wide (429 past it)
    "DAILY_TOKENS": 200_000,  # tokens an account may use per UTC day (0: no quota)
    # Public deployment (tidechat/security.py)
    # Proxies in front that set X-Forwarded-For/-Proto/-Host (ProxyFix): 0 trusts none;
    # Heroku's router is 1. More than really sit in front lets clients forge their address.
    "TRUSTED_PROXIES": 0,
    "FORCE_HTTPS": False,  # redirect plain-HTTP GET/HEAD to https (308), refuse the rest (403)
    # Redis layout and stream lifetime
    "KEY_PREFIX": "tidechat:",
    "STREAM_TTL": 3600,  # seconds a finished generation's stream stays replayable
    "LEASE_TTL": 6.0,  # seconds a worker's lease on a generation lives without renewal
    # A worker whose deltas come at least two per this wait waits this long before each
    # append, so many answers share its round trip (one answer alone is never held). 0: off.
    "STREAM_COALESCE_MS": 3.0,
    "LEASE_RENEW": 1.0,  # how often the worker renews it (and re-reads cancel flags)
    # SSE
    "PING_INTERVAL": 15.0,  # seconds between ": ping" comments on a quiet stream
    "SSE_RETRY_MS": 1000,  # the "retry:" hint sent to EventSource
    "HUB_BLOCK_MS": 5000,  # longest blocking XREAD of the per-process reader
    "HUB_READ_COUNT": 512,  # entries per stream per XREAD
    # Between reads that found entries, the reader waits this long per stream it watches:
    # a read costs in proportion to the streams it names, so this bounds what reading costs
    # (0.5 ms between reads at 100 streams, 5 ms at 1000; nothing to notice at a few).
    "HUB_PACE_US": 5.0,
    # Past this many watched streams the reader blocks on the moved stream, where each
    # append names its stream, and reads only those: an XREAD costs Redis per stream it
    # names, the moved stream a second round trip per read (cheaper from about 300 streams;
    # at 100, bursts of new answers got their first tokens later).
    "HUB_DIRECT_MAX": 200,
    "REAP_INTERVAL": 2.0,  # seconds between checks for generations whose worker died
    # Faults and deploys
    "REDIS_RETRY_SECONDS": 30.0,  # how long a worker retries a Redis write before failing
    "DB_RETRY_SECONDS": 60.0,  # ...and the database write of a finished answer
    "START_RETRIES": 5,  # times a task that could not start (Redis/database down) is retried
    "SWEEP_INTERVAL": 10.0,  # seconds between sweeps for answers nobody will finish
    "QUEUE_TIMEOUT": 900.0,  # seconds an answer may wait for a worker, then queue_timeout
    "DRAIN_SECONDS": 25.0,  # at SIGTERM, answers still running after this are handed on
    # Operations (tidechat/health.py, worker/heartbeat.py)
    "HEARTBEAT_INTERVAL": 5.0,  # seconds between a worker's heartbeats
    "READY_TIMEOUT": 2.0,  # seconds /readyz waits for Redis or the database
    "OPS_TOKEN": "",  # bearer token of the operator's endpoints (/metrics, /readyz details)
    "OPS_ALLOW": "127.0.0.1,::1",  # addresses that need no token for them
    # Logs (tidechat/logs.py): "text", or "json" for one JSON object per line, web and
    # worker alike. Read from the environment before the app is built (gunicorn.conf.py,
    # worker/celery_app.py), as are LOG_LEVEL, ACCESS_LOG and, for error reports
    # (tidechat/error_reporting.py), SENTRY_DSN, SENTRY_ENVIRONMENT and SENTRY_RELEASE.
    "LOG_FORMAT": "text",
    # Celery
    "CELERY_QUEUE": "tidechat",
    "NONSTREAM_TIMEOUT": 300.0,  # seconds a stream=false request waits for its answer
}

AUTH_MODES = ("guest", "open", "invite")

# Conventional (unprefixed) variable names read from the environment.
PLATFORM_VARS = (
    "REDIS_URL",
    "DATABASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "SECRET_KEY",
    "SECRET_KEY_FALLBACKS",
    "LOG_FORMAT",
)


def load_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then platform variables; prefixed variables are applied by Flask."""
    config = dict(DEFAULTS)
    for name in PLATFORM_VARS:
        value = os.environ.get(name)
        if value:
            config[name] = value
    if overrides:
        config.update(overrides)
    return config


def finalize(config: dict[str, Any]) -> None:
    """Derive values that depend on others, once everything is loaded."""
    mode = str(config.get("AUTH_MODE") or "guest").strip().lower()
    if mode not in AUTH_MODES:
        raise ValueError(f"TIDECHAT_AUTH_MODE must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    config["AUTH_MODE"] = mode
    if not config.get("SECRET_KEY"):
        if mode != "guest":
            # Each process would sign its own cookies: sign-ins would not survive a restart
            # nor reach a second web process.
            raise RuntimeError(
                f"SECRET_KEY must be set in {mode!r} mode (the same long random value on "
                "every web and worker process), e.g. SECRET_KEY=$(python -c "
                "'import secrets; print(secrets.token_hex(32))')"
            )
        config["SECRET_KEY"] = _instance_secret()
    fallbacks = config.get("SECRET_KEY_FALLBACKS") or []
    if isinstance(fallbacks, str):
        fallbacks = [k.strip() for k in fallbacks.split(",") if k.strip()]
    config["SECRET_KEY_FALLBACKS"] = list(fallbacks)
    config["DATABASE_URL"] = normalize_database_url(config["DATABASE_URL"])
    clustered = redis_conn.is_cluster(config["REDIS_URL"])
    config["REDIS_BUCKETS"] = int(config["REDIS_CLUSTER_BUCKETS"]) if clustered else 0
    keys = redis_keys(config)
    broker_settings, transport_options = broker.settings(config["REDIS_URL"])
    config["CELERY"] = {
        **broker_settings,
        "task_ignore_result": True,
        "task_default_queue": config["CELERY_QUEUE"],
        # A generation is not retried on worker loss: its stream already holds text the
        # user has seen, so a second run would double it (see README, "Faults and deploys").
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,
        # Cancel goes through Redis flags, not Celery's remote control: no pidbox to keep.
        "worker_enable_remote_control": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "global_keyprefix": keys.celery_prefix(),
            **transport_options,
            # Tasks are acknowledged as they start, so only a task a worker had reserved
            # but not started waits this long for redelivery after that worker is killed
            # (kombu's default, an hour, left its chat waiting an hour). Delivering one
            # twice is harmless: only one run can claim a generation.
            "visibility_timeout": 300,
            # Fair scheduling: a list per level, the lowest first (tidechat/limits.py).
            # (kombu's own separator: a ":" would split queue names that hold one)
            "priority_steps": [0, 1, 2, 3],
            "queue_order_strategy": "priority",
        },
    }


def redis_keys(config: dict[str, Any]) -> RedisKeys:
    """The Redis key schema of this deployment (after ``finalize``)."""
    return RedisKeys(config["KEY_PREFIX"], buckets=int(config.get("REDIS_BUCKETS") or 0))


def normalize_database_url(url: str) -> str:
    """Heroku hands out ``postgres://``; SQLAlchemy wants a driver name."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _instance_secret() -> str:
    """A random key kept in instance/ so identities survive restarts of a local run."""
    path = INSTANCE_DIR / "secret_key"
    if not path.exists():
        INSTANCE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        # Created 0600 (never readable by others, not even for a moment), and only by us.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
                out.flush()
                os.fsync(out.fileno())  # a crash never leaves an empty key in place
            # atomic: web and worker may start at once, and only one key may win
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
