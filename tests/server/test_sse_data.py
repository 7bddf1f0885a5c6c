"""server.sse.event_data: an event's data back from its wire bytes, the inverse of
encode_event (the rings keep only the wire bytes: observation.ring)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from server.cluster.mirror import GAP, mirror_encoder
from server.sse import encode_event, event_data

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    event_id=st.integers(min_value=1, max_value=10**12),
    name=st.sampled_from(["chunk", "error", "done", "token", "usage", "history-start"]),
    value=JSON,
)
def test_data_comes_back_from_the_wire(event_id: int, name: str, value: object) -> None:
    # JSON text is one line whatever it holds ("data: " and newlines included).
    data = json.dumps(value, ensure_ascii=False)
    assert event_data(event_id, name, encode_event(event_id, name, data)) == data


def test_data_comes_back_from_a_mirrors_gaps() -> None:
    encode = mirror_encoder(encode_event)
    for data in ("", '{"skipped":7}'):
        assert event_data(5, GAP, encode(5, GAP, data)) == data
    text = json.dumps({"text": "data: id: 3\nevent: done"})
    assert event_data(9, "chunk", encode(9, "chunk", text)) == text
