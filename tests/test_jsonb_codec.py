"""The shards' jsonb and json codecs decode with orjson where it gives what
json.loads gives.

Every jsonb and json value the service reads (event bodies above all, json
since migration 0018, per event for each subscriber and the publisher) goes
through them, so a difference would change what callers see; these tests hold
them to json.loads, the reference.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.embedded.postgres import EmbeddedPostgres
from ledger.storage.shard import (
    _decode_json,
    _decode_jsonb,
    _encode_json,
    _encode_jsonb,
    init_connection,
)

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

# What a jsonb value of the ledger may hold: ints a bigint or uint64 carries,
# text of any character (surrogates aside: neither UTF-8 nor jsonb carries one).
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def typed(value: Any, *, key_order: bool = True) -> Any:
    """The value with every leaf's type beside it (1 == 1.0 and True == 1 in Python),
    and each object's keys in their order, or sorted (jsonb keeps its own order)."""
    if isinstance(value, dict):
        items = [(k, typed(v, key_order=key_order)) for k, v in value.items()]
        return ("dict", items if key_order else sorted(items))
    if isinstance(value, list):
        return ("list", [typed(v, key_order=key_order) for v in value])
    return (type(value).__name__, repr(value))


def stored(text: str) -> bytes:
    """jsonb's binary form: a version byte, then the text."""
    return b"\x01" + text.encode()


@settings(max_examples=400, deadline=None)
@given(value=JSON_VALUES, ensure_ascii=st.booleans())
def test_decoding_gives_what_json_loads_gives(value: Any, ensure_ascii: bool) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    assert typed(_decode_jsonb(stored(text))) == typed(json.loads(text))
    assert typed(_decode_json(text.encode())) == typed(json.loads(text))


@given(value=JSON_VALUES)
def test_what_is_encoded_decodes_to_itself(value: Any) -> None:
    assert typed(_decode_jsonb(_encode_jsonb(value))) == typed(value)
    assert typed(_decode_json(_encode_json(value))) == typed(value)


def test_what_orjson_refuses_json_loads_decides() -> None:
    for text in ('{"a": NaN}', '"\\ud800"', "[Infinity, -Infinity]"):
        assert typed(_decode_jsonb(stored(text))) == typed(json.loads(text))
        assert typed(_decode_json(text.encode())) == typed(json.loads(text))


async def test_postgresql_jsonb_reads_back_exactly(pg_server: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg_server.dsn())
    try:
        await init_connection(conn)
        built = await conn.fetchval(
            "SELECT jsonb_build_object('max', 9223372036854775807::bigint,"
            " 'min', (-9223372036854775808)::bigint, 'text', 'é😀\"\\',"
            " 'list', jsonb_build_array(0, -1, 'x', null, true, 1.5))"
        )
        assert typed(built, key_order=False) == typed(
            {
                "max": 2**63 - 1,
                "min": -(2**63),
                "text": 'é😀"\\',
                "list": [0, -1, "x", None, True, 1.5],
            },
            key_order=False,
        )
        sent = {"metadata": {"order": "A-1", "note": "日本"}, "amount_minor": 2**63 - 1}
        read_back = await conn.fetchval("SELECT $1::jsonb", sent)
        assert typed(read_back, key_order=False) == typed(sent, key_order=False)
        # json keeps the text as built: its keys in their order.
        built = await conn.fetchval(
            "SELECT json_build_object('max', 9223372036854775807::bigint, 'text', 'é😀\"\\',"
            " 'list', json_build_array(0, -1, 'x', null, true, 1.5))"
        )
        assert typed(built) == typed(
            {"max": 2**63 - 1, "text": 'é😀"\\', "list": [0, -1, "x", None, True, 1.5]}
        )
        assert typed(await conn.fetchval("SELECT $1::json", sent)) == typed(sent)
    finally:
        await conn.close()
