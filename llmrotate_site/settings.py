"""Settings, all from the environment (and an optional `.env` next to manage.py).

Every knob is documented in docs/configuration.md. Django's own settings reference:
https://docs.djangoproject.com/en/5.2/ref/settings/
"""

from __future__ import annotations

import os
import zoneinfo
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from llmrotate_site.bootstrap import (
    GENERATED,
    data_dir_prepare,
    ensure_secrets,
    sqlite_file_prepare,
)

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

# Where generated secrets, the SQLite file and the record spool live.
DATA_DIR = Path(env("LLMROTATE_DATA_DIR", default=str(BASE_DIR / "var")))
if not DATA_DIR.is_absolute():
    DATA_DIR = (BASE_DIR / DATA_DIR).resolve()

data_dir_prepare(DATA_DIR)
# Secrets the environment does not provide come from DATA_DIR/secrets.env, generated there once.
_secrets = {name: env(name, default="") for name in GENERATED}
_unset = [name for name, value in _secrets.items() if not value]
if _unset:
    _secrets.update(ensure_secrets(DATA_DIR, _unset))

SECRET_KEY = _secrets["SECRET_KEY"]
# Fernet keys for upstream API keys at rest, kept apart from SECRET_KEY so that rotating one
# never makes the other unreadable. The first key encrypts; all of them decrypt.
LLMROTATE_ENCRYPTION_KEYS: list[str] = [
    k.strip() for k in _secrets["LLMROTATE_ENCRYPTION_KEYS"].split(",") if k.strip()
]

DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# Browser origins (`https://grafana.example.com`) allowed to call the read-only monitoring API;
# none by default. https://github.com/adamchainz/django-cors-headers#configuration
CORS_ALLOWED_ORIGINS = env.list("LLMROTATE_CORS_ORIGINS", default=[])
# The monitoring API only. Never the proxy (its /v1/ calls skip the middleware anyway, see
# asgi.ProxyHandler, but a page must not be invited to spend the keys), nor the admin and the
# dashboard, which work with a session cookie.
CORS_URLS_REGEX = r"^/(api|v1/usage|v1/replacement)/"
# Callers send their token in Authorization; no cookie is needed, so a page elsewhere that a
# logged-in admin visits cannot read the API with the admin's session.
CORS_ALLOW_CREDENTIALS = False
CORS_ALLOW_METHODS = ["GET", "HEAD", "OPTIONS"]
CORS_ALLOW_HEADERS = ["accept", "authorization", "content-type"]
# The export's file name.
CORS_EXPOSE_HEADERS = ["Content-Disposition"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ninja",
    "django_celery_beat",
    "axes",
    # Its system checks refuse a malformed LLMROTATE_CORS_ORIGINS entry at start.
    "corsheaders",
    "keys",
    "usage",
    "proxy",
    "healthchecks",
    "llmrotate_site.dashboard",
    # The composition root is an app only for its management commands (serve, demo, …).
    "llmrotate_site",
]

