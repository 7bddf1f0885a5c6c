"""``GET /api/models`` and ``POST /api/models/recommend``."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from ..context import authenticated, services
from ..errors import ValidationError
from ..validate import json_body, string

bp = Blueprint("models", __name__)

TASK_TYPES = ("general", "code", "creative", "chat", "reasoning", "text")
PRIORITIES = ("speed", "quality", "cost")


@bp.get("/api/models")
@authenticated()
async def list_models() -> dict[str, Any]:
    svc = services()
    return {"models": [m.public(svc.settings.provider) for m in svc.catalog]}


@bp.post("/api/models/recommend")
@authenticated()
async def recommend() -> dict[str, Any]:
    svc = services()
    body = await json_body(allow_empty=True)
    task = string(body, "taskType", max_len=50) or "general"
    priority = string(body, "priority", max_len=20) or "quality"
    if priority not in PRIORITIES:
        raise ValidationError(f"'priority' must be one of {', '.join(PRIORITIES)}.")
    if task not in TASK_TYPES:
        raise ValidationError(f"'taskType' must be one of {', '.join(TASK_TYPES)}.")
    best, alternatives, reason = svc.catalog.recommend(task, priority)
    provider = svc.settings.provider
    return {
        "recommendedModel": best.public(provider),
        "alternatives": [m.public(provider) for m in alternatives],
        "reason": reason,
    }
