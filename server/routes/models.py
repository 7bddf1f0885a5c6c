"""``GET /api/models`` and ``POST /api/models/recommend``."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from ..context import authenticated, services
from ..validate import Body, Text, operation

bp = Blueprint("models", __name__)

TASK_TYPES = ("general", "code", "creative", "chat", "reasoning", "text")
PRIORITIES = ("speed", "quality", "cost")


RECOMMEND = Body(
    {"taskType": Text(50, choices=TASK_TYPES), "priority": Text(20, choices=PRIORITIES)},
    optional=True,
)


@bp.get("/api/models")
@authenticated()
@operation("The model catalog")
async def list_models() -> dict[str, Any]:
    svc = services()
    return {"models": [m.public(svc.settings.provider) for m in svc.catalog]}


@bp.post("/api/models/recommend")
@authenticated()
@operation("The best model for a task and a priority", body=RECOMMEND)
async def recommend(body: dict[str, Any]) -> dict[str, Any]:
    svc = services()
    task = body["taskType"] or "general"
    priority = body["priority"] or "quality"
    best, alternatives, reason = svc.catalog.recommend(task, priority)
    provider = svc.settings.provider
    return {
        "recommendedModel": best.public(provider),
        "alternatives": [m.public(provider) for m in alternatives],
        "reason": reason,
    }
