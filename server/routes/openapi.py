"""``GET /api/openapi.json``: the contract, built from the routes themselves.

Every HTTP route declares its contract with :func:`server.validate.operation`
(the same :class:`~server.validate.Body` and :class:`~server.validate.Param`
objects parse its requests) and its role with
:func:`server.context.authenticated`; this module only walks the URL map and
writes that down as OpenAPI 3.1. Every error is the one JSON shape of SPEC §2.
"""

from __future__ import annotations

import re
from typing import Any

from quart import Blueprint, current_app
from quart_trio import QuartTrio

from .. import __version__
from ..context import authenticated
from ..validate import EVENT_STREAM, JSON, Operation, operation

bp = Blueprint("openapi", __name__)

ERROR = {
    "type": "object",
    "properties": {
        "message": {"type": "string"},
        "errorCode": {"type": "string"},
        "details": {"type": "array"},
    },
    "required": ["message", "errorCode"],
}
SSE_EVENT = {
    "type": "object",
    "description": "One Server-Sent Event; data is JSON text (SPEC §5, §6).",
    "properties": {
        "event": {"type": "string"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event"],
}
ERRORS = {
    "400": "Invalid input (VALIDATION_ERROR, or a code of SPEC §2).",
    "401": "No valid bearer token.",
    "403": "The role is not enough.",
    "404": "No such thing, or not the caller's.",
    "413": "The body is too large.",
    "429": "Rate limited; see Retry-After.",
}
_ARG = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def build(app: QuartTrio) -> dict[str, Any]:
    """The OpenAPI document of every HTTP route of ``app`` (WebSockets are described inline)."""
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.websocket or rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        op: Operation | None = getattr(view, "__chinwag_operation__", None)
        if op is None:
            raise RuntimeError(f"route {rule.rule} has no @operation: document it")
        path = _ARG.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(
                op, rule.endpoint, sorted(rule.arguments), getattr(view, "__chinwag_role__", None)
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chinwag",
            "version": __version__,
            "description": "Streaming chat over SSE, a credits ledger and live observation.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def _operation(
    op: Operation, endpoint: str, arguments: list[str], role: str | None
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in arguments
    ]
    params += [
        {"name": p.name, "in": p.where, "required": False, "schema": p.schema}
        | ({"description": p.description} if p.description else {})
        for p in op.params
    ]
    schema = {"type": "object"} if op.produces == JSON else SSE_EVENT
    if op.produces not in (JSON, EVENT_STREAM):
        schema = {"type": "string"}
    error = {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}
    responses: dict[str, Any] = {
        str(op.status): {"description": "OK", "content": {op.produces: {"schema": schema}}}
    }
    responses |= {code: {"description": text, "content": error} for code, text in ERRORS.items()}
    responses["default"] = {
        "description": "Any other error: the same JSON shape.",
        "content": error,
    }
    out: dict[str, Any] = {
        "operationId": endpoint.replace(".", "_"),
        "summary": op.summary,
        "tags": [endpoint.split(".")[0]],
        "parameters": params,
        "responses": responses,
    }
    if op.description:
        out["description"] = op.description
    if role is not None:
        out["security"] = [{"bearer": []}]
        out["x-role"] = role
        out["description"] = f"Role: {role} or above. {op.description}".strip()
    if op.body is not None:
        out["requestBody"] = {
            "required": not op.body.optional,
            "content": {JSON: {"schema": op.body.schema()}},
        }
    return out


@bp.get("/api/openapi.json")
@authenticated()
@operation("This document")
async def openapi() -> dict[str, Any]:
    cache = current_app.extensions
    if "chinwag.openapi" not in cache:
        cache["chinwag.openapi"] = build(current_app)  # type: ignore[arg-type]
    document: dict[str, Any] = cache["chinwag.openapi"]
    return document
