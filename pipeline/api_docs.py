"""The service's API docs page (GET /) without anything from outside the server.

BentoML 1.4's page (_bentoml_impl/server/main-openapi.html) loads Google Tag Manager's script
(and its iframe for no-JS browsers), and Swagger UI's default online validator badge fetches an
image from validator.swagger.io when the page is served under a name other than localhost.
This page is the same Swagger UI, from the files BentoML bundles and serves under
/static_content/, on the same /docs.json spec, with the validator off and no tag manager.
"""
from __future__ import annotations

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