# For the admin, the dashboard and /api/ only: the proxy's /v1/ calls go past this stack
# (llmrotate_site.asgi.ProxyHandler, for speed), so a middleware added here never sees them.
# Anything the proxy needs belongs in proxy/ or in ProxyHandler itself.
MIDDLEWARE = [
    # First, as django-cors-headers asks: it answers preflights before anything else can, and
    # adds its headers to every answer, errors included. Only for CORS_URLS_REGEX (below).
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # After the session, before CommonMiddleware (as LocaleMiddleware asks): the viewer's
    # language and time zone, on the pages people read only (the JSON APIs stay English, UTC).
    "llmrotate_site.viewer.ViewerMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out login into its 403 answer.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "llmrotate_site.urls"
ASGI_APPLICATION = "llmrotate_site.asgi.application"
WSGI_APPLICATION = "llmrotate_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# https://django-environ.readthedocs.io/en/latest/types.html#environ-env-db-url
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'llmrotate.sqlite3'}")
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    if str(DATABASES["default"]["NAME"]) not in ("", ":memory:"):
        sqlite_file_prepare(Path(DATABASES["default"]["NAME"]))
    # WAL lets the dashboard read while the recorder writes; IMMEDIATE transactions make a
    # writer wait for the lock up front instead of failing half-way with "database is locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "init_command": (
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000;"
            ),
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    )
else:
    # 0 under ASGI: Django runs sync database work in short-lived threads, and a persistent
    # connection per such thread is never reused, only leaked until garbage collection.
    # https://docs.djangoproject.com/en/5.2/ref/databases/#persistent-connections
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Empty means embedded mode: key state in process. A redis:// URL shares key state, rate limits
# and breaker state between every web worker and host.
REDIS_URL = env("REDIS_URL", default="")
LLMROTATE_REDIS_PREFIX = env("LLMROTATE_REDIS_PREFIX", default="llmrotate:")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
# The dashboard's and the admin's languages (docs/dashboard.md, "Languages"): the browser's
# Accept-Language picks one until the viewer chooses in the dashboard; the choice is a cookie
# (django_language) kept for a year, which the admin follows too. The catalogues are in
# llmrotate_site/locale/ (.po, and the compiled .mo beside them: `make messages`).
LANGUAGES = [
    ("en", "English"),
    ("es", "Español"),
    ("fr", "Français"),
    ("de", "Deutsch"),
    ("ja", "日本語"),
    ("ko", "한국어"),
    ("ru", "Русский"),
    ("zh-hans", "简体中文"),
]
LOCALE_PATHS = [BASE_DIR / "llmrotate_site" / "locale"]
LANGUAGE_COOKIE_AGE = 365 * 24 * 3600
LANGUAGE_COOKIE_SAMESITE = "Lax"

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
# The gateway serves its own static files (admin, dashboard) so one process is enough; behind a
# CDN or a reverse proxy that serves STATIC_ROOT, turn this off.
LLMROTATE_SERVE_STATIC = env.bool("LLMROTATE_SERVE_STATIC", default=True)

# Rejected client tokens (invalid, revoked, expired) per source address and minute, in each
# process, after which that address gets 429 too_many_failed_auth for the rest of the minute,
# a valid token included (keys/auth.py). 0 turns it off. Behind a reverse proxy the address
# must be the client's (uvicorn's proxy headers, FORWARDED_ALLOW_IPS), or one bad client would
# lock out everyone (docs/security.md).
LLMROTATE_AUTH_FAILURES_PER_MINUTE = env.int("LLMROTATE_AUTH_FAILURES_PER_MINUTE", default=20)

LOGIN_URL = "/admin/login/"
# Failed admin logins, counted per client address by django-axes, which then refuses every
# login from that address (a 403, the right password included) until the address has made no
# attempt for the cool-off time. https://django-axes.readthedocs.io/en/latest/4_configuration.html
# Client tokens (the proxy, `/v1/` and `/api/`) never go through Django's authentication, so
# none of this costs them anything.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("LLMROTATE_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("LLMROTATE_LOGIN_COOLOFF_MINUTES", default=15))
# By address only: locking a username would let anyone lock the admin out.
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
AXES_HTTP_RESPONSE_CODE = 403
AXES_COOLOFF_MESSAGE = (
    "Too many failed logins from your address: logging in is blocked for "
    f"{AXES_COOLOFF_TIME.total_seconds() / 60:g} minutes after the last attempt."
)
# axes logs each failure and each lockout (a warning on the `axes` loggers); with these
# cleared, the lines show the username as typed and the client address (never the password).
AXES_SENSITIVE_PARAMETERS: list[str] = []
# Successful logins need no table of their own.
AXES_DISABLE_ACCESS_LOG = True
# Session storage, not the default cookie: a client token shown once after creation travels
# as a message and must not sit in a (signed, unencrypted) cookie.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

