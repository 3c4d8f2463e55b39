"""A stored event's proto3 JSON, rendered straight from its row: the AMQP publisher's body.

The publisher sent each event as ledger.api.events.event(row, cursor) (a pb.Event
built from the row's JSON body) walked into its proto3 JSON: two copies of every
field through protobuf's Python API, most of the publisher's CPU per event
(docs/performance.md, "Event stream"). This builds the same dict from the row in
one pass, by the proto3 JSON mapping of Event with proto field names:

- keys in field-number order, as MessageToDict (and json.dumps after it) gives them;
- a scalar at its default (0, "", false, an empty list or map) left out, a message
  field present whenever event() sets it (even empty);
- int64 as a decimal string, int32 as a number, enums by name (an unknown number as
  the number), Timestamps as RFC 3339 UTC with 0, 3 or 6 fractional digits and 'Z'
  (PostgreSQL keeps microseconds: Timestamp's 9 digits never arise from a row);
- a value event() would refuse (an integer out of its field's range, or not an
  integer) is refused here too (ValueError), never rendered.

One difference, deliberately: a map with several keys (metadata) keeps the stored
order, where a pb map iterates in an order upb seeds per process (no consumer can
rely on it; JSON object members are unordered anyway).

event() stays the reference, and tests/test_event_json.py checks this against it on
every kind of real event and on the edge cases.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ledger.storage.events import EventRow
from ledger.v1 import ledger_pb2 as pb

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


def _names(enum: str) -> dict[int, str]:
    """An enum's value names by number: how proto3 JSON writes an enum."""
    return {value.number: value.name for value in pb.DESCRIPTOR.enum_types_by_name[enum].values}


_EVENT_KIND = _names("EventKind")
_TRANSFER_RESULT = _names("TransferResult")
_TRANSFER_ACTION = _names("TransferAction")
_DIRECTION = _names("Direction")
_ENTRY_KIND = _names("EntryKind")
_SAGA_KIND = _names("SagaKind")
_SAGA_STATE = _names("SagaState")
_CROSSING_DIRECTION = _names("MonitorCrossingDirection")


def to_dict(row: EventRow) -> dict[str, Any]:
    """What json_format.MessageToDict(event(row, {row.shard: row.position}),
    preserving_proto_field_name=True) gives: the
    event's proto3 JSON with proto field names, its cursor naming only its own shard."""
    body = row.body
    out: dict[str, Any] = {}
    if row.shard:
        out["shard"] = row.shard
    if row.position:
        out["position"] = _int64(row.position)
    if row.event_id:
        out["event_id"] = row.event_id
    if row.kind:
        out["kind"] = _enum(_EVENT_KIND, int(row.kind))
    if row.merchant_id:
        out["merchant_id"] = row.merchant_id
    if row.merchant_ids:
        out["merchant_ids"] = list(row.merchant_ids)
    t = body.get("transfer")
    if t:
        out["transfer"] = _transfer(t)
        if t["amount_effective_minor"]:
            out["amount_effective_minor"] = _int64(t["amount_effective_minor"])
        if t["result"]:
            out["transfer_result"] = _enum(_TRANSFER_RESULT, t["result"])
        postings = t.get("postings")
        if postings:
            out["postings"] = [_posting(p) for p in postings]
    entries = body.get("entries")
    if entries:
        out["entries"] = [_entry(e) for e in entries]
    a = body.get("account")
    if a:
        out["account"] = _account(a)
    s = body.get("saga")
    if s:
        out["saga"] = _saga(s)
    d = body.get("detail")
    if d and "epoch" in d:
        out["move"] = _move(d)
    if row.trace_id:
        out["trace_id"] = row.trace_id
    out["committed_at"] = _timestamp(row.committed_at)
    out["cursor"] = {"positions": {row.shard: _int64(row.position)}}
    if row.transfer_id:
        out["transfer_id"] = row.transfer_id
    c = body.get("crossing")
    if c:
        out["monitor_crossing"] = _crossing(c)
    return out


