"""Request parsing: declared body fields, query and header parameters,
pagination — failing as clear 400s. The body itself is read and screened by
:func:`server.jsonbody.json_body`.

Every check raises :class:`server.errors.ValidationError` (or a more
specific :class:`ApiError`) *before* anything is stored or reserved.

The declared shapes (:class:`Body` of :class:`Text`/:class:`Int`/:class:`Num`
fields, :class:`Param` for query strings and headers) are what both parse
requests and describe them: :func:`operation` binds them to a route and
``GET /api/openapi.json`` (:mod:`server.openapi`) is built from them, so the
document cannot drift from what is enforced.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from quart import request

from .errors import ValidationError
from .jsonbody import UNSTORABLE, json_body, not_text
from .store import Page

MAX_INT = 2**53


def string(
    body: Mapping[str, Any],
    name: str,
    *,
    required: bool = False,
    max_len: int | None = None,
    min_len: int = 0,
    not_blank: bool = False,
) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ValidationError(f"'{name}' is required.", details=[{"field": name}])
        return None
    if not isinstance(value, str):
        raise ValidationError(f"'{name}' must be a string.", details=[{"field": name}])
    if UNSTORABLE.search(value):  # json_body refuses these first; any other source too
        raise not_text(name)
    if not_blank and not value.strip():
        raise ValidationError(f"'{name}' must not be blank.", details=[{"field": name}])
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise ValidationError(
            f"'{name}' must be {min_len} to {max_len} characters.", details=[{"field": name}]
        )
    return value


def integer(
    body: Mapping[str, Any],
    name: str,
    *,
    required: bool = False,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ValidationError(f"'{name}' is required.", details=[{"field": name}])
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"'{name}' must be an integer.", details=[{"field": name}])
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValidationError(
            f"'{name}' must be between {minimum} and {maximum}.", details=[{"field": name}]
        )
    return value


def number(body: Mapping[str, Any], name: str, *, minimum: float, maximum: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValidationError(f"'{name}' must be a number.", details=[{"field": name}])
    if not minimum <= value <= maximum:
        raise ValidationError(
            f"'{name}' must be between {minimum} and {maximum}.", details=[{"field": name}]
        )
    return float(value)


_DIGITS = re.compile(r"[0-9]{1,32}")


def client_id(value: Any) -> str:
    """A client-chosen session id: a UUID or digits (SPEC §4)."""
    if isinstance(value, str):
        if _DIGITS.fullmatch(value):
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise ValidationError("'id' must be a UUID or digits.", details=[{"field": "id"}])


# -- declared shapes ---------------------------------------------------------


def _nullable(schema: dict[str, Any], required: bool) -> dict[str, Any]:
    # An optional field may be sent as null: it means "absent" (OpenAPI 3.1).
    if not required:
        schema["type"] = [schema["type"], "null"]
    return schema


class Field(Protocol):
    @property
    def required(self) -> bool: ...

    def parse(self, body: Mapping[str, Any], name: str) -> Any: ...

    def schema(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Text:
    max_len: int
    min_len: int = 0
    required: bool = False
    not_blank: bool = False
    choices: tuple[str, ...] = ()
    description: str = ""

    def parse(self, body: Mapping[str, Any], name: str) -> str | None:
        value = string(
            body,
            name,
            required=self.required,
            max_len=self.max_len,
            min_len=self.min_len,
            not_blank=self.not_blank,
        )
        if value is not None and self.choices and value not in self.choices:
            raise ValidationError(
                f"'{name}' must be one of {', '.join(self.choices)}.", details=[{"field": name}]
            )
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string", "maxLength": self.max_len}
        if self.min_len:
            out["minLength"] = self.min_len
        if self.not_blank:
            out["pattern"] = r"\S"
        if self.choices:
            out["enum"] = [*self.choices, *([] if self.required else [None])]
        if self.description:
            out["description"] = self.description
        return _nullable(out, self.required)


@dataclass(frozen=True)
class Int:
    minimum: int
    maximum: int
    required: bool = False
    description: str = ""

    def parse(self, body: Mapping[str, Any], name: str) -> int | None:
        return integer(
            body, name, required=self.required, minimum=self.minimum, maximum=self.maximum
        )

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer", "minimum": self.minimum, "maximum": self.maximum}
        if self.description:
            out["description"] = self.description
        return _nullable(out, self.required)


@dataclass(frozen=True)
class Num:
    minimum: float
    maximum: float
    required: bool = False

    def parse(self, body: Mapping[str, Any], name: str) -> float | None:
        return number(body, name, minimum=self.minimum, maximum=self.maximum)

    def schema(self) -> dict[str, Any]:
        return _nullable(
            {"type": "number", "minimum": self.minimum, "maximum": self.maximum}, self.required
        )


@dataclass(frozen=True)
class Flag:
    """A JSON boolean (absent or null: ``default``)."""

    default: bool = False
    required: bool = False

    def parse(self, body: Mapping[str, Any], name: str) -> bool:
        value = body.get(name)
        if value is None:
            return self.default
        if not isinstance(value, bool):
            raise ValidationError(f"'{name}' must be true or false.", details=[{"field": name}])
        return value

    def schema(self) -> dict[str, Any]:
        return _nullable({"type": "boolean"}, self.required)


@dataclass(frozen=True)
class Loose:
    """Any JSON value: the handler checks it itself (an id that must match, say)."""

    description: str
    required: bool = False

    def parse(self, body: Mapping[str, Any], name: str) -> Any:
        return body.get(name)

    def schema(self) -> dict[str, Any]:
        return {"description": self.description}


@dataclass(frozen=True)
class ClientId:
    """A client-chosen id: a UUID or up to 32 digits."""

    required: bool = False

    def parse(self, body: Mapping[str, Any], name: str) -> str | None:
        value = body.get(name)
        return None if value is None else client_id(value)

    def schema(self) -> dict[str, Any]:
        return _nullable(
            {
                "type": "string",
                "anyOf": [{"format": "uuid"}, {"pattern": "^[0-9]{1,32}$"}],
                "description": self.__doc__ or "",
            },
            self.required,
        )


@dataclass(frozen=True)
class Body:
    """A JSON object body: declared fields (others are ignored)."""

    fields: Mapping[str, Field]
    optional: bool = False  # an empty body means {}

    async def read(self) -> dict[str, Any]:
        raw = await json_body(allow_empty=self.optional)
        return {name: spec.parse(raw, name) for name, spec in self.fields.items()}

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {name: spec.schema() for name, spec in self.fields.items()},
            "required": [name for name, spec in self.fields.items() if spec.required],
        }


@dataclass(frozen=True)
class Param:
    """A query-string (or header) parameter, declared once for parsing and docs."""

    name: str
    schema: dict[str, Any]
    where: Literal["query", "header"] = "query"
    description: str = ""


def _query_int(param: Param) -> int:
    name, schema = param.name, param.schema
    raw = request.args.get(name)
    if raw is None:
        return int(schema["default"])
    if not re.fullmatch(r"[0-9]{1,9}", raw.strip()):
        raise ValidationError(f"'{name}' must be a positive integer.", details=[{"field": name}])
    value = int(raw)
    minimum, maximum = schema["minimum"], schema.get("maximum")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise ValidationError(
            f"'{name}' must be at least {minimum}{bound}.", details=[{"field": name}]
        )
    return value


PAGE = Param("page", {"type": "integer", "minimum": 1, "maximum": 999_999_999, "default": 1})
LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20})
PAGINATION = (PAGE, LIMIT)


def pagination() -> tuple[int, int, Page]:
    """``page`` (1-based, default 1) and ``limit`` (default 20, max 100), SPEC §2."""
    page = _query_int(PAGE)
    limit = _query_int(LIMIT)
    return page, limit, Page(offset=(page - 1) * limit, limit=limit)


# -- routes ----------------------------------------------------------------

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class Operation:
    """What :mod:`server.openapi` says of a route."""

    summary: str
    body: Body | None = None
    params: tuple[Param, ...] = ()
    status: int = 200
    produces: str = JSON
    description: str = ""


Handler = Callable[..., Awaitable[Any]]


def operation(
    summary: str,
    *,
    body: Body | None = None,
    params: tuple[Param, ...] = (),
    status: int = 200,
    produces: str = JSON,
    description: str = "",
) -> Callable[[Handler], Handler]:
    """Declare a route's contract; with ``body``, the handler gets ``body=`` parsed by it.

    Put it under :func:`server.context.authenticated`, so a request is
    authenticated before its body is read.
    """
    op = Operation(summary, body, params, status, produces, description)

    def decorate(handler: Handler) -> Handler:
        if body is None:
            wrapper = handler
        else:

            @functools.wraps(handler)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                return await handler(*args, body=await body.read(), **kwargs)

        wrapper.__chinwag_operation__ = op  # type: ignore[attr-defined]
        return wrapper

    return decorate


def paginated(key: str, items: list[Any], total: int, page: int, limit: int) -> dict[str, Any]:
    total_pages = (total + limit - 1) // limit
    return {
        key: items,
        "pagination": {
            "page": page,
            "limit": limit,
            "total": total,
            "totalPages": total_pages,
            "hasNext": page < total_pages,
        },
    }
