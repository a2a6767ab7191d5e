"""The HTTP service (``segscope serve``): an ASGI app over the pipeline, with server-side batching.

``create_app(model, ServiceConfig(...))`` builds the FastAPI app; ``server.serve`` runs it with
uvicorn. FastAPI, uvicorn and python-multipart come with the ``serve`` extra.
"""

from __future__ import annotations

from segscope.service.config import ServiceConfig

__all__ = ["ServiceConfig"]
