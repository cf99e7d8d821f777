"""A scriptable fake OpenAI / Anthropic upstream for end-to-end tests, demos and benchmarks.

Why a hand-written HTTP/1.1 server instead of an ASGI app: tests must be able to drop a
connection before any response byte or cut a chunked body mid-stream, and ASGI servers
hide the socket precisely to prevent that. Owning the wire also keeps per-request CPU
tiny, so a benchmark measures the gateway rather than this server.

Stdlib only (uvloop and PyYAML are optional) and it never imports Django: it runs as a
separate process or thread with no settings configured.
"""

from .cli import main
from .server import (
    DEFAULT_BEHAVIOUR,
    DEFAULT_MODELS,
    FAULTS,
    FakeUpstream,
    RecordedRequest,
    load_script_file,
    normalize_behaviour,
)

__all__ = [
    "DEFAULT_BEHAVIOUR",
    "DEFAULT_MODELS",
    "FAULTS",
    "FakeUpstream",
    "RecordedRequest",
    "load_script_file",
    "main",
    "normalize_behaviour",
]
