"""A logging filter that masks secrets in every record, whoever logged it (the masking itself
is common.redaction's), and the JSON format of every line (LLMROTATE_LOG_FORMAT=json).

Our own code never logs a key or token, but libraries (httpx, Django's error pages, Celery,
uvicorn's access log) log URLs, headers and exception texts. The filter masks anything shaped
like a provider key or a client token, the value of a query parameter named like a credential
(`?api_key=…`, `&access_token=…`), plus every upstream secret the process has decrypted,
however it is shaped.

JSON lines are one object each: `timestamp` (UTC, milliseconds), `level`, `logger`, `message`,
the proxied request's `request_id` and the active span's `trace_id`/`span_id` when there are
some (common.logcontext), and `exception` (masked like the message) when there is one.
"""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from common import logcontext
from common.redaction import redact

# uvicorn's access records carry these five arguments (its AccessFormatter relies on them too).
_ACCESS_FIELDS = ("client_addr", "method", "path", "http_version", "status_code")


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            # Formatters may read the arguments themselves (uvicorn's access formatter unpacks
            # its five), so they stay a tuple, each text masked on its own.
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Exception texts (e.g. an httpx error quoting a URL) are formatted later by the
            # handler, so render them now, masked, and drop the raw exception. Formatters
            # append a record's exc_text after its message (the text line is the same as
            # before) and JSON lines give it a field of its own.
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = redact(formatted)
        if cleaned != message:
            # A secret the arguments alone did not show: in the format string, in an argument
            # that is not text, or in a mapping of arguments. The record keeps the clean text
            # only, and loses uvicorn's coloured variant of the format string with its args.
            record.msg, record.args = cleaned, None
            record.__dict__.pop("color_message", None)
        return True


class OneLineWarning(logging.Filter):
    """Django logs each request with a Host outside ALLOWED_HOSTS as an ERROR with its
    traceback: anyone can send one, so each would cost the log a screenful and page whoever
    watches errors. It is a warning of one bounded line."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Masked before it is cut, so that no part of a secret is left unrecognised.
        record.msg, record.args = redact(record.getMessage())[:300], None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = record.stack_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in texts are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "timestamp": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            line.update(zip(_ACCESS_FIELDS, args, strict=True))
        if request_id := logcontext.request_id():
            line["request_id"] = request_id
        if ids := logcontext.trace_ids():
            line["trace_id"], line["span_id"] = ids
        if record.exc_info and not record.exc_text:
            # Only without RedactSecretsFilter on the handler, which leaves exc_text masked.
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(config: dict[str, Any]) -> None:
    """settings.LOGGING_CONFIG: Django's LOGGING, then the filter on uvicorn's handlers too,
    and with LLMROTATE_LOG_FORMAT=json their lines in JSON.

    uvicorn configures its loggers before it imports the app (and so before Django's LOGGING
    is applied), which leaves them alone. Adding the filter to the handlers they already have
    keeps uvicorn's options: `--no-access-log` leaves the access logger without a handler,
    `--log-config` brings other handlers, and both still apply. Their format is uvicorn's in
    text mode, and JSON in JSON mode, as every other line.
    """
    logging.config.dictConfig(config)
    json_lines = getattr(settings, "LLMROTATE_LOG_FORMAT", "text") == "json"
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecretsFilter) for f in handler.filters):
                handler.addFilter(RedactSecretsFilter())
            if json_lines and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
