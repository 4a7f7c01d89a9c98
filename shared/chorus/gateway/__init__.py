"""The HTTP gateway: `POST /api/execute`, runs, health, metrics (JSON and Prometheus), OpenAPI."""

from chorus.gateway.app import create_app
from chorus.gateway.server import listen, serve

__all__ = ["create_app", "listen", "serve"]
