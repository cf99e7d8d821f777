# The gateway's image: `docker build -t llmrotate .`, or `docker compose up` (README, "Docker").
#
# Two stages. The builder installs the pinned dependencies into a virtualenv and collects the
# static files; the runtime stage receives the virtualenv, the source and the collected files,
# and runs as an unprivileged user. Secrets are never part of the image: settings generate them
# into the data volume (/data/secrets.env) on the first start, unless the environment gives them.

# Pinned to an exact Python release and Debian suite; bump both stages together.
FROM python:3.11.16-slim-bookworm AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN python -m venv /opt/venv

# The dependencies alone first (pinned in pyproject.toml), so that a code change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt

# The project itself, as `make run` installs it: editable, so that BASE_DIR (settings) is /app,
# where templates/ and static/ are. .dockerignore lists what is copied.
COPY . .
RUN pip install --no-deps --editable . \
    && python -m compileall -q /app

# Static files for a reverse proxy that serves STATIC_ROOT (<data dir>/static); the gateway also
# serves them itself. Settings need their secrets to load: build-only placeholders, given to this
# command alone, so nothing is generated here; and only /data/static leaves this stage.
RUN LLMROTATE_DATA_DIR=/data \
    SECRET_KEY=build-only-placeholder \
    LLMROTATE_ENCRYPTION_KEYS=build-only-placeholder \
    LLMROTATE_WEBHOOK_SECRET=build-only-placeholder \
    python manage.py collectstatic --noinput --verbosity 0


FROM python:3.11.16-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    LLMROTATE_DATA_DIR=/data \
    LLMROTATE_HOST=0.0.0.0 \
    LLMROTATE_PORT=8000

# A fixed uid/gid, so that a bind-mounted data directory can be given to it (chown 10001:10001).
# /data belongs to it, mode 0700: a named volume mounted there starts as a copy of it.
RUN groupadd --gid 10001 llmrotate \
    && useradd --uid 10001 --gid llmrotate --create-home --home-dir /home/llmrotate \
        --shell /usr/sbin/nologin llmrotate \
    && install --directory --owner llmrotate --group llmrotate --mode 0700 /data

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
COPY --from=builder --chown=llmrotate:llmrotate /data/static /data/static

WORKDIR /app
USER 10001:10001
EXPOSE 8000
VOLUME ["/data"]

# `serve` stops its children gracefully on SIGTERM: uvicorn finishes requests in flight (up to
# 30 s) and the recorder flushes its records. Give it time: `docker run --stop-timeout 40`,
# `stop_grace_period: 40s` in compose.yaml (Docker's default is 10 s, then SIGKILL).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

# Migrations, the first admin user (password in the log and in /data/initial-admin-password),
# then the web server, a Celery worker and beat, listening on 0.0.0.0:8000. Any other manage.py
# command works too: `docker run --rm -v llmrotate-data:/data llmrotate changepassword admin`.
ENTRYPOINT ["python", "manage.py"]
CMD ["serve"]
