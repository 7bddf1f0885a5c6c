"""One blueprint per resource; ``register`` mounts them all."""

from __future__ import annotations

from quart_trio import QuartTrio


def register(app: QuartTrio) -> None:
    from . import (
        auth,
        batch,
        chat,
        console,
        credits,
        health,
        metrics,
        models,
        observe,
        openapi,
        stream,
        supervisor,
        users,
        v1,
    )

    for module in (
        auth,
        batch,
        chat,
        console,
        credits,
        health,
        metrics,
        models,
        observe,
        openapi,
        stream,
        supervisor,
        users,
        v1,
    ):
        app.register_blueprint(module.bp)
