"""A logging filter that masks secrets in every record, whoever logged it (the masking itself
is common.redaction's).

Our own code never logs a key or token, but libraries (httpx, Django's error pages, Celery,
uvicorn's access log) log URLs, headers and exception texts. The filter masks anything shaped
like a provider key or a client token, the value of a query parameter named like a credential
(`?api_key=…`, `&access_token=…`), plus every upstream secret the process has decrypted,
however it is shaped.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

from common.redaction import redact


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
            # handler, so render them now, masked, and drop the raw exception.
            formatted = logging.Formatter().formatException(record.exc_info)
            cleaned = f"{cleaned}\n{redact(formatted)}"
            record.exc_info = None
            record.exc_text = None
        if cleaned != message:
            # A secret the arguments alone did not show: in the format string, in an argument
            # that is not text, or in a mapping of arguments. The record keeps the clean text
            # only, and loses uvicorn's coloured variant of the format string with its args.
            record.msg, record.args = cleaned, None
            record.__dict__.pop("color_message", None)
        return True


def configure_logging(config: dict[str, Any]) -> None:
    """settings.LOGGING_CONFIG: Django's LOGGING, then the filter on uvicorn's handlers too.

    uvicorn configures its loggers before it imports the app (and so before Django's LOGGING
    is applied), which leaves them alone. Adding the filter to the handlers they already have
    keeps uvicorn's format and its options: `--no-access-log` leaves the access logger without
    a handler, `--log-config` brings other handlers, and both still apply.
    """
    logging.config.dictConfig(config)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecretsFilter) for f in handler.filters):
                handler.addFilter(RedactSecretsFilter())