def _int64(value: Any) -> str:
    # pb.Event refuses what its int64 fields cannot hold; so does this.
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"not an int64: {value!r}")
    return str(value)


def _int32(value: Any) -> int:
    if type(value) is not int or not _INT32_MIN <= value <= _INT32_MAX:
        raise ValueError(f"not an int32: {value!r}")
    return value


def _enum(names: dict[int, str], number: Any) -> str | int:
    if type(number) is not int or not _INT32_MIN <= number <= _INT32_MAX:
        raise ValueError(f"not an enum number: {number!r}")
    return names.get(number, number)


def _timestamp(moment: datetime) -> str:
    """Timestamp.ToJsonString of the moment (aware, as event() requires)."""
    if moment.tzinfo is None:
        raise ValueError(f"a time without its zone: {moment!r}")
    if moment.utcoffset():
        moment = moment.astimezone(UTC)
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    micros = moment.microsecond
    if not micros:
        return text + "Z"
    if micros % 1000 == 0:
        return f"{text}.{micros // 1000:03d}Z"
    return f"{text}.{micros:06d}Z"


def _stored_timestamp(value: Any) -> str | None:
    """A time as the body's JSON holds it (PostgreSQL's text of a timestamptz)."""
    return _timestamp(datetime.fromisoformat(value)) if value else None


def _ref(merchant_id: Any, account_id: Any) -> dict[str, Any] | None:
    if not merchant_id and not account_id:
        return None
    ref = {}
    if merchant_id:
        ref["merchant_id"] = merchant_id
    if account_id:
        ref["account_id"] = account_id
    return ref


def _metadata(metadata: Any) -> dict[str, str] | None:
    return dict(metadata) if metadata else None


