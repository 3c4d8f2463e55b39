"""The proto3 JSON mapping of a message, as json_format.MessageToDict gives it, faster.

json_format walks every field of every message in Python, set or not, and cost
the AMQP publisher about 50 us per event (ledger events publish sends each event
as JSON; docs/performance.md, "Event stream"). This walks only the fields set
(ListFields, in C) with a converter chosen once per field, for the field kinds
the event stream's messages use: scalars, enums, strings, bytes, nested
messages, repeated fields, maps and google.protobuf.Timestamp. It gives what
MessageToDict(message, preserving_proto_field_name=True) gives for those, which
tests/test_proto_json.py checks on every kind of event; a message with a field
of another kind (Any, Struct, wrappers, Duration, a float) is refused up front
(ValueError), never rendered differently.

The publisher no longer uses it: it renders each body straight from the stored
row (ledger/api/event_json.py), whose tests take this, walking event()'s
message, as the reference.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

Converter = Callable[[Any], Any]

_TIMESTAMP = "google.protobuf.Timestamp"
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_PLAIN_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_STRING,
    }
)

# Per message type: field -> (JSON name, converter of the field's whole value).
_fields: dict[str, dict[int, tuple[str, Converter]]] = {}


def to_dict(message: Message) -> dict[str, Any]:
    """MessageToDict(message, preserving_proto_field_name=True), for the kinds of
    fields above."""
    fields = _fields.get(message.DESCRIPTOR.full_name)
    if fields is None:
        fields = _compile(message.DESCRIPTOR)
    converted = {}
    for field, value in message.ListFields():
        name, convert = fields[field.number]
        converted[name] = convert(value)
    return converted


def _compile(descriptor: Any) -> dict[int, tuple[str, Converter]]:
    fields: dict[int, tuple[str, Converter]] = {}
    _fields[descriptor.full_name] = fields  # before the fields: a message may nest itself
    for field in descriptor.fields:
        fields[field.number] = (field.name, _converter(field))
    return fields


def _is_map(field: FieldDescriptor) -> bool:
    message_type = field.message_type
    return bool(message_type is not None and message_type.GetOptions().map_entry)


def _converter(field: FieldDescriptor) -> Converter:
    if _is_map(field):
        assert field.message_type is not None
        value = _single(field.message_type.fields_by_name["value"])
        return lambda mapping: {str(k): value(v) for k, v in mapping.items()}
    single = _single(field)
    if field.is_repeated:
        return lambda values: [single(v) for v in values]
    return single


def _identity(value: Any) -> Any:
    return value


def _single(field: FieldDescriptor) -> Converter:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        type_name = field.message_type.full_name
        if type_name == _TIMESTAMP:
            return _timestamp
        if type_name.startswith("google.protobuf."):
            raise ValueError(f"{field.full_name}: {type_name} not supported")
        return to_dict
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        names = {v.number: v.name for v in field.enum_type.values}
        return lambda number: names.get(number, number)
    if kind in _INT64_TYPES:
        return str
    if kind == FieldDescriptor.TYPE_BYTES:
        return lambda data: base64.b64encode(data).decode("ascii")
    if kind in _PLAIN_TYPES:
        return _identity
    raise ValueError(f"{field.full_name}: field type {kind} not supported")


def _timestamp(value: Any) -> str:
    return str(value.ToJsonString())
