"""HTTP guards for Kiln's BentoML service: ASGI middleware that answers a request the service
cannot take with a 4xx naming the cause, before BentoML parses or buffers it, and logs each
rejected request as one WARNING line.

    RequestSizeLimit  413 for a body over serve.max_request_bytes, before it is read
    InputGuard        415/400 for a content type, multipart body or field an endpoint does not take
    RejectionLog      one `METHOD path status: reason` WARNING line per 4xx answer

BentoML 1.4 answers malformed multipart bodies, text values where a file is expected and unknown
fields with HTTP 500 and a traceback (_bentoml_impl/server/app.py), and logs every 4xx it raises
itself at ERROR with a traceback; log_rejections_once() drops those records, since RejectionLog
logs the request. Needs only Starlette and python-multipart, which come with BentoML.
"""
from __future__ import annotations

import json
import logging

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers

# Under "bentoml" so that BentoML's log configuration (handler, format, level) applies.
log = logging.getLogger("bentoml.serve.kiln")


class InputGuard:
    """ASGI middleware: a request an endpoint cannot take gets 415/400 with the cause before
    BentoML parses it. BentoML 1.4 answers such requests with HTTP 500 and a traceback
    (_bentoml_impl/server/app.py: Starlette's 400 for a malformed multipart body is caught as
    an unexpected exception; a text value where a file is expected is fetched as a URL; an
    unknown field's bytes are JSON-decoded). `routes`: path -> the multipart file fields it
    takes, or () for a JSON endpoint. Runs inside RequestSizeLimit, so the body is bounded."""

    def __init__(self, app, routes: dict[str, tuple[str, ...]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        fields = self.routes.get(scope.get("path"))
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
        messages = await _body_messages(receive)
        problem = _form_problem(headers, messages, fields)
        if problem:
            return await _reject(send, 400, problem)
        return await self.app(scope, _replay(messages, receive), send)


async def _body_messages(receive) -> list[dict]:
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[dict], receive):
    replay = iter(messages)

    async def replayed():
        return next(replay, None) or await receive()

    return replayed


def _form_problem(headers: Headers, messages: list[dict], fields: tuple[str, ...]) -> str | None:
    """What is wrong with a multipart body that should hold exactly one file per field in
    `fields`, or None. Parsed with python-multipart, as BentoML's Starlette parses it after this
    check, but only the part headers are kept (a full parse measured ~45-80 us per request
    against ~18 us here, on a 289-byte upload)."""
    content_type, options = parse_options_header(headers.get("content-type", ""))
    if not options.get(b"boundary"):
        return "multipart body without a boundary (Content-Type: multipart/form-data; boundary=...)"
    parts: list[dict[bytes, bytes]] = []
    header: list[bytes] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        key = b"".join(header).lower()
        parts[-1][key] = parts[-1].get(key, b"") + data[start:end]

    parser = MultipartParser(options[b"boundary"], {
        "on_part_begin": lambda: parts.append({}),
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": header.clear})
    # Few parts at most: a body of many tiny parts is refused below, not stored anywhere.
    try:
        for message in messages:
            parser.write(message.get("body", b""))
        parser.finalize()
    except MultipartParseError as e:
        return f"malformed multipart body ({e})"
    names, files = [], []
    for part in parts:
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


class RejectionLog:
    """ASGI middleware, outermost of Kiln's: every 4xx answer is one WARNING line, `METHOD
    path status: reason` (the reason from the JSON body: {"error"} or pydantic's "detail"),
    whoever answered it. BentoML's own ERROR record with a traceback for the same request is
    dropped by _ClientErrorFilter; a 5xx keeps its traceback."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, body = 0, bytearray()

        async def logged_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and 400 <= status < 500:
                body.extend(message.get("body", b"")[: 4096 - len(body)])
                if not message.get("more_body", False):
                    log.warning("%s %s %d: %s", scope["method"], scope["path"], status,
                                _reason(bytes(body)))
            await send(message)

        return await self.app(scope, receive, logged_send)


def _reason(body: bytes) -> str:
    try:
        error = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "(no message)"
    if isinstance(error, list) and error:  # BentoML answers a 4xx BentoMLException as [{...}]
        error = error[0]
    if not isinstance(error, dict):
        return str(error)
    details = [d.get("msg", "") for d in error.get("detail", []) if isinstance(d, dict)]
    return "; ".join(details) or str(error.get("error", error))


class ClientErrorFilter(logging.Filter):
    """Drops BentoML's ERROR record (with traceback) for a request it answers with a 4xx:
    validation errors and BentoMLExceptions below 500. RejectionLog logs those requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            return False
        return not (isinstance(error, BentoMLException) and error.error_code < 500)


def log_rejections_once() -> None:
    """Leave RejectionLog's line the only record of a rejected request."""
    # bentoml._internal.server.http_app.log_exception logs each failed request on this logger.
    logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorFilter())
    # python-multipart logs a WARNING of its own before raising on a malformed body; InputGuard's
    # 400 carries the same message, logged once by RejectionLog.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