def _transfer(t: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if t["transfer_id"]:
        out["id"] = t["transfer_id"]
    if (debit := _ref(t["debit_merchant_id"], t["debit_account_id"])) is not None:
        out["debit_account"] = debit
    if (credit := _ref(t["credit_merchant_id"], t["credit_account_id"])) is not None:
        out["credit_account"] = credit
    if t["amount_minor"]:
        out["amount_minor"] = _int64(t["amount_minor"])
    if t["currency"]:
        out["currency"] = t["currency"]
    if t["action"]:
        out["action"] = _enum(_TRANSFER_ACTION, t["action"])
    if t["pending_id"]:
        out["pending_id"] = t["pending_id"]
    if t["timeout_ms"]:
        out["timeout_ms"] = _int64(t["timeout_ms"])
    if t["linked"]:
        out["linked"] = True
    if t["reversal_of"]:
        out["reversal_of"] = t["reversal_of"]
    if (metadata := _metadata(t["metadata"])) is not None:
        out["metadata"] = metadata
    if (created_at := _stored_timestamp(t["created_at"])) is not None:
        out["created_at"] = created_at
    if t["trace_id"]:
        out["trace_id"] = t["trace_id"]
    return out


def _posting(p: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (account := _ref(p["merchant_id"], p["account_id"])) is not None:
        out["account"] = account
    if p["amount_minor"]:
        out["amount_minor"] = _int64(p["amount_minor"])
    if p["currency"]:
        out["currency"] = p["currency"]
    if p["direction"]:
        out["direction"] = _enum(_DIRECTION, p["direction"])
    return out


def _entry(e: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (account := _ref(e["merchant_id"], e["account_id"])) is not None:
        out["account"] = account
    if e["sequence"]:
        out["sequence"] = _int64(e["sequence"])
    if e["direction"]:
        out["direction"] = _enum(_DIRECTION, e["direction"])
    if e["kind"]:
        out["kind"] = _enum(_ENTRY_KIND, e["kind"])
    if e["amount_minor"]:
        out["amount_minor"] = _int64(e["amount_minor"])
    if e["debits_posted"]:
        out["debits_posted"] = _int64(e["debits_posted"])
    if e["credits_posted"]:
        out["credits_posted"] = _int64(e["credits_posted"])
    if e["debits_pending"]:
        out["debits_pending"] = _int64(e["debits_pending"])
    if e["credits_pending"]:
        out["credits_pending"] = _int64(e["credits_pending"])
    return out


def _account(a: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (ref := _ref(a["merchant_id"], a["account_id"])) is not None:
        out["ref"] = ref
    if a["currency"]:
        out["currency"] = a["currency"]
    if a["debits_must_not_exceed_credits"]:
        out["debits_must_not_exceed_credits"] = True
    if a["credits_must_not_exceed_debits"]:
        out["credits_must_not_exceed_debits"] = True
    if a["closed"]:
        out["closed"] = True
    if (metadata := _metadata(a["metadata"])) is not None:
        out["metadata"] = metadata
    if a["debits_posted"]:
        out["debits_posted"] = _int64(a["debits_posted"])
    if a["credits_posted"]:
        out["credits_posted"] = _int64(a["credits_posted"])
    if a["debits_pending"]:
        out["debits_pending"] = _int64(a["debits_pending"])
    if a["credits_pending"]:
        out["credits_pending"] = _int64(a["credits_pending"])
    if (created_at := _stored_timestamp(a["created_at"])) is not None:
        out["created_at"] = created_at
    return out


def _saga(s: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s["kind"]:
        out["kind"] = _enum(_SAGA_KIND, s["kind"])
    if s["state"]:
        out["state"] = _enum(_SAGA_STATE, s["state"])
    if s["result"]:
        out["result"] = _enum(_TRANSFER_RESULT, s["result"])
    if s["peer_shard"]:
        out["peer_shard"] = s["peer_shard"]
    if (debit := _ref(s["merchant_id"], s["debit_account_id"])) is not None:
        out["debit_account"] = debit
    if (credit := _ref(s["credit_merchant_id"], s["credit_account_id"])) is not None:
        out["credit_account"] = credit
    if s["currency"]:
        out["currency"] = s["currency"]
    if s["amount_minor"]:
        out["amount_minor"] = _int64(s["amount_minor"])
    if s["pending_minor"]:
        out["pending_minor"] = _int64(s["pending_minor"])
    if s["pending_id"]:
        out["pending_id"] = s["pending_id"]
    if s["attempts"]:
        out["attempts"] = _int32(s["attempts"])
    if s["last_error"]:
        out["last_error"] = s["last_error"]
    return out


def _move(d: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if d["merchant_id"]:
        out["merchant_id"] = d["merchant_id"]
    if d["epoch"]:
        out["epoch"] = _int64(d["epoch"])
    if d["from_shard"]:
        out["from_shard"] = d["from_shard"]
    if d["to_shard"]:
        out["to_shard"] = d["to_shard"]
    return out


def _crossing(c: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if c["monitor_id"]:
        out["monitor_id"] = c["monitor_id"]
    if (account := _ref(c["merchant_id"], c["account_id"])) is not None:
        out["account"] = account
    if c["direction"]:
        out["direction"] = _enum(_CROSSING_DIRECTION, c["direction"])
    balance_after_minor = int(c["balance_after_minor"])  # a numeric column, as event() reads it
    if balance_after_minor:
        out["balance_after_minor"] = _int64(balance_after_minor)
    if c["threshold_minor"]:
        out["threshold_minor"] = _int64(c["threshold_minor"])
    transfer: dict[str, Any] = {}  # set even when empty, as event() sets it
    if c["transfer_merchant_id"]:
        transfer["merchant_id"] = c["transfer_merchant_id"]
    if c["transfer_id"]:
        transfer["transfer_id"] = c["transfer_id"]
    out["transfer"] = transfer
    if (crossed_at := _stored_timestamp(c["crossed_at"])) is not None:
        out["crossed_at"] = crossed_at
    return out
