"""The publisher's content header of an event's message, marshalled by hand, is
byte for byte what pamqp marshals from amqp_properties (docs/events.md, "Messages"):
for positions at each of pamqp's integer widths, long and non-ASCII shard names, and
commit times in any zone (one before 1970 pamqp refuses; so does the header); and a
message's frames, marshalled by hand too, are what aiormq marshals through pamqp."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from ledger.api import amqp_publisher
from ledger.domain.events import EventKind
from tests.test_event_json import EDGE_ROWS, MOMENTS

# pamqp writes a header's integer in the narrowest of its types: each bound of each.
POSITIONS = (0, 1, 127, 128, 32767, 32768, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32)
POSITIONS += (2**63 - 1,)
SHARDS = ("shard-a", "s", "é" * 100)


def _pamqp(row: object, body_size: int) -> bytes | type[Exception]:
    try:
        properties = amqp_publisher.amqp_properties(row)  # type: ignore[arg-type]
        return ContentHeader(properties=properties, body_size=body_size).marshal()
    except Exception as error:  # the same refusal is expected of the header
        return type(error)


def _ours(row: object, body_size: int) -> bytes | type[Exception]:
    try:
        return amqp_publisher.amqp_header(row, body_size).marshal()  # type: ignore[arg-type]
    except Exception as error:
        return type(error)


@pytest.mark.parametrize("kind", list(EventKind), ids=lambda k: k.name)
def test_the_header_is_what_pamqp_marshals_for_every_kind(kind: EventKind) -> None:
    for name, row in EDGE_ROWS.items():
        for position in POSITIONS:
            for shard in SHARDS:
                for body_size in (0, 1, 2**40):
                    changed = replace(row, kind=kind, position=position, shard=shard)
                    expected = _pamqp(changed, body_size)
                    assert isinstance(expected, bytes), (name, expected)
                    assert _ours(changed, body_size) == expected, (name, position, shard)


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_the_header_says_the_commit_time_as_pamqp_does(moment: datetime) -> None:
    row = replace(EDGE_ROWS["transfer, defaults left out"], committed_at=moment)
    assert _ours(row, 100) == _pamqp(row, 100)


def test_an_event_without_an_id_has_no_message_id_as_pamqp_leaves_it_out() -> None:
    row = replace(EDGE_ROWS["transfer, defaults left out"], event_id="")
    expected = _pamqp(row, 7)
    assert isinstance(expected, bytes)
    assert _ours(row, 7) == expected


def test_a_commit_time_in_another_zone_is_said_as_the_same_second() -> None:
    moment = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-3)))
    for committed_at in (moment, moment.astimezone(UTC)):
        row = replace(EDGE_ROWS["account"], committed_at=committed_at)
        assert _ours(row, 5) == _pamqp(row, 5)


def test_an_events_frames_are_what_pamqp_marshals_from_its_method_header_and_body() -> None:
    # Bodies split at every content limit: none, one byte short, exact, one over.
    for name, row in EDGE_ROWS.items():
        if isinstance(_pamqp(row, 0), type):  # refused (an unknown kind): test_the_header_*
            continue
        body = amqp_publisher.amqp_body(row)
        for channel in (1, 2047):
            for content_max in (1, 7, len(body) - 1, len(body), len(body) + 1, 131_064):
                for exchange, key in (("ledger.events", "transfer_posted.shard-a"), ("", "é")):
                    method = spec.Basic.Publish(exchange=exchange, routing_key=key)
                    theirs = ChannelFrame.marshall(
                        channel,
                        [
                            method,
                            ContentHeader(
                                properties=amqp_publisher.amqp_properties(row),
                                body_size=len(body),
                            ),
                            *(
                                ContentBody(body[at : at + content_max])
                                for at in range(0, len(body), content_max)
                            ),
                        ],
                    ).payload
                    ours = amqp_publisher.amqp_frames(
                        row, body, frame.marshal(method, channel), channel, content_max
                    )
                    assert b"".join(ours) == theirs, (name, channel, content_max, key)
