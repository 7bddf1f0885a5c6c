"""Hostile JSON bodies are bad input (issue 9): 400 VALIDATION_ERROR, the field
named where there is one, nothing logged as an error, nothing stored or reserved.

Deeply nested JSON (json.loads' RecursionError), lone surrogate escapes (valid
JSON syntax, not Unicode text: SQLite cannot store them), non-finite numbers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import jsonbody, validate
from server.errors import ValidationError
from server.jsonbody import MAX_DEPTH

JSON = {"Content-Type": "application/json"}
#: Far deeper than json.loads can recurse, far smaller than the body limit.
DEEP = b"[" * 200_000 + b"]" * 200_000


def nested(depth: int) -> bytes:
    """A JSON value ``depth`` levels deep: ``[[...[0]...]]``."""
    return b"[" * depth + b"0" + b"]" * depth


@pytest.fixture
async def world(client: Any, harness: Any) -> dict[str, Any]:
    """An admin with credits and one chat session of theirs."""
    admin = harness.user("admin", credits=10_000)
    r = await client.post("/api/chat/sessions", json={"title": "mine"}, headers=admin["headers"])
    assert r.status_code == 201
    return {**admin, "sid": (await r.get_json())["sessionId"]}


async def snapshot(client: Any, harness: Any, world: dict[str, Any]) -> tuple[Any, ...]:
    """What a refused body must leave as it was: sessions, messages, balance, the ledger."""
    headers = world["headers"]
    sessions = await (await client.get("/api/chat/sessions", headers=headers)).get_json()
    msgs = await (
        await client.get(f"/api/chat/sessions/{world['sid']}/messages", headers=headers)
    ).get_json()
    balance = await (await client.get("/api/credits/balance", headers=headers)).get_json()
    return sessions, msgs, balance, harness.svc.ledger.statistics()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def refused(client: Any, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """POST ``body``; it must be a 400 VALIDATION_ERROR. Returns the error body."""
    r = await client.post(path, data=body, headers={**headers, **JSON})
    assert r.status_code == 400, (path, await r.get_data())
    answer: dict[str, Any] = await r.get_json()
    assert answer["errorCode"] == "VALIDATION_ERROR"
    assert set(answer) <= {"message", "errorCode", "details"}
    return answer


# (path, the field a nested value is put in); login is unauthenticated.
ROUTES = [
    ("/api/auth/login", "username"),
    ("/api/chat/sessions", "title"),
    ("/api/chat/sessions/{sid}/stream", "message"),
    ("/api/chat/sessions/{sid}/messages", "message"),
    ("/api/credits/allocate", "reason"),
]


@pytest.mark.parametrize(("path", "field"), ROUTES)
async def test_deep_nesting_is_a_400(client, harness, world, caplog, path, field):
    path = path.format(sid=world["sid"])
    headers = {} if path == "/api/auth/login" else world["headers"]
    before = await snapshot(client, harness, world)

    answer = await refused(client, path, DEEP, headers)
    assert "nest" in answer["message"]
    # Deep inside a field, beyond what json.loads can take: no field can be named.
    answer = await refused(client, path, b'{"%s":%s}' % (field.encode(), DEEP), headers)
    assert "nest" in answer["message"]
    # Within what json.loads takes but past the cap: the field is named.
    answer = await refused(
        client, path, b'{"%s":%s}' % (field.encode(), nested(MAX_DEPTH)), headers
    )
    assert answer["details"] == [{"field": field}]

    assert await snapshot(client, harness, world) == before
    assert errors_logged(caplog) == []


async def test_every_json_operation_refuses_deep_nesting(client, harness, world, caplog):
    """Every operation the document says takes a JSON body, present and future."""
    doc = await (await client.get("/api/openapi.json", headers=world["headers"])).get_json()
    operations = [
        (method, path)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if "requestBody" in op
    ]
    assert len(operations) >= len(ROUTES)
    before = await snapshot(client, harness, world)
    for method, path in operations:
        url = path.replace("{session_id}", world["sid"]).replace("{stream_id}", "stream-1-x")
        r = await client.open(
            url, method=method.upper(), data=DEEP, headers={**world["headers"], **JSON}
        )
        assert r.status_code == 400, (method, path, await r.get_data())
        assert (await r.get_json())["errorCode"] == "VALIDATION_ERROR"
    assert await snapshot(client, harness, world) == before
    assert errors_logged(caplog) == []


async def test_nesting_up_to_the_cap_is_still_read(client, world):
    """The cap refuses only what is deeper: an ignored field nested to the limit is fine."""
    body = b'{"title":"ok","extra":%s}' % nested(MAX_DEPTH - 1)  # the object is level 1
    r = await client.post("/api/chat/sessions", data=body, headers={**world["headers"], **JSON})
    assert r.status_code == 201


SURROGATES = [
    ("/api/chat/sessions", rb'{"title":"a\ud800b"}', "title"),
    ("/api/chat/sessions", rb'{"title":"ok","initialMessage":"x\udfff"}', "initialMessage"),
    ("/api/chat/sessions/{sid}/messages", rb'{"message":"hi \ud83d there"}', "message"),
    ("/api/chat/sessions/{sid}/stream", rb'{"message":"hi \ud83d there"}', "message"),
    ("/api/chat/sessions/{sid}/stream", rb'{"message":"trailing \uDE00"}', "message"),
    ("/api/auth/login", rb'{"username":"al\ud800ice","password":"x"}', "username"),
    ("/api/credits/allocate", rb'{"username":"x","credits":1,"reason":"\ud800"}', "reason"),
    # Raw bytes that are not UTF-8 but that json.loads would decode to a surrogate.
    ("/api/chat/sessions", b'{"title":"a\xed\xa0\x80b"}', "title"),
    # Nested values are named by their path, as the batch endpoint names its items.
    (
        "/api/batch",
        rb'{"requests":[{"method":"POST","path":"/api/chat/sessions","body":{"title":"\ud800"}}]}',
        "requests[0].body.title",
    ),
]


NULS = [
    # PostgreSQL's text cannot hold NUL; no backend gets one (on PostgreSQL it was a 503).
    ("/api/auth/login", rb'{"username":"al\u0000ice","password":"x"}', "username"),
    ("/api/chat/sessions", rb'{"title":"ok","initialMessage":"x\u0000y"}', "initialMessage"),
    ("/api/chat/sessions/{sid}/messages", rb'{"message":"hi\u0000there"}', "message"),
    ("/api/chat/sessions/{sid}/stream", rb'{"message":"hi\u0000there"}', "message"),
    (
        "/api/users",
        rb'{"username":"n","password":"password1","role":"enduser","email":"a\u0000@b"}',
        "email",
    ),
]


@pytest.mark.parametrize(("path", "body", "field"), NULS)
async def test_a_nul_is_a_400_naming_the_field(client, harness, world, caplog, path, body, field):
    path = path.format(sid=world["sid"])
    headers = {} if path == "/api/auth/login" else world["headers"]
    before = await snapshot(client, harness, world)
    answer = await refused(client, path, body, headers)
    assert answer["details"] == [{"field": field}]
    assert "NUL" in answer["message"]
    assert await snapshot(client, harness, world) == before
    assert errors_logged(caplog) == []


@pytest.mark.parametrize(("path", "body", "field"), SURROGATES)
async def test_a_lone_surrogate_is_a_400_naming_the_field(
    client, harness, world, caplog, path, body, field
):
    path = path.format(sid=world["sid"])
    headers = {} if path == "/api/auth/login" else world["headers"]
    before = await snapshot(client, harness, world)
    answer = await refused(client, path, body, headers)
    assert answer["details"] == [{"field": field}]
    assert "\ud800" not in answer["message"]  # the bad text is not echoed
    assert await snapshot(client, harness, world) == before
    assert errors_logged(caplog) == []


async def test_a_lone_surrogate_in_a_key_is_a_400(client, harness, world, caplog):
    before = await snapshot(client, harness, world)
    await refused(client, "/api/chat/sessions", rb'{"ti\ud800tle":"x"}', world["headers"])
    answer = await refused(
        client, "/api/chat/sessions", rb'{"title":"x","extra":{"\udc00":1}}', world["headers"]
    )
    assert answer["details"] == [{"field": "extra"}]
    assert await snapshot(client, harness, world) == before
    assert errors_logged(caplog) == []


def test_a_text_field_never_passes_a_lone_surrogate():
    """Whatever mapping a declared Text field reads, not only json_body's."""
    with pytest.raises(ValidationError) as refused_:
        validate.Text(100).parse({"title": "a\ud800"}, "title")
    assert refused_.value.details == [{"field": "title"}]
    assert validate.Text(100).parse({"title": "a\U0001f600"}, "title") == "a\U0001f600"


