"""The rayft service as one Ray Serve application: inference and the fine-tuning jobs API.

    serve run rayft.cluster.service_app:build_service_app model=tiny-llama

or a Serve config file whose application has ``import_path:
rayft.cluster.service_app:build_service_app`` and ``args:`` matching
``serving.app.ServeArgs``; ``rayft serve`` runs the same application.

The inference deployment (``serving.app``) knows nothing of the control plane: this
builder hands it the import paths of the control plane's routers (OpenAI's files and
fine-tuning jobs routes, ``cluster.fine_tuning_api``), which each replica includes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray import serve

    from rayft.serving.app import ServeArgs

FINE_TUNING_ROUTES = "rayft.cluster.fine_tuning_api:router"
ROUTERS = [FINE_TUNING_ROUTES]
"""The routers the service mounts next to the inference routes."""


def build_service_app(args: dict[str, Any] | ServeArgs | None = None) -> serve.Application:
    """Serve's application builder of the rayft service.

    Args:
        args: ``ServeArgs`` fields as a dict (strings from the command line are coerced).

    Returns:
        The bound application, ready for ``serve.run``.

    Raises:
        InsecureServing: Serve binds beyond loopback and no API key is set.
    """
    from rayft.serving.app import bind_app

    return bind_app(args, routers=list(ROUTERS))
