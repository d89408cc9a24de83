"""``GET /ui``: the dashboard, a static page whose script talks to the JSON API.

Its HTML, CSS and JavaScript ship inside the package (no CDN, no build step). The page
itself holds no data, so it needs no API key; the script sends the key that the user
types into it with every API call, as any other client does.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from trainserve.examples import guide_moons_spec

UI_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"

# Only the package's own files may run or style the page; plots arrive as blob: URLs
# because they are fetched with the Authorization header.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _json_for_script(value: object) -> str:
    # Inside <script type="application/json"> a "</script>" would end the element early.
    return json.dumps(value, indent=2).replace("<", "\\u003c")


def install(app: FastAPI) -> None:
    template = (UI_DIR / "index.html").read_text(encoding="utf-8")
    default_spec = _json_for_script(guide_moons_spec())

    @app.get("/ui", include_in_schema=False, response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        root = html.escape(request.scope.get("root_path", ""), quote=True)
        page = template.replace("{{root}}", root).replace("{{default_spec}}", default_spec)
        return HTMLResponse(page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})
