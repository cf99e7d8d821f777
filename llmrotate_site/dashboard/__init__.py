"""The monitoring dashboard: server-rendered pages and HTMX partials over the same selectors as
the monitoring API (usage, keys, healthchecks), behind the admin's staff login."""