# --- Proxy ---------------------------------------------------------------------------------
# Largest accepted request body; larger ones get 413 before any upstream is called.
LLMROTATE_MAX_REQUEST_BYTES = env.int("LLMROTATE_MAX_REQUEST_BYTES", default=8 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = LLMROTATE_MAX_REQUEST_BYTES
# Request headers in all (names and values), on every path: more is a 431 (headers_too_large).
# uvicorn's parser (httptools) has no limit of its own.
LLMROTATE_MAX_HEADER_BYTES = env.int("LLMROTATE_MAX_HEADER_BYTES", default=64 * 1024)
# Upper bound on upstream attempts for one client request, across keys and deployments.
LLMROTATE_MAX_ATTEMPTS = env.int("LLMROTATE_MAX_ATTEMPTS", default=5)
# Total time allowed to get an answer (a whole JSON body, or a stream's first chunk) from some
# upstream, failover included, however slowly it trickles in.
LLMROTATE_REQUEST_DEADLINE_SECONDS = env.float("LLMROTATE_REQUEST_DEADLINE_SECONDS", default=120)
LLMROTATE_CONNECT_TIMEOUT_SECONDS = env.float("LLMROTATE_CONNECT_TIMEOUT_SECONDS", default=5)
# Longest silence allowed from an upstream: before the first byte, and between stream chunks.
LLMROTATE_READ_TIMEOUT_SECONDS = env.float("LLMROTATE_READ_TIMEOUT_SECONDS", default=120)
LLMROTATE_UPSTREAM_MAX_CONNECTIONS = env.int("LLMROTATE_UPSTREAM_MAX_CONNECTIONS", default=200)
# Connection pools per upstream, taken in turn (common/upstream.py; docs/configuration.md).
LLMROTATE_UPSTREAM_POOL_SHARDS = env.int("LLMROTATE_UPSTREAM_POOL_SHARDS", default=8)
# fast: common/fasthttp.py (HTTP/1.1 on asyncio and httptools). httpx: httpx's own transport
# (httpcore), sharded as above; the choice for a stack httpx has and the fast one lacks.
LLMROTATE_UPSTREAM_TRANSPORT = (
    env.str("LLMROTATE_UPSTREAM_TRANSPORT", default="fast").strip().lower()
)
if LLMROTATE_UPSTREAM_TRANSPORT not in ("fast", "httpx"):
    raise ImproperlyConfigured(
        f"LLMROTATE_UPSTREAM_TRANSPORT must be fast or httpx, not {LLMROTATE_UPSTREAM_TRANSPORT!r}."
    )
# How long routes, keys and tokens are cached in each process. Admin changes made in the same
# process apply at once; other processes see them within this many seconds.
LLMROTATE_CONFIG_CACHE_SECONDS = env.float("LLMROTATE_CONFIG_CACHE_SECONDS", default=5)
# Deepest nesting of arrays and objects accepted in a request body (a 400 beyond it): the
# gateway re-encodes the body, and Python's JSON encoder recurses once per level.
LLMROTATE_MAX_JSON_DEPTH = env.int("LLMROTATE_MAX_JSON_DEPTH", default=100)
# The longest wait an upstream may impose on a key through Retry-After, retry-after-ms or a
# rate-limit reset header; longer values are cut to this (they are more likely broken or
# hostile than true), and a key benched past it is re-checked instead of trusted.
LLMROTATE_MAX_UPSTREAM_WAIT_SECONDS = env.float(
    "LLMROTATE_MAX_UPSTREAM_WAIT_SECONDS", default=6 * 3600
)
# Largest non-streamed upstream answer held in memory; a larger one is a failed attempt
# (bad_response, response_too_large) and the next deployment is tried.
LLMROTATE_MAX_RESPONSE_BYTES = env.int("LLMROTATE_MAX_RESPONSE_BYTES", default=32 * 1024 * 1024)
# Largest single server-sent event relayed; a larger one ends the stream with an error event.
LLMROTATE_MAX_SSE_EVENT_BYTES = env.int("LLMROTATE_MAX_SSE_EVENT_BYTES", default=8 * 1024 * 1024)
# Longest a streamed answer is relayed, from the request's start: an upstream that never ends
# its stream gets an error event then, and a client that stops reading is cut off.
LLMROTATE_MAX_STREAM_SECONDS = env.float("LLMROTATE_MAX_STREAM_SECONDS", default=3600)

# --- Limits and budgets (keys/limits.py; docs/configuration.md "Limits and budgets") -------
# Tokens reserved for the answer when a request sets no max_tokens (settled from the usage).
LLMROTATE_LIMITS_DEFAULT_MAX_TOKENS = env.int("LLMROTATE_LIMITS_DEFAULT_MAX_TOKENS", default=1024)
# The time zone of the daily and monthly windows (requests and tokens per day, USD budgets).
LLMROTATE_LIMITS_TIME_ZONE = env("LLMROTATE_LIMITS_TIME_ZONE", default="UTC")
try:
    zoneinfo.ZoneInfo(LLMROTATE_LIMITS_TIME_ZONE)
except (zoneinfo.ZoneInfoNotFoundError, ValueError):
    raise ImproperlyConfigured(
        f"LLMROTATE_LIMITS_TIME_ZONE={LLMROTATE_LIMITS_TIME_ZONE!r} is not an IANA time zone"
        " (such as UTC or Europe/Paris)."
    ) from None
# Redis unreachable (scaled out): admit requests without limits (true) or refuse them with 503
# (false). Either way each request waits at most the timeout below for Redis; it is generous
# because a timeout fails open, and a busy worker's event loop can lag by tens of milliseconds.
LLMROTATE_LIMITS_FAIL_OPEN = env.bool("LLMROTATE_LIMITS_FAIL_OPEN", default=True)
LLMROTATE_LIMITS_REDIS_TIMEOUT_SECONDS = env.float(
    "LLMROTATE_LIMITS_REDIS_TIMEOUT_SECONDS", default=0.5
)
# Budget alerts (signed webhooks, LLMROTATE_WEBHOOK_URLS) at these shares of a budget, once per
# budget and period each.
LLMROTATE_BUDGET_ALERT_PERCENTS = env.list(
    "LLMROTATE_BUDGET_ALERT_PERCENTS", cast=int, default=[50, 80, 100]
)

# --- Recording -----------------------------------------------------------------------------
# Off: no call records, rollups or usage log lines (usage.recorder.record_call). Key health
# does not depend on them and works the same.
LLMROTATE_USAGE_RECORDING = env.bool("LLMROTATE_USAGE_RECORDING", default=True)
LLMROTATE_RECORD_FLUSH_SECONDS = env.float("LLMROTATE_RECORD_FLUSH_SECONDS", default=1.0)
LLMROTATE_RECORD_BATCH_SIZE = env.int("LLMROTATE_RECORD_BATCH_SIZE", default=500)
# Records held in memory while the database is unreachable; beyond this they are spooled to
# DATA_DIR/spool and replayed later, so nothing is dropped.
LLMROTATE_RECORD_BUFFER_MAX = env.int("LLMROTATE_RECORD_BUFFER_MAX", default=20000)
# Once the database has failed every write for this long, held records go to the spool at once
# (a passing error is retried in memory first): a killed process loses at most these seconds.
LLMROTATE_RECORD_SPOOL_AFTER_SECONDS = env.float(
    "LLMROTATE_RECORD_SPOOL_AFTER_SECONDS", default=5.0
)
LLMROTATE_SPOOL_DIR = DATA_DIR / "spool"
# Token estimates (for calls whose upstream reported no usage) tokenize at most this many
# characters of each text and extrapolate the rest, so one huge call costs bounded time.
LLMROTATE_ESTIMATE_MAX_CHARS = env.int("LLMROTATE_ESTIMATE_MAX_CHARS", default=64 * 1024)
# Reported tokens per call above which usage is implausible (flagged, kept out of the totals
# until accepted), for models whose context window is unknown.
LLMROTATE_MAX_PLAUSIBLE_TOKENS = env.int("LLMROTATE_MAX_PLAUSIBLE_TOKENS", default=20_000_000)

# --- Wire capture (docs/capture.md) ------------------------------------------------------
# Capture rules (admin, config file) choose what is captured; with this off, none applies.
LLMROTATE_CAPTURE_ALLOWED = env.bool("LLMROTATE_CAPTURE_ALLOWED", default=True)
LLMROTATE_CAPTURE_DIR = Path(env("LLMROTATE_CAPTURE_DIR", default=str(DATA_DIR / "captures")))
# A new file each hour, or sooner when one reaches this size.
LLMROTATE_CAPTURE_FILE_MAX_BYTES = env.int(
    "LLMROTATE_CAPTURE_FILE_MAX_BYTES", default=64 * 1024 * 1024
)
# The oldest files are deleted while the folder holds more than this, or once they are older
# than the retention age.
LLMROTATE_CAPTURE_MAX_TOTAL_BYTES = env.int(
    "LLMROTATE_CAPTURE_MAX_TOTAL_BYTES", default=1024 * 1024 * 1024
)
LLMROTATE_CAPTURE_RETENTION_HOURS = env.float("LLMROTATE_CAPTURE_RETENTION_HOURS", default=72)
# Of each response (and request body), the first this many bytes are kept; the rest is counted.
LLMROTATE_CAPTURE_MAX_BODY_BYTES = env.int(
    "LLMROTATE_CAPTURE_MAX_BODY_BYTES", default=8 * 1024 * 1024
)
# Of each response, at most this many pieces (reads) are kept, each with its time.
LLMROTATE_CAPTURE_MAX_CHUNKS = env.int("LLMROTATE_CAPTURE_MAX_CHUNKS", default=100_000)
# Exchanges (and their bytes) waiting for the writer thread; past either they are dropped (and
# counted), never waited for.
LLMROTATE_CAPTURE_QUEUE_MAX = env.int("LLMROTATE_CAPTURE_QUEUE_MAX", default=2000)
LLMROTATE_CAPTURE_QUEUE_MAX_BYTES = env.int(
    "LLMROTATE_CAPTURE_QUEUE_MAX_BYTES", default=256 * 1024 * 1024
)
# After a failed write (a full disk, a read-only folder), capturing pauses this long.
LLMROTATE_CAPTURE_RETRY_SECONDS = env.float("LLMROTATE_CAPTURE_RETRY_SECONDS", default=60)

# Also masks secrets in the lines of uvicorn's own loggers (its access log).
LOGGING_CONFIG = "llmrotate_site.logging.configure_logging"
# text: readable lines for a terminal. json: one object per line for log shippers, from every
# logger of every process `serve` runs (the llmrotate.usage line is JSON either way).
LLMROTATE_LOG_FORMAT = env.str("LLMROTATE_LOG_FORMAT", default="text").strip().lower()
if LLMROTATE_LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(
        f"LLMROTATE_LOG_FORMAT must be text or json, not {LLMROTATE_LOG_FORMAT!r}."
    )
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        # Defence in depth: whatever a library logs, secrets that look like provider keys or
        # client tokens are masked before the line is written.
        "redact": {"()": "llmrotate_site.logging.RedactSecretsFilter"},
        "one_line_warning": {"()": "llmrotate_site.logging.OneLineWarning"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "raw": {"format": "%(message)s"},
        "json": {"()": "llmrotate_site.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LLMROTATE_LOG_FORMAT == "json" else "plain",
            "filters": ["redact"],
        },
        "usage": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "raw",
            "filters": ["redact"],
        },
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {
        # One JSON object per upstream attempt, for log shippers.
        "llmrotate.usage": {
            "handlers": ["usage"],
            "level": env("LLMROTATE_USAGE_LOG_LEVEL", default="INFO"),
            "propagate": False,
        },
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        # Failed logins and lockouts are warnings; the rest is chatter.
        "axes": {"level": "WARNING"},
        "django.security.DisallowedHost": {"filters": ["one_line_warning"]},
    },
}
if LLMROTATE_LOG_FORMAT == "json":
    # Celery gives a logger without handlers (its task logger) a text handler of its own;
    # this one has ours, which it leaves alone.
    LOGGING["loggers"]["celery.task"] = {  # type: ignore[index]
        "handlers": ["console"],
        "propagate": False,
    }

