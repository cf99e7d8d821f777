"""Command line: ``python -m fake_upstream [--port 9100] [--script F] [--no-auth]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from .server import FakeUpstream, load_script_file, new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM. Reused by the Django ``fake_upstream`` command."""
    parser = argparse.ArgumentParser(
        prog="python -m fake_upstream",
        description="Scriptable fake OpenAI/Anthropic upstream for tests, demos and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    parser.add_argument("--script", metavar="FILE", help="JSON or YAML script applied at start")
    parser.add_argument(
        "--model", action="append", dest="models", metavar="ID", help="served model (repeatable)"
    )
    parser.add_argument(
        "--allow-key",
        action="append",
        dest="allowed_keys",
        metavar="KEY",
        help="accept only these keys (repeatable; default: any non-empty key)",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help='serve requests without a key too, as key "" (like a local Ollama or vLLM)',
    )
    args = parser.parse_args(argv)
    fake = FakeUpstream(
        script=load_script_file(args.script) if args.script else None,
        models=args.models,
        allowed_keys=set(args.allowed_keys) if args.allowed_keys else None,
        require_key=not args.no_auth,
    )

    async def run() -> None:
        await fake.start(args.host, args.port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Unavailable off the main thread and on Windows: Ctrl-C then raises instead.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, lambda: loop.create_task(fake.aclose()))
        print(f"fake-upstream listening on {fake.base_url}", flush=True)
        await fake.serve()

    loop = new_event_loop()
    try:
        loop.run_until_complete(run())
    except KeyboardInterrupt:
        loop.run_until_complete(fake.aclose())
    finally:
        loop.close()
    return 0
