"""`qwen2vl-edge serve`: an OpenAI-compatible HTTP server above the runtime (the `[serve]` extra; Ray Serve
replicas with `[ray]`). The runtime never imports this package."""

from .app import create_app
from .settings import Limits, ServerSettings

__all__ = ["Limits", "ServerSettings", "create_app"]
