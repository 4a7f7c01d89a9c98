"""The HTTP gateway: `POST /api/execute`, runs, health, metrics (JSON and Prometheus), OpenAPI.

`create_app`, `listen` and `serve` are loaded on first use: the CLI reads `chorus.gateway.keys`
to build its parser, and an agent process must not pay for Starlette and uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chorus.gateway.app import create_app
    from chorus.gateway.server import listen, serve

__all__ = ["create_app", "listen", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from chorus.gateway.app import create_app

        return create_app
    if name in ("listen", "serve"):
        from chorus.gateway import server

        return getattr(server, name)
    raise AttributeError(f"module 'chorus.gateway' has no attribute {name!r}")
