"""One blueprint per resource; ``register`` mounts them all."""

from __future__ import annotations

from quart_trio import QuartTrio


def register(app: QuartTrio) -> None:
    from . import auth, chat, credits, health, models, observe, openapi, stream, supervisor

    for module in (auth, chat, credits, health, models, observe, openapi, stream, supervisor):
        app.register_blueprint(module.bp)
