"""Fixtures of the site's own tests (serve, beat, the embedded broker, /healthz)."""

from tests.e2e.conftest import serve_processes  # noqa: F401 - the serve tests start processes
