"""``segscope serve``: load the model, build the app, run it with uvicorn."""

from __future__ import annotations

from segscope.errors import OptionError
from segscope.service.config import ServiceConfig


def serve(model: str, config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``model`` (any ``model=`` value the pipeline takes) on ``host:port`` until interrupted.

    Raises:
        OptionError: the ``serve`` extra is not installed, or the config does not fit the model.
    """
    try:
        import uvicorn

        from segscope.service.app import create_app
    except ImportError as error:
        raise OptionError(
            f"segscope serve needs FastAPI, uvicorn and python-multipart ({error.name} is missing): "
            "pip install 'segscope[serve]'"
        ) from error
    from segscope.loading import load

    app = create_app(load(model), config)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
