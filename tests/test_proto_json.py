"""ledger.api.proto_json renders what json_format.MessageToDict renders (the AMQP
publisher's message bodies), for every field of Event and on real events."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ledger.api import proto_json
from ledger.v1 import ledger_pb2 as pb
from tests.event_support import marked
from tests.support import Service, account, create_accounts, ref, transfer, transfers

# Fractions of a second MessageToDict renders with 0, 3, 6 and 9 digits.
NANOS = (0, 120_000_000, 123_456_000, 123_456_789)


def _filled(message: Message, variant: int, depth: int = 0) -> Message:
    """Every field of message set to a value other than its default (nested ones to a
    depth of 3), varied by variant: negative and large integers, unknown enum numbers."""
    for field in message.DESCRIPTOR.fields:
        value = _value(field, variant)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            if field.message_type.GetOptions().map_entry:
                key_field = field.message_type.fields_by_name["key"]
                value_field = field.message_type.fields_by_name["value"]
                key = "k" if key_field.type == FieldDescriptor.TYPE_STRING else variant + 1
                getattr(message, field.name)[key] = _value(value_field, variant)
                continue
            if depth >= 3:
                continue
            if field.message_type.full_name == "google.protobuf.Timestamp":
                nested: Any = getattr(message, field.name).add() if field.is_repeated else None
                target = nested if nested is not None else getattr(message, field.name)
                target.seconds = 1_700_000_000 + variant
                target.nanos = NANOS[variant % len(NANOS)]
                continue
            for _ in range(2 if field.is_repeated else 1):
                target = (
                    getattr(message, field.name).add()
                    if field.is_repeated
                    else getattr(message, field.name)
                )
                _filled(target, variant, depth + 1)
            continue
        if field.is_repeated:
            getattr(message, field.name).extend([value, value])
        else:
            setattr(message, field.name, value)
    return message


def _value(field: FieldDescriptor, variant: int) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return f"s{variant}-é"
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind == FieldDescriptor.TYPE_BYTES:
        return b"\x00\xffb"
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [v.number for v in field.enum_type.values]
        return [numbers[-1], numbers[1 % len(numbers)], 99][variant % 3]
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return [-7, 2**31 - 1, 3][variant % 3]
    return [-(2**62), 2**62, 17][variant % 3]


@pytest.mark.parametrize("variant", range(4))
def test_every_field_of_an_event_renders_as_message_to_dict_renders_it(variant: int) -> None:
    event = _filled(pb.Event(), variant)
    assert proto_json.to_dict(event) == json_format.MessageToDict(
        event, preserving_proto_field_name=True
    )


def test_an_empty_event_renders_as_an_empty_object() -> None:
    assert proto_json.to_dict(pb.Event()) == {} == json_format.MessageToDict(pb.Event())


async def test_real_events_render_as_message_to_dict_renders_them(service: Service) -> None:
    stub = service.stub
    m = service.merchant_on("shard-a")
    await create_accounts(stub, account(m, "x"), account(m, "y"))
    await transfers(
        stub,
        transfer("pj-1", ref(m, "x"), ref(m, "y"), 5, metadata={"order": "1"}),
        transfer("pj-2", ref(m, "x"), ref(m, "y"), 7, action=pb.TRANSFER_ACTION_PENDING),
    )
    events = await marked(stub, [m], pb.SubscribeEventsRequest(merchant_id=m))
    assert len(events) >= 4
    for event in events:
        assert proto_json.to_dict(event) == json_format.MessageToDict(
            event, preserving_proto_field_name=True
        )