# --- Celery --------------------------------------------------------------------------------
# https://docs.celeryq.dev/en/stable/userguide/configuration.html
# With REDIS_URL, Redis is the broker. Without it, kombu's filesystem transport queues messages as
# files under DATA_DIR/broker, so the embedded mode needs no broker service (one host only).
LLMROTATE_BROKER_DIR = DATA_DIR / "broker"
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
else:
    CELERY_BROKER_URL = "filesystem://localhost/"
    CELERY_BROKER_TRANSPORT = "llmrotate_site.broker:Transport"  # filesystem, stops quicker
    # Producers write to data_folder_out and the worker reads data_folder_in: on one host they
    # are the same folder. Processed messages are deleted, not kept.
    _broker_queue = LLMROTATE_BROKER_DIR / "queue"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_queue),
        "data_folder_out": str(_broker_queue),
        "processed_folder": str(LLMROTATE_BROKER_DIR / "processed"),
        "control_folder": str(LLMROTATE_BROKER_DIR / "control"),
        "store_processed": False,
        "polling_interval": env.float("LLMROTATE_BROKER_POLL_SECONDS", default=0.5),
    }
    for _folder in ("queue", "processed", "control"):
        (LLMROTATE_BROKER_DIR / _folder).mkdir(mode=0o700, parents=True, exist_ok=True)
