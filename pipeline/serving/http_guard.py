"""HTTP guards for Kiln's BentoML service: ASGI middleware that answers a request the service
cannot take with a 4xx naming the cause, before BentoML parses or buffers it, and logs each
rejected request as one WARNING line.

    RequestSizeLimit  413 for a body over serve.max_request_bytes, before it is read
    InputGuard        415/400 for a content type, multipart body or field an endpoint does not
                      take; 400 for a file whose first bytes show it over a limit, before the rest
    ErrorAnswers      every error answer as {"error": message}, the message bounded; one
                      `METHOD path status: message` WARNING line per 4xx answer
    cancel_request_timers()  BentoML's request timeout without its 30 s of memory per request
    time_out_connections()   idle connections and slowly sent request heads are closed

BentoML 1.4 answers malformed multipart bodies, text values where a file is expected and unknown
fields with HTTP 500 and a traceback (_bentoml_impl/server/app.py), and logs every 4xx it raises
itself at ERROR with a traceback; log_rejections_once() drops those records, since ErrorAnswers
logs the request. Needs only Starlette and python-multipart, which come with BentoML.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

from bentoml._internal.server.http import traffic as bentoml_traffic
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pipeline.serving.rejections import BoundedArgs, bounded

# Under "bentoml" so that BentoML's log configuration (handler, format, level) applies.
log = logging.getLogger("bentoml.serve.kiln")


# Bytes of a file part a header check (InputGuard's `checks`) sees: numpy refuses .npy headers
# over 10,000 bytes, a PNG's size is in its first 33 bytes; a JPEG's frame header may come later
# (after its APP segments), and the service's own check still sees the whole file.
HEADER_BYTES = 64 * 1024


class InputGuard:
    """ASGI middleware: a request an endpoint cannot take gets 415/400 with the cause before
    BentoML parses it. BentoML 1.4 answers such requests with HTTP 500 and a traceback
    (_bentoml_impl/server/app.py: Starlette's 400 for a malformed multipart body is caught as
    an unexpected exception; a text value where a file is expected is fetched as a URL; an
    unknown field's bytes are JSON-decoded). `routes`: path -> the multipart file fields it
    takes, or () for a JSON endpoint. `checks`: (path, field) -> a function of a file's first
    HEADER_BYTES bytes that returns why the file is refused (e.g. a size over a limit that its
    header shows) or None; a refused upload gets 400 while its body is still arriving, so it
    never costs its body (an 8 MB body buffered here, spooled and copied by BentoML kept ~100-200
    MB per worker under load: docs/benchmarks.md). Runs inside RequestSizeLimit, so the body is
    bounded."""

    def __init__(self, app, routes: dict[str, tuple[str, ...]],
                 checks: dict[tuple[str, str], Callable[[bytes], str | None]]) -> None:
        self.app = app
        self.routes = routes
        self.checks = checks

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path")
        fields = self.routes.get(path)
        if scope["type"] != "http" or scope["method"] != "POST" or fields is None:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        media_type = parse_options_header(headers.get("content-type", "application/json"))[0]
        media_type = media_type.decode("latin-1").lower()
        if not fields:
            if media_type != "application/json":
                return await _reject(send, 415, f"expected application/json, got {media_type}")
            return await self.app(scope, receive, send)
        wanted = ", ".join(f"'{f}'" for f in fields)
        if media_type != "multipart/form-data":
            return await _reject(send, 415, f"expected multipart/form-data with the file field "
                                 f"{wanted}, got {media_type}")
        form = _FormParts(headers, {f: c for (p, f), c in self.checks.items() if p == path})
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            more = message["type"] == "http.request" and message.get("more_body", False)
            problem = form.feed(message.get("body", b""), more)
            if problem:
                messages.clear()
                await _reject(send, 400, problem)
                # Read the rest without keeping it: a client still sending its body would
                # otherwise get a connection reset instead of the answer.
                while more:
                    message = await receive()
                    more = message["type"] == "http.request" and message.get("more_body", False)
                return
            if not more:
                break
        problem = form.problem(fields)
        if problem:
            return await _reject(send, 400, problem)
        return await self.app(scope, _replay(messages, receive), send)


def _replay(messages: list[dict], receive):
    replay = iter(messages)

    async def replayed():
        return next(replay, None) or await receive()

    return replayed


class _FormParts:
    """The part headers of a multipart body fed chunk by chunk, parsed with python-multipart as
    BentoML's Starlette parses it after InputGuard's check, keeping only the part headers (a full
    parse measured ~45-80 us per request against ~18 us here, on a 289-byte upload) and the
    first HEADER_BYTES of each file part that has a check in `checks` (field -> check)."""

    def __init__(self, headers: Headers, checks: dict[str, Callable[[bytes], str | None]]) -> None:
        _, options = parse_options_header(headers.get("content-type", ""))
        self.error = None if options.get(b"boundary") else (
            "multipart body without a boundary (Content-Type: multipart/form-data; boundary=...)")
        self.checks = checks
        self.parts: list[dict[bytes, bytes]] = []
        self.head: tuple[Callable[[bytes], str | None], bytearray] | None = None  # current part's
        self.pending: list[tuple[Callable[[bytes], str | None], bytearray]] = []  # heads to check
        header: list[bytes] = []

        def on_header_field(data: bytes, start: int, end: int) -> None:
            header.append(data[start:end])

        def on_header_value(data: bytes, start: int, end: int) -> None:
            key = b"".join(header).lower()
            self.parts[-1][key] = self.parts[-1].get(key, b"") + data[start:end]

        if self.error is None:
            self.parser = MultipartParser(options[b"boundary"], {
                "on_part_begin": lambda: self.parts.append({}),
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": header.clear,
                "on_headers_finished": self._part_begins,
                "on_part_data": self._part_data,
                "on_part_end": self._part_ends})

    def _part_begins(self) -> None:
        _, disposition = parse_options_header(self.parts[-1].get(b"content-disposition"))
        check = self.checks.get(disposition.get(b"name", b"").decode("latin-1"))
        self.head = (check, bytearray()) if check and b"filename" in disposition else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.head is not None:
            head = self.head[1]
            head += data[start:min(end, start + HEADER_BYTES - len(head))]
            if len(head) >= HEADER_BYTES:
                self._part_ends()

    def _part_ends(self) -> None:
        if self.head is not None:
            self.pending.append(self.head)
            self.head = None

    def feed(self, chunk: bytes, more: bool) -> str | None:
        """Parse the next chunk of the body; with `more` of it to come, a file part's check
        runs once its first HEADER_BYTES (or the whole part) are in, and what it refuses is
        returned. A body complete in fewer chunks is left to the service's own checks."""
        if self.error is not None:
            return None
        # Few parts at most: a body of many tiny parts is refused by problem(), not stored.
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            self.error = f"malformed multipart body ({e})"
            return None
        pending, self.pending = self.pending, []
        for check, head in pending if more else ():
            problem = check(bytes(head))
            if problem:
                return problem
        return None

    def problem(self, fields: tuple[str, ...]) -> str | None:
        """What is wrong with the whole body, which should hold exactly one file per field in
        `fields`, or None."""
        if self.error is None:
            try:
                self.parser.finalize()
            except MultipartParseError as e:
                self.error = f"malformed multipart body ({e})"
        if self.error is not None:
            return self.error
        names, files = [], []
        for part in self.parts:
            _, disposition = parse_options_header(part.get(b"content-disposition"))
            if b"name" not in disposition:
                return "malformed multipart body (a part without a Content-Disposition name)"
            names.append(disposition[b"name"].decode("latin-1"))
            files.append(b"filename" in disposition)
        for field in fields:
            count = names.count(field)
            if count == 0:
                got = ", ".join(f"'{n}'" for n in dict.fromkeys(names)) or "no fields"
                return f"field '{field}' missing; got {got}"
            if count > 1:
                return f"field '{field}': one file expected, got {count} values"
            if not files[names.index(field)]:
                return f"field '{field}' must be a file upload (a part with a filename), got a text value"
        extra = [n for n in names if n not in fields]
        if extra:
            return f"unexpected field '{extra[0]}'; this endpoint takes only {', '.join(fields)}"
        return None


class RequestSizeLimit:
    """ASGI middleware: a request body over `max_bytes` bytes gets HTTP 413 before it reaches
    the API (BentoML 1.4 has no body-size setting). A declared Content-Length is checked up
    front; a chunked body is buffered up to the limit, then replayed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.limit = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reject(send, 400, "Content-Length is not a number")
            if int(length) > self.limit:
                return await _reject(send, 413, f"request body of {int(length)} bytes is over "
                                     f"the limit of {self.limit} bytes")
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _reject(send, 413, f"request body is over the limit of "
                                     f"{self.limit} bytes")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        return await self.app(scope, _replay(messages, receive), send)


async def _reject(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class ErrorAnswers:
    """ASGI middleware, outermost of Kiln's: every answer with a status of 400 or more, whoever
    gave it (Kiln's guards, BentoML's validation and exceptions, Starlette's 404 and 405), leaves
    in one JSON shape, {"error": message} (what /docs.json declares, api_docs.py), the message
    bounded (pipeline/serving/rejections.py); and every 4xx is one WARNING line, `METHOD path status:
    message`. BentoML answers a pydantic error as {"error": "1 validation error for Input",
    "detail": [...]}, a 4xx BentoMLException as [{"error": ...}], Starlette's 404 and 405 as
    plain text. BentoML's own ERROR record with a traceback for a 4xx is dropped by
    ClientErrorFilter; a 5xx keeps its traceback. A HEAD answer has no body to reshape."""

    def __init__(self, app, max_error_chars: int) -> None:
        self.app = app
        self.max_chars = max_error_chars

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":
            return await self.app(scope, receive, send)
        start, body = None, bytearray()

        async def answer(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # sent with the reshaped body
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            body.extend(message.get("body", b"")[: ERROR_BODY_BYTES - len(body)])
            if message.get("more_body", False):
                return
            status = start["status"]
            error = bounded(_message(bytes(body)), self.max_chars)
            if status < 500:
                log.warning("%s %s %d: %s", scope["method"],
                            bounded(scope["path"], self.max_chars), status, error)
            data = json.dumps({"error": error}).encode()
            headers = [(k, v) for k, v in start["headers"]
                       if k.lower() not in (b"content-type", b"content-length")]
            await send({**start, "headers": [*headers, (b"content-type", b"application/json"),
                                             (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

        return await self.app(scope, receive, answer)


# Bytes of an error answer's body read for its message: every error body is a short JSON or
# text message; a longer one is cut (and no longer parses as JSON: its text is the message).
ERROR_BODY_BYTES = 64 * 1024


def _message(body: bytes) -> str:
    """The message in an error answer's body, whichever shape it came in."""
    try:
        error = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "(no message)"
    if isinstance(error, list) and error:  # BentoML answers a 4xx BentoMLException as [{...}]
        error = error[0]
    if not isinstance(error, dict):
        return str(error)
    details = [_pydantic_message(d) for d in error.get("detail") or [] if isinstance(d, dict)]
    return "; ".join(details) or str(error.get("error", error))


def _pydantic_message(detail: dict) -> str:
    """One pydantic error as `field: message`. Kiln's own checks raise ValueError whose message
    names the field already ("images: ..."), which pydantic prefixes with "Value error, "."""
    message = str(detail.get("msg", ""))
    if message.startswith("Value error, "):
        return message.removeprefix("Value error, ")
    where = ".".join(str(part) for part in detail.get("loc", ()))
    return f"{where}: {message}" if where else message


class _TimerCancellingTimeout(TimeoutMiddleware):
    """BentoML 1.4's TimeoutMiddleware (traffic.timeout, 504 for a request not answered in
    time), but its timer is cancelled once the request is done. BentoML's stays scheduled for
    the whole timeout after every request, and the timer holds the request's context (its
    OpenTelemetry span, ~5 KB): at ~900 requests/s per worker and a 30 s timeout a worker held
    ~80-90 MB more than it needed, freed only by the timers firing (docs/benchmarks.md)."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def started_send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        answer = asyncio.ensure_future(self.app(scope, receive, started_send))
        try:
            await waiter
        except asyncio.TimeoutError:
            if answer.cancel():
                await _reject(send, 504, f"Not able to process the request in {self.timeout} seconds")
        else:
            await answer
        finally:
            timer.cancel()


def cancel_request_timers() -> None:
    """Make BentoML build its request timeout from _TimerCancellingTimeout: BaseAppFactory's
    `middlewares` (bentoml/_internal/server/base_app.py) imports TimeoutMiddleware from this
    module when the worker builds its app, after the service module has been imported."""
    bentoml_traffic.TimeoutMiddleware = _TimerCancellingTimeout


class ClientErrorFilter(logging.Filter):
    """Drops BentoML's ERROR record (with traceback) for a request it answers with a 4xx:
    validation errors and BentoMLExceptions below 500. ErrorAnswers logs those requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            return False
        return not (isinstance(error, BentoMLException) and error.error_code < 500)


def log_rejections_once(max_error_chars: int) -> None:
    """Leave ErrorAnswers' line the only record of a rejected request, and keep the access log
    (serve.access_log) to one line per request whatever the path holds."""
    # bentoml._internal.server.http_app.log_exception logs each failed request on this logger.
    logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorFilter())
    # python-multipart logs a WARNING of its own before raising on a malformed body; InputGuard's
    # 400 carries the same message, logged once by ErrorAnswers.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    # BentoML's access log writes the path as it came: a newline in it (%0A) would end the line.
    logging.getLogger("bentoml.access").addFilter(BoundedArgs(max_error_chars))


class TimedConnections(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 connection (httptools, what uvicorn picks when it is installed, as in
    the Bento) with the two timeouts uvicorn 0.55 lacks. uvicorn closes a keep-alive connection
    only after a response: a connection that never sends a request stays open, and any byte
    cancels the timer, so one header byte a second (slowloris) holds a connection and its
    socket for ever. Here:
      - a connection with no request under way is closed after idle_timeout_s, from its start
        as after each response (uvicorn's keep-alive timer, armed at the start too);
      - a request whose head (request line and headers) is not complete header_timeout_s after
        its first byte gets 408 and the connection is closed.
    A body that trickles in is bounded by BentoML's traffic.timeout (504). Bytes that are not
    HTTP get uvicorn's 400 in the one error shape. Set up by time_out_connections."""

    idle_timeout_s: float
    header_timeout_s: float

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.idle_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1 ("Invalid HTTP request received."),
        in the one error shape (ErrorAnswers) instead of plain text."""
        body = json.dumps({"error": msg}).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        message = (f"request head (request line and headers) not complete "
                   f"{self.header_timeout_s:g} s after its first byte")
        client = "%s:%d" % self.client if self.client else "unknown client"
        log.warning("connection from %s: %s; answered 408 and closed", client, message)
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self.transport.close()


def time_out_connections(idle_timeout_s: float, header_timeout_s: float) -> None:
    """Make uvicorn serve every HTTP connection as TimedConnections. BentoML's worker builds
    uvicorn's Config with its default protocol ("auto") after it has imported the service
    module, and uvicorn looks "auto" up in HTTP_PROTOCOLS when it loads the Config; BentoML
    passes no other setting for it (`bentoml serve --timeout-keep-alive` only sets the timer
    that idle_timeout_s replaces here)."""
    TimedConnections.idle_timeout_s = idle_timeout_s
    TimedConnections.header_timeout_s = header_timeout_s
    HTTP_PROTOCOLS["auto"] = f"{__name__}:{TimedConnections.__name__}"
