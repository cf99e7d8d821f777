"""FakeUpstream: per-key scripted behaviours, request routing and the serving lifecycle."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from . import wire
from .http11 import (
    LAST_CHUNK,
    Headers,
    HTTPError,
    Request,
    chunk,
    encode_json,
    json_response,
    read_request,
    response_head,
)

DEFAULT_MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "claude-3-5-haiku-latest"]
DEFAULT_BEHAVIOUR: dict[str, Any] = {
    "fault": "none",
    "retry_after": None,
    "latency_ms": 0,
    "token_delay_ms": 0,
    "cut_after": 3,
    "completion_tokens": 16,
    "reply": None,
    "tool_calls": None,
    "usage": True,
    "usage_completion_tokens": None,
}
FAULTS = frozenset(
    {"none", "429", "401", "403", "402", "quota", "500", "503", "529"}
    | {"drop", "cut", "garbage", "tool_call"}
    | {"no_done", "no_usage", "error_200", "bad_tool_args", "bad_sse"}
)
# Faults that answer 200 with a (flawed) answer: the inspection detectors' test material.
ANSWER_FAULTS = frozenset(
    {"none", "cut", "tool_call", "no_done", "no_usage", "error_200", "bad_tool_args", "bad_sse"}
)
GARBAGE = b"<html>oops</html>"
ROUTES = {
    ("GET", "/v1/models"): "models",
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/messages"): "messages",
    ("POST", "/v1/messages/count_tokens"): "count_tokens",
    ("POST", "/v1/embeddings"): "embeddings",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/v1/responses"): "responses",
}
# The last path segment names the resource: GET /v1/models/{model}, GET /v1/responses/{id}.
ITEM_ROUTES = {("GET", "/v1/models/"): "model", ("GET", "/v1/responses/"): "response"}
ANTHROPIC_ROUTES = frozenset({"messages", "count_tokens"})
# Shared routes (the models) answer in the flavour the headers suggest; these never do.
OPENAI_ROUTES = frozenset({"chat", "embeddings", "completions", "responses", "response"})
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("model", "messages"),
    "messages": ("model", "messages", "max_tokens"),
    "count_tokens": ("model", "messages"),
    "embeddings": ("model", "input"),
    "completions": ("model", "prompt"),
    "responses": ("model",),
}
MAX_DIMENSIONS = 4096
# Bounded so a benchmark's millions of requests cannot grow the process without limit.
RECORDED_REQUESTS = 1000
STORED_RESPONSES = 1000


class RecordedRequest(NamedTuple):
    """One routed request as received: ``body`` is None for a GET or unparsable JSON."""

    method: str
    path: str
    key: str
    body: dict[str, Any] | None


def route_of(method: str, path: str) -> tuple[str | None, str]:
    """(route name or None, the resource named by the path's last segment, else "")."""
    route = ROUTES.get((method, path))
    if route is not None:
        return route, ""
    for (verb, prefix), item_route in ITEM_ROUTES.items():
        name = path[len(prefix) :]
        if method == verb and path.startswith(prefix) and name and "/" not in name:
            return item_route, name
    return None, ""


def invalid_field(route: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """(message, param) when a field of an OpenAI-only request has a shape the API refuses."""

    def invalid(param: str) -> tuple[str, str]:
        return f"Invalid value for '{param}'.", param

    if route == "embeddings":
        inputs = wire.text_inputs(body["input"])
        if inputs is None or not all(text for text, _ in inputs):
            return invalid("input")
        if (body.get("encoding_format") or "float") not in ("float", "base64"):
            return invalid("encoding_format")
        dims = body.get("dimensions")
        if dims is not None and not (
            isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims <= MAX_DIMENSIONS
        ):
            return invalid("dimensions")
    elif route == "completions" and wire.text_inputs(body["prompt"]) is None:
        return invalid("prompt")
    elif route == "responses" and not isinstance(body.get("input") or "", str | list):
        return invalid("input")
    return None


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed OpenAI answer ends with a usage chunk (stream_options.include_usage)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def answer_words(
    behaviour: dict[str, Any], last_user: str, cap: Any
) -> tuple[list[str], bool, tuple[wire.ToolCall, ...], int]:
    """(words, cut by ``cap``, tool calls, completion tokens) of one scripted answer."""
    tools: tuple[wire.ToolCall, ...] = behaviour["tool_calls"]
    reply: str | None = behaviour["reply"]
    words: list[str]
    if tools and reply is None:
        words, truncated = [], False  # only tool calls, like most tool-calling answers
    else:
        want = int(behaviour["completion_tokens"])
        words, truncated = wire.reply_words(last_user, want, cap, reply)
    completion_tokens = len(words) + sum(tool.tokens() for tool in tools)
    if behaviour["usage_completion_tokens"] is not None:  # a usage that disagrees, on purpose
        completion_tokens = int(behaviour["usage_completion_tokens"])
    return words, truncated, tools, completion_tokens


def normalize_behaviour(spec: Any) -> dict[str, Any]:
    """Validate a behaviour (a dict, or a bare fault such as "429") and fill in defaults.

    Unknown keys and faults raise ValueError so a typo in a test script fails loudly
    instead of silently serving the happy path.
    """
    if isinstance(spec, str | int) and not isinstance(spec, bool):
        spec = {"fault": str(spec)}
    if not isinstance(spec, Mapping):
        raise ValueError(f"behaviour must be an object or a fault name, got {spec!r}")
    unknown = set(spec) - set(DEFAULT_BEHAVIOUR) - {"times"}
    if unknown:
        raise ValueError(f"unknown behaviour keys: {sorted(unknown)}")
    behaviour = {**DEFAULT_BEHAVIOUR, **spec}
    behaviour.pop("times", None)  # only meaningful when enqueuing
    fault = behaviour["fault"] = str(behaviour["fault"])
    if fault not in FAULTS and not (fault.isdigit() and 400 <= int(fault) <= 599):
        raise ValueError(f"unknown fault {fault!r}")
    for name in ("latency_ms", "token_delay_ms", "cut_after", "completion_tokens"):
        value = behaviour[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not isinstance(behaviour["usage"], bool):
        raise ValueError(f"usage must be true or false, got {behaviour['usage']!r}")
    if fault == "no_usage":
        behaviour["usage"] = False
    reported = behaviour["usage_completion_tokens"]
    if reported is not None and (
        isinstance(reported, bool) or not isinstance(reported, int) or reported < 0
    ):
        raise ValueError(
            f"usage_completion_tokens must be a non-negative integer, got {reported!r}"
        )
    if behaviour["reply"] is not None and not isinstance(behaviour["reply"], str):
        raise ValueError(f"reply must be a string, got {behaviour['reply']!r}")
    calls = behaviour["tool_calls"]
    if calls is None:
        calls = [wire.DEFAULT_TOOL_CALL] if fault in ("tool_call", "bad_tool_args") else []
    if not isinstance(calls, list | tuple):
        raise ValueError(f"tool_calls must be a list, got {calls!r}")
    behaviour["tool_calls"] = tuple(_tool_call(call) for call in calls)
    if fault == "bad_tool_args":
        # Checked as JSON objects above; broken only now, on purpose: the last character
        # (the closing brace) never goes out, so the deltas do not assemble into JSON.
        behaviour["tool_calls"] = tuple(
            wire.ToolCall(t.name, t.arguments[:-1], t.id) for t in behaviour["tool_calls"]
        )
    return behaviour


def _tool_call(spec: Any) -> wire.ToolCall:
    """``{"name": ..., "arguments": {...} or a JSON object's text, "id": optional}``."""
    if isinstance(spec, wire.ToolCall):
        return spec
    if not isinstance(spec, Mapping) or set(spec) - {"name", "arguments", "id"}:
        raise ValueError(f"a tool call is {{name, arguments, id}}, got {spec!r}")
    name, arguments, call_id = spec.get("name"), spec.get("arguments", {}), spec.get("id")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tool call needs a name, got {name!r}")
    if call_id is not None and (not isinstance(call_id, str) or not call_id):
        raise ValueError(f"a tool call's id must be a non-empty string, got {call_id!r}")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError(f"tool call arguments must be a JSON object, got {arguments!r}")
    elif isinstance(arguments, Mapping):
        arguments = json.dumps(dict(arguments), ensure_ascii=False)
    else:
        raise ValueError(f"tool call arguments must be an object, got {arguments!r}")
    return wire.ToolCall(name, arguments, call_id)


def load_script_file(path: str) -> dict[str, Any]:
    """Read a script (same shape as the /_fake/script body) from a JSON or YAML file."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml  # optional: only needed for YAML scripts

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a script must be a mapping")
    return data


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class FakeUpstream:
    """A fake OpenAI/Anthropic upstream with per-key scripted latency and faults.

    Scripting methods are thread-safe, so tests can drive a server that runs in
    :meth:`start_in_thread` (or in the context manager) from the test thread.
    """

    def __init__(
        self,
        *,
        script: dict[str, Any] | None = None,
        models: list[str] | None = None,
        allowed_keys: set[str] | None = None,
        require_key: bool = True,
    ) -> None:
        """``require_key=False`` serves requests without a key too, as key "" (its scripts
        and counts), like a local Ollama or vLLM; a key that is sent is checked as ever."""
        self.models = list(models or DEFAULT_MODELS)
        self.allowed_keys = set(allowed_keys) if allowed_keys is not None else None
        self.require_key = require_key
        self.host, self.port = "", 0
        # Held only for dict/deque updates: the loop thread never waits on a test thread.
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque[dict[str, Any]]] = {}
        self._defaults: dict[str, dict[str, Any]] = {}
        self._global_default = normalize_behaviour({})
        self._counts: collections.Counter[str] = collections.Counter()
        self._total = 0
        self._bodies: collections.deque[Any] = collections.deque(maxlen=20)
        self._paths: collections.Counter[str] = collections.Counter()
        self._requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=RECORDED_REQUESTS
        )
        self._previous_ids: collections.deque[str] = collections.deque(maxlen=20)
        # Responses created here, for GET /v1/responses/{id}; the oldest are forgotten first.
        self._responses: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        if script:
            self.script(script)

    # ---- scripting ---------------------------------------------------------------------

    def script(self, spec: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        """Apply ``{"keys": {key: {"queue": [...], "default": b}}, "default": b, "reset": bool}``.

        ``kwargs`` are merged into ``spec``. Queue entries are appended (``times`` copies
        each); defaults are replaced; ``reset`` first clears every script (not counters).
        Everything is validated before anything changes, so a bad script is a no-op.
        """
        spec = {**(spec or {}), **kwargs}
        unknown = set(spec) - {"keys", "default", "reset"}
        if unknown:
            raise ValueError(f"unknown script keys: {sorted(unknown)}")
        keys = spec.get("keys") or {}
        if not isinstance(keys, Mapping):
            raise ValueError("'keys' must be an object")
        queued: dict[str, list[dict[str, Any]]] = {}
        defaults: dict[str, dict[str, Any]] = {}
        for key, entry in keys.items():
            if not isinstance(entry, Mapping) or set(entry) - {"queue", "default"}:
                raise ValueError(f"key {key!r}: expected {{'queue': [...], 'default': {{...}}}}")
            items = entry.get("queue") or []
            if not isinstance(items, list):
                raise ValueError(f"key {key!r}: 'queue' must be a list")
            queued[key] = []
            for item in items:
                times = item.get("times", 1) if isinstance(item, Mapping) else 1
                if isinstance(times, bool) or not isinstance(times, int) or times < 0:
                    raise ValueError(f"'times' must be a non-negative integer, got {times!r}")
                queued[key].extend([normalize_behaviour(item)] * times)
            if entry.get("default") is not None:
                defaults[key] = normalize_behaviour(entry["default"])
        new_global = None
        if spec.get("default") is not None:
            new_global = normalize_behaviour(spec["default"])
        with self._lock:
            if spec.get("reset"):
                self._queues.clear()
                self._defaults.clear()
                self._global_default = normalize_behaviour({})
            for key, items in queued.items():
                self._queues.setdefault(key, collections.deque()).extend(items)
            self._defaults.update(defaults)
            if new_global is not None:
                self._global_default = new_global

    def reset(self) -> None:
        """Forget every script, counter, recorded request and stored response."""
        with self._lock:
            self._queues.clear()
            self._defaults.clear()
            self._global_default = normalize_behaviour({})
            self._counts.clear()
            self._total = 0
            self._bodies.clear()
            self._paths.clear()
            self._requests.clear()
            self._previous_ids.clear()
            self._responses.clear()

    def stats(self) -> dict[str, Any]:
        """Per-key request counts (a missing key counts as ""), per-path counts, bodies,
        unconsumed queues, and the `previous_response_id`s that Responses calls sent."""
        with self._lock:
            return {
                "requests": dict(self._counts),
                "total": self._total,
                "last_request_bodies": list(self._bodies),
                "queued": {key: len(q) for key, q in self._queues.items() if q},
                "paths": dict(self._paths),
                "previous_response_ids": list(self._previous_ids),
            }

    def requests(self) -> list[RecordedRequest]:
        """The last routed requests, oldest first (at most ``RECORDED_REQUESTS``)."""
        with self._lock:
            return list(self._requests)

    def _take_behaviour(self, key: str) -> dict[str, Any]:
        with self._lock:
            queue = self._queues.get(key)
            if queue:
                return queue.popleft()
            return self._defaults.get(key, self._global_default)

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Start listening on the running loop; returns the bound (host, port)."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, host, port, backlog=1024)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self.host, self.port

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve until :meth:`aclose`/:meth:`stop` (or cancellation); starts if needed."""
        if self._server is None:
            await self.start(host, port)
        assert self._closed is not None
        try:
            await self._closed.wait()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Python 3.11's wait_closed() neither waits for nor closes live keep-alive
        # connections, so end them here or stop() would leave sockets open.
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run
        await server.wait_closed()
        if self._closed is not None:
            self._closed.set()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve on a private event loop in a daemon thread; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("already running in a thread")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start(host, port))
                except BaseException as exc:  # re-raised in the caller's thread
                    failure.append(exc)
                    return
                finally:
                    ready.set()
                loop.run_until_complete(self.serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]
        return self.host, self.port

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection. Idempotent; callable from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed() and self._server is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:  # we cannot block on our own loop: schedule and return
                loop.create_task(self.aclose())
                return
            with contextlib.suppress(RuntimeError, TimeoutError):
                asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> FakeUpstream:
        if self._server is None:
            self.start_in_thread()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- serving -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                try:
                    req = await read_request(reader, writer)
                except HTTPError as exc:
                    payload = wire.openai_error(exc.message)
                    writer.write(json_response(exc.status, payload, keep=False))
                    break
                if req is None or not await self._dispatch(req, writer):
                    break
        except (OSError, asyncio.IncompleteReadError):
            pass  # the peer went away mid-request: there is nobody left to answer
        except asyncio.CancelledError:
            # Only aclose() cancels us. Swallowed because StreamReaderProtocol logs a
            # cancelled connection task as an "exception in callback".
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _dispatch(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; returns whether the connection may carry another."""
        path, keep, headers = req.path, req.keep_alive, req.headers
        if path.startswith("/_fake/"):
            writer.write(self._control(req.method, path, req.body, keep))
            return keep
        route, name = route_of(req.method, path)
        claude_headers = "anthropic-version" in headers or "x-api-key" in headers
        anthropic = route in ANTHROPIC_ROUTES or (route not in OPENAI_ROUTES and claude_headers)

        def error(
            status: int, etype: str, message: str, code: str | None = None, param: str | None = None
        ) -> bool:
            if anthropic:
                payload = wire.anthropic_error(etype, message)
            else:
                payload = wire.openai_error(message, etype, code, param)
            writer.write(json_response(status, payload, keep))
            return keep

        if route is None:
            etype = "not_found_error" if anthropic else "invalid_request_error"
            return error(404, etype, f"Invalid URL ({req.method} {path})")

        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not key and anthropic:
            key = headers.get("x-api-key", "").strip()
        body: dict[str, Any] | None = None
        if req.method == "POST":
            try:
                parsed = json.loads(req.body)
            except ValueError:
                parsed = None
            body = parsed if isinstance(parsed, dict) else None
        with self._lock:
            self._total += 1
            self._counts[key] += 1
            self._paths[path] += 1
            self._requests.append(RecordedRequest(req.method, path, key, body))
            nth = self._counts[key]
        if not key and self.require_key:
            if anthropic:
                return error(401, "authentication_error", "x-api-key header is required")
            msg = "You didn't provide an API key. Use an Authorization: Bearer header."
            return error(401, "invalid_request_error", msg, "invalid_api_key")
        masked = f"{key[:3]}{'*' * max(len(key) - 7, 0)}{key[-4:]}"
        if key and self.allowed_keys is not None and key not in self.allowed_keys:
            status, payload, extra = wire.fault_error("401", anthropic, None, masked, "")
            writer.write(json_response(status, payload, keep, extra))
            return keep

        if req.method == "POST":
            if body is None:
                msg = "We could not parse the JSON body of your request: expected a JSON object."
                return error(400, "invalid_request_error", msg)
            with self._lock:
                self._bodies.append(body)
            for field in REQUIRED_FIELDS[route]:
                value = body.get(field)
                if value is None or (field == "messages" and not isinstance(value, list)):
                    if anthropic:
                        return error(400, "invalid_request_error", f"{field}: Field required")
                    msg = f"Missing required parameter: '{field}'."
                    code = "missing_required_parameter"
                    return error(400, "invalid_request_error", msg, code, field)
            problem = invalid_field(route, body)
            if problem is not None:
                return error(400, "invalid_request_error", problem[0], None, problem[1])
            previous = body.get("previous_response_id") if route == "responses" else None
            if isinstance(previous, str):
                with self._lock:
                    self._previous_ids.append(previous)

        # Taken only now so malformed requests never consume a scripted behaviour.
        behaviour = self._take_behaviour(key)
        if behaviour["latency_ms"]:
            await asyncio.sleep(behaviour["latency_ms"] / 1000)
        fault = behaviour["fault"]
        if fault == "drop":
            return False
        if fault == "garbage":
            writer.write(response_head(200, "application/json", len(GARBAGE), keep) + GARBAGE)
            return keep
        if fault == "error_200" and (body or {}).get("stream") is not True:
            payload = (
                wire.anthropic_error("api_error", "Internal server error")
                if anthropic
                else wire.openai_error(wire.ERROR_200_MESSAGE, "server_error")
            )
            writer.write(json_response(200, payload, keep))
            return keep
        if fault not in ANSWER_FAULTS:
            model = str((body or {}).get("model", ""))
            retry_after = behaviour["retry_after"]
            status, payload, extra = wire.fault_error(fault, anthropic, retry_after, masked, model)
            writer.write(json_response(status, payload, keep, extra))
            return keep
        if route == "models":
            return await self._send(
                writer, wire.models_list(self.models, anthropic), behaviour, keep
            )
        if route == "model":
            if name not in self.models:
                if anthropic:
                    return error(404, "not_found_error", f"model: {name}")
                msg = f"The model '{name}' does not exist"
                return error(404, "invalid_request_error", msg, "model_not_found", "model")
            return await self._send(writer, wire.model_info(name, anthropic), behaviour, keep)
        if route == "response":
            with self._lock:
                stored = self._responses.get(name)
            if stored is None:
                return error(404, "invalid_request_error", f"Response with id '{name}' not found.")
            return await self._send(writer, stored, behaviour, keep)
        assert body is not None  # every other route is a POST
        if route == "count_tokens":
            counted = {"input_tokens": wire.prompt_info(body)[0]}
            return await self._send(writer, counted, behaviour, keep)
        if route == "embeddings":
            return await self._embed(writer, body, behaviour, nth, keep)
        if route == "completions":
            return await self._text_complete(writer, body, behaviour, nth, keep)
        if route == "responses":
            return await self._respond(writer, body, behaviour, nth, keep)
        return await self._complete(writer, body, behaviour, anthropic, nth, keep)

    async def _complete(
        self,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        behaviour: dict[str, Any],
        anthropic: bool,
        nth: int,
        keep: bool,
    ) -> bool:
        """A successful chat completion / message, as JSON or SSE, possibly cut short."""
        prompt_tokens, last_user = wire.prompt_info(body)
        cap = (
            body.get("max_tokens")
            if anthropic
            else (body.get("max_completion_tokens") or body.get("max_tokens"))
        )
        words, truncated, tools, completion_tokens = answer_words(behaviour, last_user, cap)
        extra = wire.ratelimit_headers(anthropic, nth, prompt_tokens + completion_tokens)
        model, stream = str(body["model"]), body.get("stream") is True
        report = bool(behaviour["usage"])
        if anthropic:
            stop = "tool_use" if tools else ("max_tokens" if truncated else "end_turn")
            args = (model, words, tools, stop, prompt_tokens, completion_tokens)
            if stream:
                events = wire.anthropic_events(*args, usage=report)
                return await self._stream(writer, events, behaviour, keep, extra, "anthropic")
            message = wire.anthropic_message(*args, usage=report)
            return await self._send(writer, message, behaviour, keep, extra)
        finish = "tool_calls" if tools else ("length" if truncated else "stop")
        usage = wire.openai_usage(prompt_tokens, completion_tokens) if report else None
        if stream:
            chunks = wire.openai_events(
                model, words, tools, finish, usage if include_usage(body) else None
            )
            return await self._stream(writer, chunks, behaviour, keep, extra)
        payload = wire.openai_completion(model, words, tools, finish, usage)
        return await self._send(writer, payload, behaviour, keep, extra)

    async def _embed(
        self,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        behaviour: dict[str, Any],
        nth: int,
        keep: bool,
    ) -> bool:
        """Embeddings of every input (validated already), as floats or base64."""
        inputs = wire.text_inputs(body["input"]) or []
        dimensions = body.get("dimensions") or wire.EMBEDDING_DIMENSIONS
        encoding = body.get("encoding_format") or "float"
        model = str(body["model"])
        payload = wire.embeddings_response(
            model, inputs, dimensions, encoding, usage=bool(behaviour["usage"])
        )
        extra = wire.ratelimit_headers(False, nth, sum(n for _, n in inputs))
        return await self._send(writer, payload, behaviour, keep, extra)

    async def _text_complete(
        self,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        behaviour: dict[str, Any],
        nth: int,
        keep: bool,
    ) -> bool:
        """A legacy text completion, a choice per prompt, as JSON or SSE.

        Tool calls do not exist here, so the `tool_call` fault answers with text."""
        prompts = wire.text_inputs(body["prompt"]) or []
        plain = {**behaviour, "tool_calls": ()}
        answers: list[wire.Answer] = []
        for text, _ in prompts:
            words, truncated, _, _ = answer_words(plain, text, body.get("max_tokens"))
            answers.append((words, "length" if truncated else "stop"))
        prompt_tokens = sum(n for _, n in prompts)
        completion_tokens = sum(len(words) for words, _ in answers)
        if behaviour["usage_completion_tokens"] is not None:
            completion_tokens = int(behaviour["usage_completion_tokens"])
        extra = wire.ratelimit_headers(False, nth, prompt_tokens + completion_tokens)
        report = bool(behaviour["usage"])
        usage = wire.completion_usage(prompt_tokens, completion_tokens) if report else None
        model = str(body["model"])
        if body.get("stream") is True:
            events = wire.text_completion_events(
                model, answers, usage if include_usage(body) else None
            )
            return await self._stream(writer, events, behaviour, keep, extra)
        payload = wire.text_completion(model, answers, usage)
        return await self._send(writer, payload, behaviour, keep, extra)

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        behaviour: dict[str, Any],
        nth: int,
        keep: bool,
    ) -> bool:
        """A Response (`POST /v1/responses`), as JSON or SSE, kept for GET unless `store` is
        false or the answer is cut (the client never got it)."""
        input_tokens, last_user = wire.responses_prompt_info(body)
        cap = body.get("max_output_tokens")
        words, truncated, tools, output_tokens = answer_words(behaviour, last_user, cap)
        usage = wire.responses_usage(input_tokens, output_tokens) if behaviour["usage"] else None
        response = wire.response_object(body, words, tools, truncated, usage)
        if body.get("store") is not False and behaviour["fault"] != "cut":
            with self._lock:
                self._responses[response["id"]] = response
                if len(self._responses) > STORED_RESPONSES:
                    self._responses.popitem(last=False)
        extra = wire.ratelimit_headers(False, nth, input_tokens + output_tokens)
        if body.get("stream") is True:
            events = wire.response_events(response, words, tools)
            return await self._stream(writer, events, behaviour, keep, extra, "responses")
        return await self._send(writer, response, behaviour, keep, extra)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        payload: Any,
        behaviour: dict[str, Any],
        keep: bool,
        extra: Headers = (),
    ) -> bool:
        body = encode_json(payload).encode()
        head = response_head(200, "application/json", len(body), keep, extra)
        if behaviour["fault"] == "cut":
            # Promise the full Content-Length, deliver half, close: a short read for the client.
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            return False
        writer.write(head + body)  # a single write: one syscall on the common path
        return keep

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        events: Iterator[bytes],
        behaviour: dict[str, Any],
        keep: bool,
        extra: Headers,
        flavour: str = "openai",
    ) -> bool:
        """Send ``events`` as SSE, one HTTP chunk each; ``flavour`` (openai, anthropic,
        responses) shapes the faults that rewrite the stream (wire.faulty_events)."""
        extra = [("cache-control", "no-cache"), *extra]
        writer.write(response_head(200, "text/event-stream; charset=utf-8", None, keep, extra))
        fault = behaviour["fault"]
        cut_after = int(behaviour["cut_after"]) if fault == "cut" else -1
        delay = behaviour["token_delay_ms"] / 1000
        events = wire.faulty_events(events, fault, flavour, int(behaviour["cut_after"]))
        for i, event in enumerate(events):
            if i == cut_after:
                # Returning False closes the socket without the zero-length last chunk, so
                # the client sees an incomplete chunked body, like a real upstream dying.
                await writer.drain()
                return False
            if i and delay:
                await asyncio.sleep(delay)
            # One SSE event per HTTP chunk per write: a proxy that buffers instead of
            # passing through becomes observable to the client.
            writer.write(chunk(event))
            await writer.drain()
        writer.write(LAST_CHUNK)
        return keep

    def _control(self, method: str, path: str, raw: bytes, keep: bool) -> bytes:
        if (method, path) == ("GET", "/_fake/stats"):
            return json_response(200, self.stats(), keep)
        if (method, path) == ("GET", "/_fake/health"):
            return json_response(200, {"ok": True}, keep)
        if (method, path) == ("POST", "/_fake/reset"):
            self.reset()
            return json_response(200, {"ok": True}, keep)
        if (method, path) == ("POST", "/_fake/script"):
            try:
                spec = json.loads(raw or b"{}")
                if not isinstance(spec, dict):
                    raise ValueError("a script must be a JSON object")
                self.script(spec)
            except ValueError as exc:
                return json_response(400, {"ok": False, "error": str(exc)}, keep)
            return json_response(200, {"ok": True}, keep)
        return json_response(404, {"ok": False, "error": f"no route {method} {path}"}, keep)