# Several gateways may share one Redis (see LLMROTATE_REDIS_PREFIX); each needs its own queue.
CELERY_TASK_DEFAULT_QUEUE = env("LLMROTATE_CELERY_QUEUE", default="llmrotate")
# Tasks report through logs, health events and notifications; nobody reads task results, and
# with no result expiry beat does not add its backend-cleanup entry.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_EXPIRES = None
CELERY_TIMEZONE = TIME_ZONE
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Keep Django's LOGGING (and its secret-masking filter) in the worker.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# django-celery-beat's database scheduler (entries editable in the admin), which also writes
# the schedule defined in llmrotate_site/beat.py on start.
CELERY_BEAT_SCHEDULER = "llmrotate_site.beat:SyncedDatabaseScheduler"
# A line per task run (several a second with short probe intervals) is noise; failures still
# log at WARNING and above.
LOGGING["loggers"].update(  # type: ignore[attr-defined]
    {
        name: {"level": env("LLMROTATE_TASK_LOG_LEVEL", default="WARNING")}
        for name in ("celery.beat", "celery.app.trace", "celery.worker.strategy")
    }
)
# Worker threads for `manage.py serve` (probes and webhooks wait on the network, not the CPU).
LLMROTATE_WORKER_CONCURRENCY = env.int("LLMROTATE_WORKER_CONCURRENCY", default=4)