async def test_surrogate_pairs_are_text(client, world):
    """A pair escape is one character (U+1F600): stored and answered as sent."""
    r = await client.post(
        "/api/chat/sessions",
        data=rb'{"title":"smile \ud83d\ude00"}',
        headers={**world["headers"], **JSON},
    )
    assert r.status_code == 201
    assert (await r.get_json())["title"] == "smile \U0001f600"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/chat/sessions/{sid}/stream", b'{"message":"hi","temperature":1e400}', "temperature"),
        ("/api/chat/sessions/{sid}/stream", b'{"message":"hi","maxTokens":-1e400}', "maxTokens"),
        ("/api/credits/allocate", b'{"username":"x","credits":1e400}', "credits"),
        ("/api/credits/allocate", b'{"username":"x","credits":1%s}' % (b"0" * 400), "credits"),
        ("/api/chat/sessions", b'{"title":"x","extra":[1e999]}', "extra[0]"),
    ],
)
async def test_huge_numbers_are_a_400_naming_the_field(
    client, harness, world, caplog, path, body, field
):
    before = await snapshot(client, harness, world)
    answer = await refused(client, path.format(sid=world["sid"]), body, world["headers"])
    assert answer["details"] == [{"field": field}]
    assert await snapshot(client, harness, world) == before
    assert errors_logged(caplog) == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"title":NaN}',
        b'{"title":"x","extra":Infinity}',
        b'{"title":-Infinity}',
        b'{"title":"x","n":1%s}' % (b"0" * 5000),  # past Python's int conversion limit
    ],
)
async def test_what_json_does_not_allow_is_a_400(client, harness, world, caplog, body):
    before = await snapshot(client, harness, world)
    await refused(client, "/api/chat/sessions", body, world["headers"])
    assert await snapshot(client, harness, world) == before
    assert errors_logged(caplog) == []


def _reference_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_reference_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_reference_depth, value), default=0)
    return 0


_text = st.text(alphabet=st.sampled_from('[]{}"\\ab:,\n\u00e9\ud800\U0001f600'), max_size=8)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=40,
)


@given(_json)
@settings(max_examples=300, deadline=None)
def test_the_c_speed_checks_agree_with_a_plain_walk(value):
    """Depth, infinities and surrogates read off the encoded text, strings and all."""
    text = jsonbody._encode(value)
    structure = jsonbody._structure(text)
    assert jsonbody._depth(structure) == min(_reference_depth(value), MAX_DEPTH + 1)
    infinite = any(isinstance(v, float) and math.isinf(v) for v in _leaves(value))
    assert (b"Infinity" in structure) == infinite


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
