"""What counting prompt tokens for reconciliation costs (issue #9), per call, off the hot path.

The proxy hands the request body it received and the one it forwarded to the recorder by
reference; the recorder's estimator thread tokenizes them (`usage.calls.call_count_tokens`).
This measures that thread's CPU time per call for prompts of several sizes, so the cost can be
read against the gateway's own CPU per request (`bench/proxy_overhead.py`, docs/benchmarks.md).

    .venv/bin/python bench/token_counting.py            # prints a Markdown table
    .venv/bin/python bench/token_counting.py --quick    # a smoke run

CPU time (`time.thread_time`) rather than wall time: the figure is what the thread takes from
the core, and it barely moves when other programs share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SENTENCE = (
    "The gateway rotates keys across providers and records every call with its tokens, "
    "latency and cost so that operators can see what their traffic does."
)
WORDS = SENTENCE.split()


def text(chars: int) -> str:
    out: list[str] = []
    size = 0
    i = 0
    while size < chars:
        word = WORDS[i % len(WORDS)]
        out.append(word)
        size += len(word) + 1
        i += 1
    return " ".join(out)[:chars]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def chat(turns: int, chars_per_message: int, *, tools: bool = False) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": text(200)}]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": text(chars_per_message)})
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": messages, "stream": True}
    if tools:
        body["tools"] = TOOLS
    return body


CASES: list[tuple[str, dict[str, Any]]] = [
    ("one short message", chat(1, 60)),
    ("chat, 10 messages of 400 chars", chat(10, 400)),
    ("chat with tools, 10 messages", chat(10, 400, tools=True)),
    ("long prompt, 40k chars", chat(3, 13_000)),
    ("huge prompt, 2 MB (sampled)", chat(2, 1_000_000)),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="calls per case (fewer for big)")
    parser.add_argument("--quick", action="store_true", help="a few calls per case")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmrotate_site.settings")
    # Nothing is written there; settings only need a data directory to exist.
    os.environ.setdefault("LLMROTATE_DATA_DIR", tempfile.mkdtemp(prefix="llmrotate-bench-"))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.conf import settings

    from usage.calls import CallData, call_count_tokens
    from usage.tokens import count_prompt_tokens, encoding_for

    max_chars = settings.LLMROTATE_ESTIMATE_MAX_CHARS
    now = datetime.now(UTC)
    # Load the encodings first: a one-off cost per process, not per call.
    count_prompt_tokens(CASES[0][1], model="gpt-4o-mini", max_chars=max_chars)
    rows: list[dict[str, Any]] = []
    for name, sent in CASES:
        # What the proxy forwards on a streamed OpenAI call: a shallow copy with the model set
        # and stream_options added (proxy.dialects), the prompt objects shared.
        forwarded = {**sent, "stream_options": {"include_usage": True}}
        size = len(json.dumps(sent))
        runs = 5 if args.quick else max(20, min(args.runs, args.runs * 20_000 // size))
        samples = []
        tokens = 0
        for _ in range(runs):
            data = CallData(
                request_id="bench",
                started_at=now,
                finished_at=now,
                outcome="success",
                requested_model="gpt-4o-mini",
                upstream_model="gpt-4o-mini",
                prompt_body=sent,
                forwarded_body=forwarded,
            )
            start = time.thread_time()
            call_count_tokens(data)
            samples.append((time.thread_time() - start) * 1e6)
            tokens = data.counted_prompt_tokens or 0
        rows.append(
            {
                "case": name,
                "body_bytes": size,
                "counted_prompt_tokens": tokens,
                "runs": runs,
                "cpu_us_median": statistics.median(samples),
                "cpu_us_p90": sorted(samples)[int(0.9 * (len(samples) - 1))],
            }
        )
    print(f"encoding for gpt-4o-mini: {encoding_for('gpt-4o-mini')}; max chars {max_chars}\n")
    print("| prompt | body | counted tokens | CPU per call, median | p90 | calls/s per thread |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['body_bytes']:,} B | {r['counted_prompt_tokens']:,} "
            f"| {r['cpu_us_median']:,.0f} µs | {r['cpu_us_p90']:,.0f} µs "
            f"| {1e6 / r['cpu_us_median']:,.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"max_chars": max_chars, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