# --- Health checks -------------------------------------------------------------------------
# Endpoint probes at all, and each kind everywhere (each endpoint can also switch its own off).
LLMROTATE_HEALTH_CHECKS = env.bool("LLMROTATE_HEALTH_CHECKS", default=True)
LLMROTATE_PING_PROBES = env.bool("LLMROTATE_PING_PROBES", default=True)
LLMROTATE_HTTP_PROBES = env.bool("LLMROTATE_HTTP_PROBES", default=True)
# How often beat looks for due probes; each endpoint's own intervals are set in the admin.
LLMROTATE_PROBE_TICK_SECONDS = env.float("LLMROTATE_PROBE_TICK_SECONDS", default=5)
# Probe settings given to endpoints when they are first seen (then editable per endpoint).
LLMROTATE_PING_INTERVAL_SECONDS = env.int("LLMROTATE_PING_INTERVAL_SECONDS", default=30)
LLMROTATE_PING_FAILURE_THRESHOLD = env.int("LLMROTATE_PING_FAILURE_THRESHOLD", default=3)
LLMROTATE_HTTP_PROBE_INTERVAL_SECONDS = env.int("LLMROTATE_HTTP_PROBE_INTERVAL_SECONDS", default=60)
LLMROTATE_HTTP_PROBE_FAILURE_THRESHOLD = env.int(
    "LLMROTATE_HTTP_PROBE_FAILURE_THRESHOLD", default=2
)
LLMROTATE_HTTP_PROBE_TIMEOUT_SECONDS = env.float("LLMROTATE_HTTP_PROBE_TIMEOUT_SECONDS", default=5)
LLMROTATE_HEALTH_EVENT_RETENTION_DAYS = env.int("LLMROTATE_HEALTH_EVENT_RETENTION_DAYS", default=7)
LLMROTATE_KEY_REVALIDATE_SECONDS = env.float("LLMROTATE_KEY_REVALIDATE_SECONDS", default=300)
# Off: the proxy's gate admits every deployment; probes still keep and show breaker state.
LLMROTATE_CIRCUIT_BREAKER = env.bool("LLMROTATE_CIRCUIT_BREAKER", default=True)
# Circuit breaker: the first open period, doubling per repeated trip up to the maximum.
LLMROTATE_BREAKER_OPEN_SECONDS = env.float("LLMROTATE_BREAKER_OPEN_SECONDS", default=30)
LLMROTATE_BREAKER_MAX_OPEN_SECONDS = env.float("LLMROTATE_BREAKER_MAX_OPEN_SECONDS", default=600)
# Live traffic trips it when FAILURE_RATE of at least MIN_CALLS calls in WINDOW_SECONDS failed.
LLMROTATE_BREAKER_WINDOW_SECONDS = env.float("LLMROTATE_BREAKER_WINDOW_SECONDS", default=60)
LLMROTATE_BREAKER_MIN_CALLS = env.int("LLMROTATE_BREAKER_MIN_CALLS", default=10)
LLMROTATE_BREAKER_FAILURE_RATE = env.float("LLMROTATE_BREAKER_FAILURE_RATE", default=0.5)
# How often each web process re-reads breaker state changed by other processes.
LLMROTATE_BREAKER_SYNC_SECONDS = env.float("LLMROTATE_BREAKER_SYNC_SECONDS", default=1)
# Notifications: JSON POSTed to each URL on every health change, signed with the secret.
LLMROTATE_WEBHOOK_URLS = env.list("LLMROTATE_WEBHOOK_URLS", default=[])
# Off: nothing is POSTed to them; changes are still logged and signalled.
LLMROTATE_NOTIFICATIONS = env.bool("LLMROTATE_NOTIFICATIONS", default=True)
LLMROTATE_WEBHOOK_SECRET = _secrets["LLMROTATE_WEBHOOK_SECRET"]
LLMROTATE_WEBHOOK_RETRIES = env.int("LLMROTATE_WEBHOOK_RETRIES", default=5)

