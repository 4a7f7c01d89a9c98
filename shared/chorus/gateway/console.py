"""The web console: pages for a person (runs, one run, agents, tail, API docs) on the
gateway's own port, from files shipped in the wheel (`chorus/gateway/static/`, no CDN).

Every page is the same HTML shell; the page's script (plain JavaScript modules, no build
step) picks the view from the path and reads everything it shows from the API with the
caller's key, so the shell and its assets are served to anyone the Host guard lets in: they
hold no data. The shell answers with a Content-Security-Policy of its own, which lets in
scripts, styles and connections from the gateway itself and nothing else (no inline script,
no inline style, no frames, no forms posted anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Final

from starlette.requests import Request
from starlette.responses import Response

from chorus.errors import NotFound

ASSETS_PATH: Final = "/console"  # where the scripts and the stylesheet are served
PAGES: Final = ("/", "/runs/{run_id}", "/agents", "/tail", "/docs")
CONSOLE_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
MEDIA_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}
SHELL: Final = "index.html"


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str


def load_assets() -> dict[str, Asset]:
    """Every file of the console, read once: a fixed set of names, so no path from a request
    ever reaches the file system."""
    folder = resources.files("chorus.gateway") / "static"
    assets: dict[str, Asset] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in MEDIA_TYPES:
            assets[entry.name] = Asset(entry.read_bytes(), MEDIA_TYPES[suffix])
    if SHELL not in assets:
        raise RuntimeError(f"the console's {SHELL} is missing from the chorus package")
    return assets


class Console:
    """The routes of the console's pages and assets."""

    def __init__(self) -> None:
        self.assets = load_assets()

    async def page(self, request: Request) -> Response:
        """Any console page: the shell (the script renders the view the path names)."""
        shell = self.assets[SHELL]
        return Response(
            shell.body,
            media_type=shell.media_type,
            headers={"Content-Security-Policy": CONSOLE_CSP},
        )

    async def asset(self, request: Request) -> Response:
        """`/console/{name}`: one of the console's files."""
        name: str = request.path_params["name"]
        asset = self.assets.get(name)
        if asset is None or name == SHELL:
            raise NotFound(f"the console has no file {name[:100]!r}")
        return Response(asset.body, media_type=asset.media_type)
