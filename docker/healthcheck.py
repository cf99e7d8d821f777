"""The image's HEALTHCHECK: exit 0 when the gateway's `/healthz` answers 200, 1 otherwise.

Slim images have no curl, so this uses the standard library only. It asks the server `serve`
runs in this container (`LLMROTATE_PORT`, 8000 in the image) on 127.0.0.1, past any HTTP proxy
set in the environment for upstream calls. `/healthz` answers 503 when the database, the broker
or Redis fails, which makes the container unhealthy too. The request's host is 127.0.0.1, so
keep it in ALLOWED_HOSTS (the default has it; compose.yaml allows every host).
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_SECONDS = 4.0


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('LLMROTATE_PORT', '8000')}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except Exception as exc:  # refused, timed out, or an HTTP error status (503, 400, …)
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