# --- Usage retention and monitoring --------------------------------------------------------
# Call records (and minute rollups) older than this many days are deleted by the scheduled
# `usage.usage_prune` task and by `manage.py prune_usage`; 0 keeps them forever. Hourly and
# daily rollups are kept, so analytics of older periods stay available. docs/configuration.md
LLMROTATE_USAGE_RETENTION_DAYS = env.int("LLMROTATE_USAGE_RETENTION_DAYS", default=90)
# Postgres' JIT compiler spent 150-200 ms compiling each 30-day analytics query (their cost
# estimates pass jit_above_cost) that then ran in 20-60 ms; the gateway's queries are all
# short, so JIT is off for its connections. https://www.postgresql.org/docs/current/jit.html
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("options", "-c jit=off")


# --- Observability (docs/observability.md) -------------------------------------------------
# Prometheus series at GET /metrics. Off: every update is a no-op and /metrics answers 404.
LLMROTATE_METRICS = env.bool("LLMROTATE_METRICS", default=True)
# Where each process of this host keeps its counters (prometheus-client's multiprocess mode):
# local disk, one directory per host. `serve` empties it when it starts.
LLMROTATE_METRICS_DIR = Path(env("LLMROTATE_METRICS_DIR", default=str(DATA_DIR / "metrics")))
# A token Prometheus sends as `Authorization: Bearer …` instead of a client token with the
# `monitor` scope. Empty: only monitor tokens (and staff sessions) may scrape.
LLMROTATE_METRICS_TOKEN = env.str("LLMROTATE_METRICS_TOKEN", default="")
# prometheus-client reads this when it is first imported (common.metrics).
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(LLMROTATE_METRICS_DIR)
