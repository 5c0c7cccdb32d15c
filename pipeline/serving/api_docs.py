"""The service's API docs page (GET /) without anything from outside the server, and the OpenAPI
document it draws (/docs.json) saying what the service really answers.

BentoML 1.4's page (_bentoml_impl/server/main-openapi.html) loads Google Tag Manager's script
(and its iframe for no-JS browsers), and Swagger UI's default online validator badge fetches an
image from validator.swagger.io when the page is served under a name other than localhost.
This page is the same Swagger UI, from the files BentoML bundles and serves under
/static_content/, on the same /docs.json spec, with the validator off and no tag manager.

BentoML's /docs.json lists every endpoint the service declares, whatever the served model reads,
declares error bodies of a shape BentoML itself does not keep to ({"error", "detail": string},
while it answers [{"error"}] or a list of pydantic errors), no 413, 415, 503 or 504, and a pixel
array as an array of numbers. published() makes it what the server answers: only the served
modality's endpoints, every error status each can give with the one shape every error has
(pipeline/serving/http_guard.py ErrorAnswers), and each JSON field's constraints as far as OpenAPI can
state them (sizes, ranges: the modality's api_fields). What it cannot state (a file's format, a
text's visible characters or UTF-8 bytes) is in the field's description and answered 400.
"""
from __future__ import annotations

import copy
import json
from typing import Callable

from starlette.responses import HTMLResponse

PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>BentoML Prediction Service</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script>
      window.onload = function () {
        window.ui = SwaggerUIBundle({
          url: "./docs.json",
          dom_id: "#swagger-ui",
          deepLinking: true,
          validatorUrl: null,
          presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
          plugins: [SwaggerUIBundle.plugins.DownloadUrl],
          layout: "StandaloneLayout",
        });
      };
    </script>
  </body>
</html>
"""


class OfflineDocsPage:
    """ASGI middleware: GET (or HEAD) / answers PAGE; every other request goes to the app."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            return await HTMLResponse(PAGE)(scope, receive, send)
        return await self.app(scope, receive, send)


ERROR = {"type": "object", "title": "Error", "required": ["error"], "additionalProperties": False,
         "properties": {"error": {"type": "string", "title": "Message",
                                  "description": "why the request was refused, naming the field "
                                                 "and the cause; what the client sent is quoted "
                                                 "at most serve.max_error_chars characters"}}}
# Status -> when an endpoint answers it: every endpoint (POST) and every probe (GET).
ENDPOINT_ERRORS = {
    "400": "refused input: a field missing, of the wrong type or shape, over a limit, a file that "
           "does not decode, a text with no visible character, an endpoint of another modality",
    "408": "the request head (request line and headers) took longer than serve.header_timeout_s",
    "413": "a body over serve.max_request_bytes",
    "415": "a content type the endpoint does not take",
    "500": "a server error; the server log has its traceback",
    "503": "overloaded: the request could not be batched within its latency budget",
    "504": "not answered within the request timeout (30 s)",
}
PROBE_ERRORS = {
    "408": ENDPOINT_ERRORS["408"],
    "503": "not ready (the model has not loaded and passed its self-check) or not alive",
}


def published(spec: dict, endpoints: set[str], fields: dict[str, dict]) -> dict:
    """BentoML's OpenAPI document `spec` as the server answers: POST paths only those in
    `endpoints` (the served model's modality), each operation's responses 2xx plus
    ENDPOINT_ERRORS or PROBE_ERRORS, all of the ERROR schema, and each JSON body property named
    in `fields` (name -> JSON schema) given that schema (its title and description kept)."""
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):  # BentoML's error shapes
        schemas.pop(name, None)
    schemas["Error"] = ERROR
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, item in list(spec.get("paths", {}).items()):
        if "post" in item and path not in endpoints:
            del spec["paths"][path]
            continue
        for method, operation in item.items():
            errors = ENDPOINT_ERRORS if method == "post" else PROBE_ERRORS
            operation["responses"] = {
                **{code: r for code, r in operation.get("responses", {}).items()
                   if code.startswith("2")},
                **{code: {"description": why, "content": error} for code, why in errors.items()}}
            if "requestBody" in operation:  # OpenAPI's default is optional; every endpoint's is not
                operation["requestBody"]["required"] = True
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            for name, field in (body or {}).get("schema", {}).get("properties", {}).items():
                if name in fields:
                    kept = {k: field[k] for k in ("title", "description") if k in field}
                    field.clear()
                    field.update(kept, **fields[name])
    return spec


class PublishedSpec:
    """ASGI middleware: GET /docs.json answers BentoML's document as `published` makes it;
    `served` gives, per request, the served model's endpoints and JSON fields (the model is
    loaded by then)."""

    def __init__(self, app, served: Callable[[], tuple[set[str], dict[str, dict]]]) -> None:
        self.app = app
        self.served = served

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        start, body = None, bytearray()

        async def answer(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            data = bytes(body)
            if start["status"] == 200:
                data = json.dumps(published(json.loads(data), *self.served())).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

        return await self.app(scope, receive, answer)
