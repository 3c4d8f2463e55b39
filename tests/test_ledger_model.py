"""Model-based test of the ledger's semantics through the live service.

Seeded random steps go over a real gRPC channel to a real service, with merchants
on one shard, and (the second test) on two, where transfers between them run as
sagas and chains across them refuse the call:

- batches of CreateTransfers (POST, PENDING with and without a timeout, full and
  partial POST_PENDING, VOID_PENDING, linked chains that hold, fail or are left
  open, reversals, overdrafts of flagged accounts, the same account on both
  sides, unknown accounts, currency mismatches, balances near 2^63-1), resends of
  earlier transfers (the same, changed, and under a journal's id) and of whole
  batches;
- PostJournal: 2 or more postings among the accounts of merchants on the home
  merchant's shard, balanced per currency, and ones that break a rule (not
  balanced, too few postings, an account on another shard, unknown, closed or of
  another currency, a limit flag or velocity rule exceeded, a balance past
  2^63-1); resends (the same, changed) and journals under a transfer's id;
- SetAccountLimits: overdraft flags and velocity rules changed at run time (rules
  of windows longer than any run, so the model is exact), invalid changes, flags
  the balances already break, resends of a change_id (the same, other content);
- closing and reopening accounts.

A plain model written from the contract (protos/ledger/v1/ledger.proto,
README.md, docs/) predicts every answer (result codes, refused_by_rule, statuses
with their details, replayed), every account's balances and entries. After each
step the service's answers, balances and stored transfers (result, hold state,
accounts) must be the model's, holds left to time out must be released, an
account's limits in force and their history (GetAccountLimits) must be the
model's and its original CreateAccounts item must compare with the flags in
force. After a share of steps (and at the end, for every account) the entries of
the accounts touched (ListEntries, both orders, small pages) must be the model's:
kinds, amounts, transfer, balances after each, sequences 1..n, the README's hash
chain; and GetBalance as_of an instant between two earlier steps must be the
model's balances after the earlier one (Run.check_as_of: how instants are chosen).
At the end every currency's debits must equal its credits.

Where the contract names no order of checks the model follows the service's
(marked in Model._refusal, Model._settle, Model._journal, Model._velocity_refusal;
the proto's order of codes would differ), and a failed transfer counts as none
for a pending_id or reversal_of. Other choices the contract leaves open, taken
from the service: a transfer under a journal's id (and the reverse) names "kind"
as the differing field; a replayed journal refusal names no rule_id.

Found by this model and fixed, each with a test of its own: a batch's
cross-shard items ran beside its other items instead of in order; a reversal
across shards was posted as a plain transfer; a linked chain across shards left
open at the batch's end was not refused (tests/test_routing.py); a batch was not
applied in order around a settle naming no credit account (a later item on its
hold's credit account ran first); an item resending a recorded id with a credit
account on another shard (it makes nothing) was taken for a saga making that
hold, so a chain on one shard settling the id refused the call
(tests/test_model_findings.py); a huge transfer across shards filled a hidden
settlement stripe, and later sagas of any merchant booked on it were refused
with OVERFLOW (tests/test_settlement_capacity.py). Fills (2^63-1 between two
shards, on FILL_ACCOUNTS) now come now and then, and a share of later
transfers takes an id on a stripe a fill went through.

Short in the suite (a few seeds); long on demand, for example:
    LEDGER_LEDGER_MODEL_SEEDS=1-40 LEDGER_LEDGER_MODEL_STEPS=120 \
        python3 -m pytest tests/test_ledger_model.py
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from ledger.domain.sagas import settlement_stripe
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    error_reason,
    field_violations,
    ref,
    status_details,
    transfer,
    wait_until,
)


def _seeds() -> list[int]:
    spec = os.environ.get("LEDGER_LEDGER_MODEL_SEEDS", "1-3")
    low, _, high = spec.partition("-")
    return list(range(int(low), int(high or low) + 1))


# Steps per run (a batch of transfers, a resent batch, a journal, a limits change, or a
# close/reopen).
STEPS = int(os.environ.get("LEDGER_LEDGER_MODEL_STEPS", "30"))
MERCHANTS = 3
UNKNOWN_MERCHANTS = 2
BATCH_ITEMS_MAX = 8
# Draws of a linked chain's member until one lives on the chain's shard.
CHAIN_DRAWS_MAX = 30
AMOUNT_MINOR_MAX = 600
FUNDING_MINOR_MAX = 3_000
BALANCE_MAX = 2**63 - 1
# A hold that is left to expire: due at once, released by the sweeper within a second.
SHORT_TIMEOUT_MS = 5
# A hold with a timeout that never comes due during a run.
LONG_TIMEOUT_MS = 3_600_000
RESEND_BATCH_SHARE = 0.08
CLOSE_SHARE = 0.1
# A share of batches sent twice at once (the copies may share a group commit).
CONCURRENT_COPIES_SHARE = 0.1
# A share of chains (with merchants on two shards) whose members may live anywhere.
SPANNING_CHAIN_SHARE = 0.15
# Shares of steps that post a journal, and that change an account's limits.
JOURNAL_SHARE = 0.12
LIMITS_SHARE = 0.06
# Of journal steps: resends of an earlier journal, and journals under a transfer's id.
JOURNAL_RESEND_SHARE = 0.2
JOURNAL_COLLIDE_SHARE = 0.06
# A journal's postings per currency and side (debits, credits): 1 to this many.
JOURNAL_LEGS_MAX = 2
# Of limit changes: resends of an earlier change (the same, or other content).
LIMITS_RESEND_SHARE = 0.25
# Velocity windows, each longer than any run, so that nothing moved in a run ages out
# of one and no bucket before the first movement is counted: the model is exact.
VELOCITY_WINDOWS_S = (3_600, 86_400, 2_678_400)
# Velocity rules per limits change (the contract allows up to 8).
VELOCITY_RULES_MAX = 3
# A share of steps after which the entries of the accounts it touched are listed and
# checked (and GetBalance as_of an earlier step of each); at the end, every account's.
ENTRIES_CHECK_SHARE = 0.2
# ListEntries page sizes: small ones page often; one order of each listing uses one.
ENTRIES_PAGE_SMALL_MAX = 4
ENTRIES_PAGE_LARGE = 50
# GetBalance as_of checks per account at the end of a run.
AS_OF_CHECKS_AT_END = 2
MICROS_PER_S = 1_000_000

OK = pb.TRANSFER_RESULT_OK
POST = pb.TRANSFER_ACTION_POST
PENDING = pb.TRANSFER_ACTION_PENDING
POST_PENDING = pb.TRANSFER_ACTION_POST_PENDING
VOID_PENDING = pb.TRANSFER_ACTION_VOID_PENDING
DEBIT = pb.DIRECTION_DEBIT
CREDIT = pb.DIRECTION_CREDIT
POSTED = pb.ENTRY_KIND_POSTED
HELD = pb.ENTRY_KIND_PENDING
RELEASED = pb.ENTRY_KIND_PENDING_RELEASED
AMOUNT = pb.VELOCITY_METRIC_AMOUNT
COUNT = pb.VELOCITY_METRIC_COUNT

# Every merchant's accounts: currency and limit flag ("debits" for
# debits_must_not_exceed_credits, "credits" for credits_must_not_exceed_debits).
ACCOUNTS: dict[str, tuple[str, str]] = {
    "cash": ("USD", ""),
    "sales": ("USD", ""),
    "wallet": ("USD", "debits"),
    "escrow": ("USD", "credits"),
    "eur": ("EUR", ""),
    "eur2": ("EUR", "debits"),
}
# Two accounts of the first merchant only, for balances near 2^63-1.
BIG_ACCOUNTS = ("big1", "big2")
# Every merchant's accounts that fill hidden settlement stripes: one transfer of
# 2^63-1 from one's "fill_out" to another shard's "fill_in" fills its stripe there.
FILL_ACCOUNTS = ("fill_out", "fill_in")
# Accounts random operations leave alone.
SET_ASIDE = (*BIG_ACCOUNTS, *FILL_ACCOUNTS)
# A share of transfers takes an id on a stripe a fill was sent through, and the ids
# drawn for one at most.
FILLED_STRIPE_SHARE = 0.3
FILLED_STRIPE_DRAWS_MAX = 10_000
# An account id no merchant has.
GHOST = "ghost"

# The fields a resend compares, in the proto's order (differing_field names the first).
COMPARED_FIELDS = (
    "debit_account",
    "credit_account",
    "amount_minor",
    "currency",
    "action",
    "pending_id",
    "timeout_ms",
    "linked",
    "reversal_of",
    "metadata",
)

Key = tuple[str, str]


@dataclass
class Balances:
    currency: str
    debits_limited: bool
    credits_limited: bool
    closed: bool = False
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    # The velocity rules in force, in their order (SetAccountLimits).
    rules: tuple[pb.VelocityRule, ...] = ()
    # What velocity counts per direction since the account was created, (amount, count):
    # every rule's window is longer than a run, so this is what each window holds.
    debits_moved: tuple[int, int] = (0, 0)
    credits_moved: tuple[int, int] = (0, 0)

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.debits_posted, self.credits_posted, self.debits_pending, self.credits_pending)

    def moved(self, direction: int) -> tuple[int, int]:
        return self.debits_moved if direction == DEBIT else self.credits_moved

    def limits(self) -> pb.AccountLimits:
        return pb.AccountLimits(
            debits_must_not_exceed_credits=self.debits_limited,
            credits_must_not_exceed_debits=self.credits_limited,
            velocity_rules=self.rules,
        )


@dataclass(frozen=True)
class ModelEntry:
    """One entry the model expects on an account (pb.Entry's fields), and its step."""

    # (transfer_merchant_id, transfer_id): the transfer or journal that made it.
    transfer: Key
    direction: int
    kind: int
    amount_minor: int
    # The account's balances after it (debits posted, credits posted, debits pending,
    # credits pending).
    after: tuple[int, int, int, int]
    step: int
    # An expiry's release: the sweeper books it when the hold comes due, which may fall
    # between the waves of its batch, so its place among its step's entries is not fixed.
    floating: bool = False

    def fields(self) -> tuple[Key, int, int, int]:
        return (self.transfer, self.direction, self.kind, self.amount_minor)


@dataclass(frozen=True)
class JournalRecord:
    """A journal as recorded under its (merchant, id): OK, or its refusal (a journal
    refused by a rule is recorded, like a failed transfer: its id stays failed)."""

    request: pb.PostJournalRequest
    result: int
    failed_index: int = -1
    rule: str = ""


@dataclass(frozen=True)
class Record:
    """A transfer as recorded under its (debit merchant, id), with its outcome."""

    request: pb.Transfer
    result: int
    # The accounts and currency it moved (a settle's: its pending transfer's).
    debit: Key
    credit: Key
    currency: str
    # For PENDING: the amount reserved; for every transfer: what it posted.
    amount_minor: int
    posted_minor: int


@dataclass
class Expected:
    result: int
    replayed: bool
    differing_field: str = ""
    # For EXCEEDS_VELOCITY_LIMIT applied in the call on one shard: the rule's id.
    rule: str = ""


@dataclass(frozen=True)
class JournalOutcome:
    """What PostJournal answers: OK (code None), or a status with its details."""

    code: grpc.StatusCode | None
    # ErrorInfo reason (a TransferResult name without its prefix), or "".
    reason: str = ""
    replayed: bool = False
    # ALREADY_EXISTS: ErrorInfo metadata "field"; INVALID_ARGUMENT: the fields violated.
    field: str = ""
    # FAILED_PRECONDITION: the PreconditionFailure subjects ("postings[i]").
    subjects: tuple[str, ...] = ()
    # EXCEEDS_VELOCITY_LIMIT: ErrorInfo metadata "rule_id".
    rule: str = ""


@dataclass
class State:
    accounts: dict[Key, Balances] = field(default_factory=dict)
    records: dict[Key, Record] = field(default_factory=dict)
    # Per OK PENDING transfer: "pending", "posted", "voided" or "expired".
    pending_state: dict[Key, str] = field(default_factory=dict)
    # Per reversal target: the amount reversed so far.
    reversed_minor: dict[Key, int] = field(default_factory=dict)
    # Every account's entries, oldest first.
    entries: dict[Key, list[ModelEntry]] = field(default_factory=dict)
    # Journals by (merchant, id): one id namespace with the transfers per merchant.
    journals: dict[Key, JournalRecord] = field(default_factory=dict)

    def copy(self) -> State:
        return State(
            accounts={k: replace(v) for k, v in self.accounts.items()},
            records=dict(self.records),
            pending_state=dict(self.pending_state),
            reversed_minor=dict(self.reversed_minor),
            entries={k: list(v) for k, v in self.entries.items()},
            journals=dict(self.journals),
        )


def _key(r: pb.AccountRef) -> Key:
    return (r.merchant_id, r.account_id)


def _differing_field(stored: pb.Transfer, resent: pb.Transfer) -> str:
    for name in COMPARED_FIELDS:
        if getattr(stored, name) != getattr(resent, name):
            return name
    return ""


class Model:
    """The contract's rules for a batch of transfers, applied to plain dicts."""

    def __init__(self, shard_of: dict[str, str]) -> None:
        self.state = State()
        self.shard_of = shard_of
        # The step being applied (entries are tagged with it).
        self.step_no = 0
        # A saga the credit side refused: its reservation was made and released.
        self.compensated: pb.Transfer | None = None

    def add_account(self, key: Key, currency: str, limit: str) -> None:
        self.state.accounts[key] = Balances(
            currency, debits_limited=limit == "debits", credits_limited=limit == "credits"
        )

    def item_shards(self, t: pb.Transfer) -> set[str]:
        """The shards an item touches (a settle: its hold's shards too)."""
        merchants = {t.debit_account.merchant_id, t.credit_account.merchant_id}
        hold = self.state.records.get((t.debit_account.merchant_id, t.pending_id))
        if t.pending_id and hold is not None:
            merchants |= {hold.debit[0], hold.credit[0]}
        return {self.shard_of[m] for m in merchants if m}

    def chain_spans_shards(self, items: Sequence[pb.Transfer]) -> bool:
        """A linked chain (closed or left open) that spans shards or holds a saga
        refuses the whole call (FAILED_PRECONDITION, LINKED_CHAIN_SPANS_SHARDS)."""
        start = 0
        while start < len(items):
            end = start
            while end < len(items) - 1 and items[end].linked:
                end += 1
            chain = items[start : end + 1]
            if any(t.linked for t in chain):
                if len(set().union(*(self.item_shards(t) for t in chain))) > 1:
                    return True
            start = end + 1
        return False

    def apply_batch(self, items: Sequence[pb.Transfer]) -> list[Expected]:
        """Every item's expected answer; the state as the batch leaves it."""
        out: list[Expected] = []
        start = 0
        while start < len(items):
            end = start
            while end < len(items) and items[end].linked:
                end += 1
            if end == len(items):
                # A chain left open: refused whole, none of its members is tried.
                for k in range(start, len(items)):
                    code = (
                        pb.TRANSFER_RESULT_LINKED_EVENT_CHAIN_OPEN
                        if k == len(items) - 1
                        else pb.TRANSFER_RESULT_LINKED_EVENT_FAILED
                    )
                    out.append(self._replay(items[k]) or self._fail(items[k], code))
                break
            out += self._chain(items[start : end + 1])
            start = end + 1
        return out

    def _chain(self, chain: Sequence[pb.Transfer]) -> list[Expected]:
        """A run of linked transfers (or one alone): all succeed, or none moves money,
        the failing member gets its own code and the others LINKED_EVENT_FAILED."""
        before = self.state.copy()
        self.compensated = None
        tried: list[Expected] = []
        for t in chain:
            replay = self._replay(t)
            tried.append(replay or self._apply(t))
            if tried[-1].result != OK:
                break
        if tried[-1].result == OK:
            return tried
        self.state = before
        if self.compensated is not None:
            # A saga (never in a chain) that the credit side refused.
            self._compensate(self.compensated)
        out = []
        for k, t in enumerate(chain):
            if k == len(tried) - 1:
                failure = tried[-1]
                if not failure.replayed and not failure.differing_field:
                    self._record_failure(t, failure.result)
                out.append(failure)
            else:
                out.append(self._replay(t) or self._fail(t, pb.TRANSFER_RESULT_LINKED_EVENT_FAILED))
        return out

    def _replay(self, t: pb.Transfer) -> Expected | None:
        """A resent id answers its stored outcome, or refuses other content (a
        journal's id: the kind differs; the contract names no field for it, and
        "kind" is the service's name)."""
        key = (t.debit_account.merchant_id, t.id)
        if key in self.state.journals:
            return Expected(pb.TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FIELDS, False, "kind")
        stored = self.state.records.get(key)
        if stored is None:
            return None
        differing = _differing_field(stored.request, t)
        if differing:
            return Expected(pb.TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FIELDS, False, differing)
        return Expected(stored.result, True)

    def _fail(self, t: pb.Transfer, code: int) -> Expected:
        self._record_failure(t, code)
        return Expected(code, False)

    def expire(self, key: Key) -> None:
        """A hold's timeout released it: entries under the hold's own id."""
        record = self.state.records[key]
        assert self.state.pending_state[key] == "pending"
        self.state.pending_state[key] = "expired"
        self._book(record.debit, key, DEBIT, RELEASED, record.amount_minor, floating=True)
        self._book(record.credit, key, CREDIT, RELEASED, record.amount_minor, floating=True)

    def _record_failure(self, t: pb.Transfer, code: int) -> None:
        self.state.records[(t.debit_account.merchant_id, t.id)] = Record(
            request=t,
            result=code,
            debit=_key(t.debit_account),
            credit=_key(t.credit_account),
            currency=t.currency,
            amount_minor=t.amount_minor,
            posted_minor=0,
        )

    def _book(
        self,
        key: Key,
        transfer: Key,
        direction: int,
        kind: int,
        amount: int,
        *,
        floating: bool = False,
    ) -> None:
        """One entry: the account's balance it changes, and the entry with the balances
        after it."""
        b = self.state.accounts[key]
        side = "debits" if direction == DEBIT else "credits"
        balance = f"{side}_{'posted' if kind == POSTED else 'pending'}"
        setattr(b, balance, getattr(b, balance) + (-amount if kind == RELEASED else amount))
        self.state.entries.setdefault(key, []).append(
            ModelEntry(transfer, direction, kind, amount, b.as_tuple(), self.step_no, floating)
        )

    def _count(self, key: Key, direction: int, amount: int) -> None:
        """One movement for velocity (a hold at creation, a post, a journal posting)."""
        b = self.state.accounts[key]
        moved_minor, moved_count = b.moved(direction)
        if direction == DEBIT:
            b.debits_moved = (moved_minor + amount, moved_count + 1)
        else:
            b.credits_moved = (moved_minor + amount, moved_count + 1)

    def _velocity_refusal(self, key: Key, direction: int, amount: int) -> str:
        """The rule of the account that one more movement would break, or "". Of several,
        the first in the rules' order: the contract names only "the rule" (the
        service's order)."""
        b = self.state.accounts[key]
        moved_minor, moved_count = b.moved(direction)
        for rule in b.rules:
            if rule.direction != direction:
                continue
            used = moved_minor + amount if rule.metric == AMOUNT else moved_count + 1
            if used > rule.limit:
                return rule.rule_id
        return ""

    def _apply(self, t: pb.Transfer) -> Expected:
        if t.action in (POST_PENDING, VOID_PENDING):
            return Expected(self._settle(t), False)
        return self._new(t)

    def _record_ok(self, t: pb.Transfer, debit: Key, credit: Key) -> None:
        x = t.amount_minor
        self.state.records[(debit[0], t.id)] = Record(
            request=t,
            result=OK,
            debit=debit,
            credit=credit,
            currency=t.currency,
            amount_minor=x,
            posted_minor=x if t.action == POST else 0,
        )

    def _new(self, t: pb.Transfer) -> Expected:
        """POST or PENDING."""
        debit, credit = _key(t.debit_account), _key(t.credit_account)
        # The same account twice is refused before it is looked up.
        if debit == credit:
            return Expected(pb.TRANSFER_RESULT_ACCOUNTS_MUST_BE_DIFFERENT, False)
        if self.shard_of[debit[0]] != self.shard_of[credit[0]]:
            return self._saga(t, debit, credit)
        refusal = self._refusal(t, debit, credit)
        if refusal:
            return Expected(refusal, False)
        x = t.amount_minor
        # Velocity after the limits, the debit account's rules first (the service's order).
        rule = self._velocity_refusal(debit, DEBIT, x) or self._velocity_refusal(credit, CREDIT, x)
        if rule:
            return Expected(pb.TRANSFER_RESULT_EXCEEDS_VELOCITY_LIMIT, False, rule=rule)
        kind = POSTED if t.action == POST else HELD
        self._book(debit, (debit[0], t.id), DEBIT, kind, x)
        self._book(credit, (debit[0], t.id), CREDIT, kind, x)
        self._count(debit, DEBIT, x)
        self._count(credit, CREDIT, x)
        if t.action == PENDING:
            self.state.pending_state[(debit[0], t.id)] = "pending"
        self._reversed(t, credit)
        self._record_ok(t, debit, credit)
        return Expected(OK, False)

    def _reversed(self, t: pb.Transfer, credit: Key) -> None:
        if t.reversal_of:
            target_key = (credit[0], t.reversal_of)
            reversed_minor = self.state.reversed_minor.get(target_key, 0)
            self.state.reversed_minor[target_key] = reversed_minor + t.amount_minor

    def _saga(self, t: pb.Transfer, debit: Key, credit: Key) -> Expected:
        """A POST or PENDING between shards (docs/sagas.md): step 1 reserves on the debit
        side (its refusal is final, nothing written), step 2 credits (or holds on) the
        credit side, step 3 posts the reservation (or, when step 2 refused: releases
        it, and the transfer's result is step 2's refusal)."""
        # Step 1 decides on the debit side alone, step 2 on the credit side, so any
        # refusal of the debit side comes before any of the credit side. A reversal
        # is checked on each side after the account's checks, before its limits (the
        # local order; docs/sagas.md, "Reversals across shards"): step 1 by what the
        # original posted to the debit account, step 2 by the original's record.
        refusal = self._side_refusal(t, debit, debit=True, limits=False)
        if not refusal and t.reversal_of:
            refusal = self._reversal_room_refusal(t, debit, credit)
        refusal = refusal or self._side_refusal(t, debit, debit=True)
        if refusal:
            return Expected(refusal, False)
        refusal = self._side_refusal(t, credit, debit=False, limits=False)
        if not refusal and t.reversal_of:
            refusal = self._reversal_refusal(t, debit, credit, amount=False)
        refusal = refusal or self._side_refusal(t, credit, debit=False)
        if refusal:
            self.compensated = t
            return Expected(refusal, False)
        x = t.amount_minor
        transfer = (debit[0], t.id)
        self._book(debit, transfer, DEBIT, HELD, x)
        self._count(debit, DEBIT, x)
        if t.action == POST:
            self._book(credit, transfer, CREDIT, POSTED, x)
            self._book(debit, transfer, DEBIT, RELEASED, x)
            self._book(debit, transfer, DEBIT, POSTED, x)
        else:
            self._book(credit, transfer, CREDIT, HELD, x)
            self.state.pending_state[transfer] = "pending"
        self._count(credit, CREDIT, x)
        self._reversed(t, credit)
        self._record_ok(t, debit, credit)
        return Expected(OK, False)

    def _compensate(self, t: pb.Transfer) -> None:
        """Step 1 reserved (and velocity counted it: a release gives nothing back),
        step 3 released."""
        debit = _key(t.debit_account)
        self._book(debit, (debit[0], t.id), DEBIT, HELD, t.amount_minor)
        self._book(debit, (debit[0], t.id), DEBIT, RELEASED, t.amount_minor)
        self._count(debit, DEBIT, t.amount_minor)

    def _refusal(self, t: pb.Transfer, debit: Key, credit: Key) -> int:
        """Why a POST or PENDING on one shard is refused (0: it is not), velocity aside.

        The contract names no order of checks; this is the service's (the proto's
        order of codes differs: see the comments)."""
        d, c = self.state.accounts.get(debit), self.state.accounts.get(credit)
        if d is None:
            return pb.TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND
        if c is None:
            return pb.TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND
        if t.currency != d.currency or t.currency != c.currency:
            return pb.TRANSFER_RESULT_CURRENCY_MISMATCH
        if d.closed:
            return pb.TRANSFER_RESULT_DEBIT_ACCOUNT_CLOSED
        if c.closed:
            return pb.TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED
        # Whether it is a valid reversal is decided before the limits.
        refusal = self._reversal_refusal(t, debit, credit)
        if refusal:
            return refusal
        x = t.amount_minor
        # Overflow before the limits.
        if (
            d.debits_posted + d.debits_pending + x > BALANCE_MAX
            or c.credits_posted + c.credits_pending + x > BALANCE_MAX
        ):
            return pb.TRANSFER_RESULT_OVERFLOW
        if d.debits_limited and d.debits_posted + d.debits_pending + x > d.credits_posted:
            return pb.TRANSFER_RESULT_EXCEEDS_CREDITS
        if c.credits_limited and c.credits_posted + c.credits_pending + x > c.debits_posted:
            return pb.TRANSFER_RESULT_EXCEEDS_DEBITS
        return 0

    def _side_refusal(self, t: pb.Transfer, key: Key, *, debit: bool, limits: bool = True) -> int:
        """One side's checks, in the local order (without limits: the account's alone;
        with them: its velocity rules last, as on one shard)."""
        b = self.state.accounts.get(key)
        if b is None:
            return (
                pb.TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND
                if debit
                else pb.TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND
            )
        if t.currency != b.currency:
            return pb.TRANSFER_RESULT_CURRENCY_MISMATCH
        if b.closed:
            return (
                pb.TRANSFER_RESULT_DEBIT_ACCOUNT_CLOSED
                if debit
                else pb.TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED
            )
        if not limits:
            return 0
        x = t.amount_minor
        if debit:
            if b.debits_posted + b.debits_pending + x > BALANCE_MAX:
                return pb.TRANSFER_RESULT_OVERFLOW
            if b.debits_limited and b.debits_posted + b.debits_pending + x > b.credits_posted:
                return pb.TRANSFER_RESULT_EXCEEDS_CREDITS
        else:
            if b.credits_posted + b.credits_pending + x > BALANCE_MAX:
                return pb.TRANSFER_RESULT_OVERFLOW
            if b.credits_limited and b.credits_posted + b.credits_pending + x > b.debits_posted:
                return pb.TRANSFER_RESULT_EXCEEDS_DEBITS
        if self._velocity_refusal(key, DEBIT if debit else CREDIT, x):
            return pb.TRANSFER_RESULT_EXCEEDS_VELOCITY_LIMIT
        return 0

    def _reversal_room_refusal(self, t: pb.Transfer, debit: Key, credit: Key) -> int:
        """Step 1 of a reversal between shards, where the original's record is not: what
        the original posted to the reversal's debit account bounds its reversals."""
        target_key = (credit[0], t.reversal_of)
        credited = sum(
            e.amount_minor
            for e in self.state.entries.get(debit, [])
            if e.transfer == target_key and e.direction == CREDIT and e.kind == POSTED
        )
        if credited == 0:
            return pb.TRANSFER_RESULT_REVERSAL_TARGET_NOT_FOUND
        if self.state.reversed_minor.get(target_key, 0) + t.amount_minor > credited:
            return pb.TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL
        return 0

    def _reversal_refusal(
        self, t: pb.Transfer, debit: Key, credit: Key, *, amount: bool = True
    ) -> int:
        """A reversal on one shard (amount: the sum checked here too), or step 2 of one
        between shards, where the original's record is (amount checked by step 1)."""
        if not t.reversal_of:
            return 0
        # The original belongs to the reversal's credit merchant.
        target_key = (credit[0], t.reversal_of)
        target = self.state.records.get(target_key)
        # A failed transfer counts as none (as a failed hold does for a settle), though
        # the proto's REVERSAL_ACCOUNTS_MISMATCH covers "the target moved no posted money".
        if target is None or target.result != OK:
            return pb.TRANSFER_RESULT_REVERSAL_TARGET_NOT_FOUND
        if target.posted_minor == 0 or (target.debit, target.credit) != (credit, debit):
            return pb.TRANSFER_RESULT_REVERSAL_ACCOUNTS_MISMATCH
        if amount and (
            self.state.reversed_minor.get(target_key, 0) + t.amount_minor > target.posted_minor
        ):
            return pb.TRANSFER_RESULT_REVERSAL_EXCEEDS_ORIGINAL
        return 0

    def _settle(self, t: pb.Transfer) -> int:
        """POST_PENDING or VOID_PENDING of pending_id (the same debit merchant's): the
        whole hold is released and the posted part posted, on both accounts (across
        shards too: the debit side first, then the credit side). Velocity counted the
        hold at creation and does not count its post."""
        debit = _key(t.debit_account)
        pending_key = (debit[0], t.pending_id)
        pending = self.state.records.get(pending_key)
        if pending is None or pending.result != OK:
            return pb.TRANSFER_RESULT_PENDING_TRANSFER_NOT_FOUND
        if pending.request.action != PENDING:
            return pb.TRANSFER_RESULT_PENDING_TRANSFER_NOT_PENDING
        # Other accounts or currency are refused before the hold's state is looked at
        # (the proto's order of codes would look at the state first).
        if (
            debit != pending.debit
            or (t.HasField("credit_account") and _key(t.credit_account) != pending.credit)
            or (t.currency and t.currency != pending.currency)
        ):
            return pb.TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_ACCOUNTS
        state = self.state.pending_state[pending_key]
        if state == "posted":
            return pb.TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_POSTED
        if state == "voided":
            return pb.TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_VOIDED
        if state == "expired":
            return pb.TRANSFER_RESULT_PENDING_TRANSFER_EXPIRED
        held = pending.amount_minor
        if t.action == POST_PENDING and t.amount_minor > held:
            return pb.TRANSFER_RESULT_EXCEEDS_PENDING_AMOUNT
        if t.action == VOID_PENDING and t.amount_minor not in (0, held):
            return pb.TRANSFER_RESULT_EXCEEDS_PENDING_AMOUNT
        posted = (t.amount_minor or held) if t.action == POST_PENDING else 0
        d = self.state.accounts[pending.debit]
        c = self.state.accounts[pending.credit]
        if d.debits_posted + posted > BALANCE_MAX or c.credits_posted + posted > BALANCE_MAX:
            return pb.TRANSFER_RESULT_OVERFLOW
        transfer = (debit[0], t.id)
        self._book(pending.debit, transfer, DEBIT, RELEASED, held)
        self._book(pending.credit, transfer, CREDIT, RELEASED, held)
        if posted:
            self._book(pending.debit, transfer, DEBIT, POSTED, posted)
            self._book(pending.credit, transfer, CREDIT, POSTED, posted)
        self.state.pending_state[pending_key] = "posted" if t.action == POST_PENDING else "voided"
        self.state.records[transfer] = Record(
            request=t,
            result=OK,
            debit=pending.debit,
            credit=pending.credit,
            currency=pending.currency,
            amount_minor=t.amount_minor,
            posted_minor=posted,
        )
        return OK

    # ---- journals -----------------------------------------------------------

    def post_journal(self, request: pb.PostJournalRequest) -> JournalOutcome:
        """PostJournal's answer; the state as it leaves it."""
        postings = request.postings
        # Malformed (fewer than 2 postings, or not balanced per currency): refused
        # before anything else, nothing written.
        totals: Counter[str] = Counter()
        for p in postings:
            totals[p.currency] += p.amount_minor if p.direction == DEBIT else -p.amount_minor
        if len(postings) < 2 or any(totals.values()):
            return JournalOutcome(grpc.StatusCode.INVALID_ARGUMENT, field="postings")
        # Every posting must live on the home merchant's shard; refused whole, nothing
        # written (the contract does not say which postings are named: the service
        # names every one elsewhere).
        home = request.merchant_id
        away = tuple(
            f"postings[{i}]"
            for i, p in enumerate(postings)
            if self.shard_of[p.account.merchant_id] != self.shard_of[home]
        )
        if away:
            return JournalOutcome(
                grpc.StatusCode.FAILED_PRECONDITION, "JOURNAL_SPANS_SHARDS", subjects=away
            )
        key = (home, request.journal_id)
        if key in self.state.records:
            return JournalOutcome(
                grpc.StatusCode.ALREADY_EXISTS, "EXISTS_WITH_DIFFERENT_FIELDS", field="kind"
            )
        stored = self.state.journals.get(key)
        if stored is not None:
            for name in ("postings", "metadata"):
                if getattr(stored.request, name) != getattr(request, name):
                    return JournalOutcome(
                        grpc.StatusCode.ALREADY_EXISTS, "EXISTS_WITH_DIFFERENT_FIELDS", field=name
                    )
            return self._journal_answer(stored, replayed=True)
        before = self.state.copy()
        result, index, rule = self._journal(request)
        if result != OK:
            self.state = before
        record = JournalRecord(request, result, index, rule)
        self.state.journals[key] = record
        return self._journal_answer(record, replayed=False)

    @staticmethod
    def _journal_answer(record: JournalRecord, *, replayed: bool) -> JournalOutcome:
        if record.result == OK:
            return JournalOutcome(None, replayed=replayed)
        # A replay names no rule: the contract says so of a transfer's refused_by_rule
        # ("Empty for a replay") and nothing of a journal's rule_id; the service's way.
        return JournalOutcome(
            grpc.StatusCode.FAILED_PRECONDITION,
            _code(record.result),
            replayed=replayed,
            subjects=(f"postings[{record.failed_index}]",),
            rule="" if replayed else record.rule,
        )

    def _journal(self, request: pb.PostJournalRequest) -> tuple[int, int, str]:
        """Applies a journal's postings in order: (result, failing posting, rule). The
        contract names no order of checks; this is the service's: each posting's
        account, currency, closed and overflow in order; then the limit flags on the
        final balances; then velocity, each posting one movement of its account."""
        transfer = (request.merchant_id, request.journal_id)
        for index, p in enumerate(request.postings):
            key = _key(p.account)
            b = self.state.accounts.get(key)
            debit = p.direction == DEBIT
            if b is None:
                return (
                    pb.TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND
                    if debit
                    else pb.TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND,
                    index,
                    "",
                )
            if p.currency != b.currency:
                return pb.TRANSFER_RESULT_CURRENCY_MISMATCH, index, ""
            if b.closed:
                return (
                    pb.TRANSFER_RESULT_DEBIT_ACCOUNT_CLOSED
                    if debit
                    else pb.TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED,
                    index,
                    "",
                )
            used = (
                b.debits_posted + b.debits_pending
                if debit
                else b.credits_posted + b.credits_pending
            )
            if used + p.amount_minor > BALANCE_MAX:
                return pb.TRANSFER_RESULT_OVERFLOW, index, ""
            self._book(key, transfer, p.direction, POSTED, p.amount_minor)
        for index, p in enumerate(request.postings):
            b = self.state.accounts[_key(p.account)]
            if b.debits_limited and b.debits_posted + b.debits_pending > b.credits_posted:
                return pb.TRANSFER_RESULT_EXCEEDS_CREDITS, index, ""
            if b.credits_limited and b.credits_posted + b.credits_pending > b.debits_posted:
                return pb.TRANSFER_RESULT_EXCEEDS_DEBITS, index, ""
        for index, p in enumerate(request.postings):
            key = _key(p.account)
            rule = self._velocity_refusal(key, p.direction, p.amount_minor)
            if rule:
                return pb.TRANSFER_RESULT_EXCEEDS_VELOCITY_LIMIT, index, rule
            self._count(key, p.direction, p.amount_minor)
        return OK, -1, ""

    # ---- limits -------------------------------------------------------------

    def set_limits(self, key: Key, limits: pb.AccountLimits) -> int:
        """A valid new change of an account's limits: 0 (now in force), or the
        FAILED_PRECONDITION reason of an overdraft flag its balances already break."""
        b = self.state.accounts[key]
        if (
            limits.debits_must_not_exceed_credits
            and b.debits_posted + b.debits_pending > b.credits_posted
        ):
            return pb.TRANSFER_RESULT_EXCEEDS_CREDITS
        if (
            limits.credits_must_not_exceed_debits
            and b.credits_posted + b.credits_pending > b.debits_posted
        ):
            return pb.TRANSFER_RESULT_EXCEEDS_DEBITS
        b.debits_limited = limits.debits_must_not_exceed_credits
        b.credits_limited = limits.credits_must_not_exceed_debits
        b.rules = tuple(limits.velocity_rules)
        return 0

    def balance_after_step(self, key: Key, step: int) -> tuple[int, int, int, int]:
        """An account's balances once step `step` was done."""
        for e in reversed(self.state.entries.get(key, [])):
            if e.step <= step:
                return e.after
        return (0, 0, 0, 0)


def _show(t: pb.Transfer, names: dict[str, str]) -> str:
    def acct(r: pb.AccountRef) -> str:
        return f"{names.get(r.merchant_id, r.merchant_id)}/{r.account_id}" if r.account_id else "-"

    action = pb.TransferAction.Name(t.action).removeprefix("TRANSFER_ACTION_")
    parts = [
        f"{t.id} {action} {acct(t.debit_account)}->{acct(t.credit_account)}",
        f"{t.amount_minor} {t.currency or '-'}",
    ]
    if t.pending_id:
        parts.append(f"pending_id={t.pending_id}")
    if t.timeout_ms:
        parts.append(f"timeout_ms={t.timeout_ms}")
    if t.reversal_of:
        parts.append(f"reversal_of={t.reversal_of}")
    if t.metadata:
        parts.append(f"metadata={dict(t.metadata)}")
    if t.linked:
        parts.append("linked")
    return " ".join(parts)


def _code(result: int) -> str:
    return pb.TransferResult.Name(result).removeprefix("TRANSFER_RESULT_")


def _differences(expected: Sequence[Expected], got: Sequence[Expected]) -> str:
    def show(e: Expected) -> str:
        differing = f" ({e.differing_field})" if e.differing_field else ""
        rule = f" rule={e.rule}" if e.rule else ""
        return f"{_code(e.result)}{differing}{rule} replayed={e.replayed}"

    return "\n".join(
        f"  [{i}] expected {show(e)}, got {show(g)}" + ("" if e == g else "   <-- differs")
        for i, (e, g) in enumerate(zip(expected, got, strict=True))
    )


def _show_journal(request: pb.PostJournalRequest, names: dict[str, str]) -> str:
    def posting(p: pb.Posting) -> str:
        side = "D" if p.direction == DEBIT else "C"
        m = p.account.merchant_id
        return f"{side} {names.get(m, m)}/{p.account.account_id} {p.amount_minor} {p.currency}"

    home = names.get(request.merchant_id, request.merchant_id)
    metadata = f" metadata={dict(request.metadata)}" if request.metadata else ""
    return (
        f"journal {request.journal_id} of {home}: "
        + ", ".join(posting(p) for p in request.postings)
        + metadata
    )


def _show_entry(e: pb.Entry | ModelEntry) -> str:
    if isinstance(e, ModelEntry):
        (merchant, transfer_id), direction, kind, amount = e.fields()
        where = f"step {e.step}" + (" floating" if e.floating else "")
        after = e.after
    else:
        merchant, transfer_id = e.transfer_merchant_id, e.transfer_id
        direction, kind, amount = e.direction, e.kind, e.amount_minor
        where = f"seq {e.sequence} at {_micros(e.created_at)}"
        after = (e.debits_posted, e.credits_posted, e.debits_pending, e.credits_pending)
    side = "D" if direction == DEBIT else "C"
    name = pb.EntryKind.Name(kind).removeprefix("ENTRY_KIND_")
    return f"{transfer_id}@{merchant[:8]} {side} {name} {amount} -> {after} ({where})"


def _entry_fields(e: pb.Entry) -> tuple[Key, int, int, int]:
    return ((e.transfer_merchant_id, e.transfer_id), e.direction, e.kind, e.amount_minor)


def _micros(t: Timestamp) -> int:
    return t.seconds * MICROS_PER_S + t.nanos // 1_000


def _timestamp(micros: int) -> Timestamp:
    return Timestamp(seconds=micros // MICROS_PER_S, nanos=micros % MICROS_PER_S * 1_000)


def _entry_hash(previous: bytes, key: Key, e: pb.Entry) -> bytes:
    """README, "Tamper evidence": SHA-256(previous hash || text), text the UTF-8 of the
    entry's fields joined by the unit separator, the time in microseconds."""
    text = "\x1f".join(
        str(v)
        for v in (
            key[0],
            key[1],
            e.sequence,
            e.transfer_merchant_id,
            e.transfer_id,
            e.direction,
            e.kind,
            e.amount_minor,
            e.debits_posted,
            e.credits_posted,
            e.debits_pending,
            e.credits_pending,
            _micros(e.created_at),
        )
    )
    return hashlib.sha256(previous + text.encode()).digest()


def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    """total as parts positive amounts."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


class Run:
    def __init__(self, service: Service, seed: int, shards: Sequence[str]) -> None:
        self.service = service
        self.seed = seed
        self.shards = list(shards)
        self.rng = random.Random(f"ledger-model/{seed}/{len(shards)}")
        per_shard = max(2, MERCHANTS // len(shards))
        self.shard_of = {
            service.merchant_on(shard, f"lm{i}"): shard
            for i, shard in enumerate(s for s in self.shards for _ in range(per_shard))
        }
        self.merchants = list(self.shard_of)
        # Merchants nobody created anything for, wherever the ring places them (named by
        # the seed, so that it replays their placement; by the test too: a module's
        # tests share one service).
        self.unknown = [f"nobody{seed}x{len(shards)}x{i}" for i in range(UNKNOWN_MERCHANTS)]
        self.shard_of.update({m: service.ring.shard_for(m) for m in self.unknown})
        self.names = {m: f"m{i}({self.shard_of[m]})" for i, m in enumerate(self.merchants)}
        self.names.update({m: f"u{i}({self.shard_of[m]})" for i, m in enumerate(self.unknown)})
        self.model = Model(self.shard_of)
        self.ids = 0
        self.step_no = 0
        self.log: list[str] = []
        self.batches: list[list[pb.Transfer]] = []
        self.counts: Counter[str] = Counter()
        # When the service recorded each transfer, by (debit merchant, id).
        self.created_at: dict[Key, Timestamp] = {}
        # The batch being generated, by (debit merchant, id).
        self._building: dict[Key, pb.Transfer] = {}
        # The checks' own choices (page sizes, instants), apart from the generator's.
        self.check_rng = random.Random(f"ledger-model-checks/{seed}/{len(shards)}")
        self.admin = ledger_pb2_grpc.LedgerAdminServiceStub(service.channel)
        # Every account as CreateAccounts made it.
        self.created: dict[Key, pb.Account] = {}
        # Every journal sent (recorded or not), and when the service recorded each OK one.
        self.journals_sent: list[pb.PostJournalRequest] = []
        self.journal_created_at: dict[Key, Timestamp] = {}
        # Per account: every limits change recorded (as SetAccountLimits answered it) and
        # the request that made it.
        self.limit_changes: dict[Key, list[pb.AccountLimitsChange]] = {}
        self.limit_requests: list[pb.SetAccountLimitsRequest] = []
        # Stripes fill transfers went through (whether they were applied or not), and
        # the pairs of merchants a fill may go between.
        self.filled_stripes: set[int] = set()
        self.pairs_apart = [
            (x, y)
            for x in self.merchants
            for y in self.merchants
            if self.shard_of[x] != self.shard_of[y]
        ]

    # ---- set-up -------------------------------------------------------------

    async def create(self) -> None:
        accounts = []
        for i, m in enumerate(self.merchants):
            names = dict(ACCOUNTS)
            names.update({n: ("USD", "") for n in FILL_ACCOUNTS})
            if i == 0:
                names.update({n: ("USD", "") for n in BIG_ACCOUNTS})
            for name, (currency, limit) in names.items():
                accounts.append(
                    account(
                        m,
                        name,
                        currency,
                        no_overdraft=limit == "debits",
                        no_credit_overdraft=limit == "credits",
                    )
                )
                self.model.add_account((m, name), currency, limit)
                self.created[(m, name)] = accounts[-1]
        await create_accounts(self.service.stub, *accounts)

    # ---- generating ---------------------------------------------------------

    def next_id(self, prefix: str = "t") -> str:
        self.ids += 1
        return f"{prefix}{self.seed}x{self.ids}"

    def transfer_id(self) -> str:
        """A new transfer's id: now and then one on a stripe a fill went through, so
        sagas pass full stripes (docs/sagas.md, "Stripes that fill")."""
        if not self.filled_stripes or self.rng.random() >= FILLED_STRIPE_SHARE:
            return self.next_id()
        for _ in range(FILLED_STRIPE_DRAWS_MAX):
            transfer_id = self.next_id()
            if settlement_stripe(transfer_id) in self.filled_stripes:
                return transfer_id
        raise AssertionError("no id on a filled stripe")

    def unknown_merchant(self) -> str | None:
        """Now and then a merchant nobody created anything for."""
        return self.rng.choice(self.unknown) if self.rng.random() < 0.3 else None

    def pick_account(self, *, currency: str | None = None, other_than: Key | None = None) -> Key:
        """A random account (not a big one); unlimited ones twice as likely."""
        accounts = self.model.state.accounts
        keys = [
            k
            for k, b in accounts.items()
            if k[1] not in SET_ASIDE
            and k != other_than
            and (currency is None or b.currency == currency)
        ]
        weights = [
            1 if accounts[k].debits_limited or accounts[k].credits_limited else 2 for k in keys
        ]
        return self.rng.choices(keys, weights)[0]

    def new_transfer(self) -> pb.Transfer:
        """A POST or PENDING with a random twist (or none)."""
        rng = self.rng
        currency = "EUR" if rng.random() < 0.2 else "USD"
        debit = self.pick_account(currency=currency)
        credit = self.pick_account(currency=currency, other_than=debit)
        amount = rng.randint(1, AMOUNT_MINOR_MAX)
        # Fund the limited accounts now and then, so their limits bind both ways.
        if rng.random() < 0.3:
            if rng.random() < 0.6:
                credit = (debit[0], "eur2" if currency == "EUR" else "wallet")
            else:
                debit = (credit[0], "escrow")
                currency = "USD"
                credit = self.pick_account(currency="USD")
            amount = rng.randint(1, FUNDING_MINOR_MAX)
        twist = rng.random()
        if twist < 0.04:
            credit = debit
            if rng.random() < 0.2:
                debit = credit = (debit[0], GHOST)
        elif twist < 0.07:
            debit = (self.unknown_merchant() or debit[0], GHOST)
        elif twist < 0.10:
            credit = (self.unknown_merchant() or credit[0], GHOST)
        elif twist < 0.14:
            currency = "EUR" if currency == "USD" else "USD"
        elif twist < 0.17:
            # Balances near 2^63-1: big1 -> big2 with a huge amount, or anything onto them.
            m0 = self.merchants[0]
            debit, credit = (m0, "big1"), (m0, "big2")
            if rng.random() < 0.5:
                debit, credit = credit, debit
            currency = "USD"
            amount = rng.choice([BALANCE_MAX, BALANCE_MAX // 2, BALANCE_MAX - amount, amount])
            if rng.random() < 0.3:
                # Another account onto them (a limited one: its limit and their overflow
                # at once), on any shard: across shards a huge amount fills a hidden
                # settlement stripe, which later sagas between the shards pass.
                debit = (rng.choice(self.merchants), rng.choice(["wallet", "wallet", "cash"]))
                amount = rng.choice([amount, AMOUNT_MINOR_MAX])
        elif twist < 0.19 and self.pairs_apart:
            # A fill: 2^63-1 between two shards, on accounts of their own.
            x, y = rng.choice(self.pairs_apart)
            item = transfer(self.next_id(), ref(x, "fill_out"), ref(y, "fill_in"), BALANCE_MAX)
            self.filled_stripes.add(settlement_stripe(item.id))
            return item
        action = PENDING if rng.random() < 0.35 else POST
        item = pb.Transfer(
            id=self.transfer_id(),
            debit_account=ref(*debit),
            credit_account=ref(*credit),
            amount_minor=amount,
            currency=currency,
            action=action,
        )
        if action == PENDING:
            timeout = rng.random()
            if timeout < 0.08:
                item.timeout_ms = SHORT_TIMEOUT_MS
            elif timeout < 0.25:
                item.timeout_ms = LONG_TIMEOUT_MS
        if rng.random() < 0.1:
            item.metadata["order"] = str(rng.randint(1, 99))
        return item

    def settle(self, batch_pending: list[Key], batch_posts: list[Key]) -> pb.Transfer:
        """A POST_PENDING or VOID_PENDING of a known hold (or of something else)."""
        rng = self.rng
        state = self.model.state
        holds = [
            k
            for k, r in state.records.items()
            if r.request.action == PENDING
            and (
                r.request.timeout_ms != SHORT_TIMEOUT_MS or state.pending_state.get(k) == "expired"
            )
        ]
        holds += batch_pending
        live = [k for k in holds if state.pending_state.get(k) == "pending"] + batch_pending
        if live and rng.random() < 0.75:
            holds = live
        post = rng.random() < 0.6
        item = pb.Transfer(id=self.next_id("s"), action=POST_PENDING if post else VOID_PENDING)
        twist = rng.random()
        if not holds or twist < 0.05:
            merchant = rng.choice(self.merchants)
            item.debit_account.CopyFrom(ref(merchant, "cash"))
            item.pending_id = self.next_id("missing")
            return item
        if twist < 0.1:
            posts = [k for k, r in state.records.items() if r.request.action != PENDING]
            posts += batch_posts
            if posts:
                merchant, pending_id = rng.choice(posts)
                item.debit_account.CopyFrom(ref(merchant, "cash"))
                item.pending_id = pending_id
                return item
        hold_key = rng.choice(holds)
        record = state.records.get(hold_key)
        hold = record.request if record is not None else None
        if hold is None:
            # A hold made earlier in this batch.
            return self._settle_batch_hold(item, hold_key)
        item.pending_id = hold.id
        item.debit_account.CopyFrom(hold.debit_account)
        held = hold.amount_minor
        if post:
            item.amount_minor = rng.choice(
                [0, held, rng.randint(1, held), min(held + 1, BALANCE_MAX)]
            )
        else:
            item.amount_minor = rng.choice([0, 0, held, max(1, held - 1)])
        if rng.random() < 0.4:
            item.credit_account.CopyFrom(hold.credit_account)
        if rng.random() < 0.3:
            item.currency = hold.currency
        wrong = rng.random()
        if wrong < 0.05:
            item.credit_account.CopyFrom(ref(*self.pick_account()))
        elif wrong < 0.08:
            item.debit_account.CopyFrom(ref(hold.debit_account.merchant_id, "sales"))
        elif wrong < 0.1:
            item.currency = "EUR" if hold.currency == "USD" else "USD"
        elif wrong < 0.12:
            # The hold lives with its own debit merchant, not another one.
            other = rng.choice([m for m in self.merchants if m != hold_key[0]])
            item.debit_account.CopyFrom(ref(other, hold.debit_account.account_id))
        return item

    def _settle_batch_hold(self, item: pb.Transfer, hold_key: Key) -> pb.Transfer:
        """A settle of a hold made earlier in the batch being built."""
        hold = self._building[hold_key]
        item.pending_id = hold.id
        item.debit_account.CopyFrom(hold.debit_account)
        if item.action == POST_PENDING:
            item.amount_minor = self.rng.choice([0, hold.amount_minor, 1])
        return item

    def reversal(self, batch_posts: list[Key]) -> pb.Transfer:
        rng = self.rng
        state = self.model.state
        targets = [k for k, r in state.records.items() if r.posted_minor > 0]
        others = [k for k in state.records if k not in targets]
        pool = targets if targets and rng.random() < 0.8 else (others or targets)
        pool = pool + batch_posts
        item = pb.Transfer(id=self.next_id("r"), action=POST)
        if not pool or rng.random() < 0.05:
            debit, credit = self.pick_account(), self.pick_account()
            item.debit_account.CopyFrom(ref(*debit))
            item.credit_account.CopyFrom(ref(*credit))
            item.currency = state.accounts[debit].currency
            item.amount_minor = rng.randint(1, AMOUNT_MINOR_MAX)
            item.reversal_of = self.next_id("missing")
            return item
        target_key = rng.choice(pool)
        record = state.records.get(target_key)
        if record is None:
            original = self._building[target_key]
            debit, credit = _key(original.credit_account), _key(original.debit_account)
            currency, posted = original.currency, original.amount_minor
        else:
            debit, credit = record.credit, record.debit
            currency, posted = record.currency, max(record.posted_minor, 1)
            # A failed settle may name no credit account and no currency.
            if not debit[0]:
                debit = self.pick_account(currency=currency or None)
            currency = currency or "USD"
        left = posted - state.reversed_minor.get(target_key, 0)
        amount = rng.choice([max(1, left), rng.randint(1, posted), left + 1, posted])
        item.amount_minor = max(1, min(amount, BALANCE_MAX))
        if rng.random() < 0.1:
            debit, credit = credit, debit
        elif rng.random() < 0.1:
            # Another account, half the time of the original's debit merchant: across
            # shards only step 2, where the original is, can tell it is not the one.
            accounts = state.accounts
            same_merchant = [
                k
                for k in accounts
                if k[0] == credit[0]
                and k != credit
                and k[1] not in SET_ASIDE
                and accounts[k].currency == currency
            ]
            if same_merchant and rng.random() < 0.5:
                credit = rng.choice(same_merchant)
            else:
                credit = self.pick_account(currency=currency)
        item.debit_account.CopyFrom(ref(*debit))
        item.credit_account.CopyFrom(ref(*credit))
        item.currency = currency
        item.reversal_of = target_key[1]
        return item

    def resend(self, used: set[Key]) -> pb.Transfer | None:
        """An earlier transfer that was sent alone (not linked), the same or changed."""
        rng = self.rng
        journals = [k for k in self.model.state.journals if k not in used]
        if journals and rng.random() < 0.1:
            # A transfer under a journal's id: one id namespace per merchant.
            merchant, journal_id = rng.choice(journals)
            self.counts["transfers under a journal's id"] += 1
            return pb.Transfer(
                id=journal_id,
                debit_account=ref(merchant, "cash"),
                credit_account=ref(merchant, "sales"),
                amount_minor=rng.randint(1, AMOUNT_MINOR_MAX),
                currency="USD",
                action=POST,
            )
        candidates = [
            r.request
            for k, r in self.model.state.records.items()
            if not r.request.linked and k not in used
        ]
        if not candidates:
            return None
        original = rng.choice(candidates)
        item = pb.Transfer()
        item.CopyFrom(original)
        change = rng.random()
        if change < 0.5:
            self.counts["resent same"] += 1
            return item
        self.counts["resent changed"] += 1
        if change < 0.7:
            item.amount_minor = item.amount_minor + 1 if item.amount_minor < BALANCE_MAX else 1
        elif change < 0.85:
            item.metadata["retry"] = "changed"
        elif item.action in (POST, PENDING):
            # Another account, of the same merchant or any (maybe on another shard).
            merchant = item.credit_account.merchant_id
            if rng.random() < 0.5:
                merchant = rng.choice(self.merchants)
            item.credit_account.CopyFrom(ref(merchant, "sales"))
            if item.credit_account == original.credit_account:
                item.credit_account.account_id = "cash"
        else:
            item.amount_minor = item.amount_minor + 2 if item.amount_minor < BALANCE_MAX - 1 else 1
        return item

    def item_accounts(self, t: pb.Transfer) -> set[Key]:
        """The accounts an item names (a settle: its hold's too)."""
        keys = {_key(t.debit_account), _key(t.credit_account)}
        if t.pending_id:
            key = (t.debit_account.merchant_id, t.pending_id)
            record = self.model.state.records.get(key)
            hold = record.request if record is not None else self._building.get(key)
            if hold is not None:
                keys |= {_key(hold.debit_account), _key(hold.credit_account)}
        return {k for k in keys if k[0]}

    def item_shards(self, t: pb.Transfer) -> set[str]:
        return {self.shard_of[m] for m, _ in self.item_accounts(t)}

    def generate_batch(self) -> list[pb.Transfer]:
        rng = self.rng
        size = rng.randint(1, BATCH_ITEMS_MAX)
        items: list[pb.Transfer] = []
        batch_pending: list[Key] = []
        batch_posts: list[Key] = []
        used: set[Key] = set()
        self._building = {}
        chain_left = 0
        # The shard a chain's members must live on; None: anywhere (a chain that may
        # span shards, which refuses the whole call).
        chain_shard: str | None = self.shards[0]
        while len(items) < size:
            if chain_left == 0 and rng.random() < 0.15:
                # A linked chain of 2 to 4, mostly closed; the batch's end may leave it open.
                chain_left = rng.randint(2, 4)
                chain_shard = rng.choice(self.shards)
                if len(self.shards) > 1 and rng.random() < SPANNING_CHAIN_SHARE:
                    chain_shard = None
                if rng.random() < 0.75:
                    size = max(size, len(items) + chain_left)
            item: pb.Transfer | None = None
            # A chain lives on one shard: its members are drawn until they do.
            for _ in range(CHAIN_DRAWS_MAX):
                if chain_left and chain_shard is None:
                    item = self.spanning_member()
                else:
                    item = self.draw(used, batch_pending, batch_posts, chaining=chain_left > 0)
                shards = self.item_shards(item)
                if not chain_left or chain_shard is None or shards == {chain_shard}:
                    break
            else:
                free = [m for m in self.merchants if chain_shard in (None, self.shard_of[m])]
                if not free:
                    break
                merchant = rng.choice(free)
                item = pb.Transfer(
                    id=self.next_id(),
                    debit_account=ref(merchant, "cash"),
                    credit_account=ref(merchant, "sales"),
                    amount_minor=rng.randint(1, AMOUNT_MINOR_MAX),
                    currency="USD",
                    action=POST,
                )
            assert item is not None
            key = (item.debit_account.merchant_id, item.id)
            if key in used:
                continue
            used.add(key)
            self._building[key] = item
            # (Whether a journal's id is "a transfer" to settle or reverse is not said.)
            if (
                item.action == POST
                and not item.reversal_of
                and key not in self.model.state.journals
            ):
                batch_posts.append(key)
            if item.action == PENDING and item.timeout_ms != SHORT_TIMEOUT_MS:
                batch_pending.append(key)
            if chain_left:
                chain_left -= 1
                item.linked = chain_left > 0
            items.append(item)
        return items

    def spanning_member(self) -> pb.Transfer:
        """A member of a chain that may span shards: a new transfer, or a settle of a
        hold a saga carries (which makes the chain span shards too)."""
        state = self.model.state
        holds = [
            k
            for k, r in state.records.items()
            if r.result == OK
            and state.pending_state.get(k) == "pending"
            and self.shard_of[r.debit[0]] != self.shard_of[r.credit[0]]
        ]
        if not holds or self.rng.random() < 0.7:
            return self.new_transfer()
        hold = state.records[self.rng.choice(holds)].request
        item = pb.Transfer(
            id=self.next_id("s"),
            debit_account=hold.debit_account,
            action=self.rng.choice([POST_PENDING, VOID_PENDING]),
            pending_id=hold.id,
        )
        if self.rng.random() < 0.5:
            item.credit_account.CopyFrom(hold.credit_account)
        return item

    def draw(
        self,
        used: set[Key],
        batch_pending: list[Key],
        batch_posts: list[Key],
        *,
        chaining: bool,
    ) -> pb.Transfer:
        kind = self.rng.random()
        item: pb.Transfer | None = None
        if kind < (0.05 if chaining else 0.15):
            # In a chain, a resend replays (or differs in `linked`) as a member.
            item = self.resend(used)
        elif kind < 0.35:
            item = self.settle(batch_pending, batch_posts)
        elif kind < 0.45:
            item = self.reversal(batch_posts)
        return item or self.new_transfer()

    # ---- checking -----------------------------------------------------------

    def describe(self, items: Sequence[pb.Transfer]) -> str:
        sent = "\n".join(f"  [{i}] {_show(t, self.names)}" for i, t in enumerate(items))
        history = "\n".join(self.log[-30:])
        merchants = ", ".join(f"{v}={k}" for k, v in self.names.items())
        return (
            f"seed {self.seed}, step {self.step_no} ({merchants})\n"
            f"batch sent:\n{sent}\nearlier steps:\n{history}"
        )

    async def send(self, items: list[pb.Transfer], *, copies: int = 1) -> None:
        """Sends the batch (copies times at once: each copy must answer as the model
        says, every new item fresh in exactly one copy and replayed in the others)."""
        if self.model.chain_spans_shards(items):
            await self.send_refused(items)
            return
        before = self.model.state.copy()
        expected = self.model.apply_batch(items)
        try:
            responses = await asyncio.gather(
                *(
                    self.service.stub.CreateTransfers(
                        pb.CreateTransfersRequest(transfers=items), timeout=RPC_TIMEOUT_S
                    )
                    for _ in range(copies)
                )
            )
        except grpc.aio.AioRpcError as error:
            raise AssertionError(
                f"CreateTransfers refused whole: {error.code()} {error_reason(error)} "
                f"{error.details()}\n" + self.describe(items)
            ) from error
        for copy, response in enumerate(responses):
            got = await self.answers(items, response)
            # Which copy ran first is not fixed: replayed is checked across copies below.
            # A replay names no rule.
            want = (
                expected
                if copies == 1
                else [
                    replace(e, replayed=g.replayed, rule="" if g.replayed else e.rule)
                    for e, g in zip(expected, got, strict=True)
                ]
            )
            if got != want:
                raise AssertionError(
                    f"result codes differ from the model's (copy {copy + 1} of {copies}):\n"
                    + _differences(want, got)
                    + "\n"
                    + self.describe(items)
                )
        for i, (t, e) in enumerate(zip(items, expected, strict=True)):
            key = (t.debit_account.merchant_id, t.id)
            answered = [r.results[i] for r in responses]
            fresh = [r for r in answered if not r.replayed]
            if not e.replayed and not e.differing_field:
                assert len(fresh) == 1, (
                    f"[{i}] new in the model, fresh in {len(fresh)} of {copies} copies\n"
                    + self.describe(items)
                )
                self.created_at[key] = fresh[0].created_at
            elif e.replayed:
                assert not fresh, f"[{i}] a replay answered fresh\n{self.describe(items)}"
            if not e.differing_field:
                stamps = {(r.created_at.seconds, r.created_at.nanos) for r in answered}
                original = self.created_at[key]
                assert stamps == {(original.seconds, original.nanos)}, (
                    f"[{i}] created_at {stamps}, recorded first at {original}\n"
                    + self.describe(items)
                )
        self.log.append(
            f"step {self.step_no}: "
            + ("" if copies == 1 else f"{copies} copies at once: ")
            + "; ".join(
                f"{_show(t, self.names)} = {_code(e.result)}"
                for t, e in zip(items, expected, strict=True)
            )
        )
        for e in expected:
            self.counts[_code(e.result) + (" (replayed)" if e.replayed else "")] += 1
        await self.expire_short_holds(items, before)
        await self.check_transfers(items)

    async def answers(
        self, items: Sequence[pb.Transfer], response: pb.CreateTransfersResponse
    ) -> list[Expected]:
        """A response's answers, with the final result of sagas answered IN_PROGRESS."""
        assert [(r.index, r.id) for r in response.results] == [
            (i, t.id) for i, t in enumerate(items)
        ], self.describe(items)
        got = [
            Expected(r.result, r.replayed, r.differing_field, r.refused_by_rule)
            for r in response.results
        ]
        for t, g in zip(items, got, strict=True):
            across = len(self.item_shards(t)) > 1
            self.counts["items across shards"] += across
            # A saga not finished within the call's deadline: its final result comes later.
            if g.result == pb.TRANSFER_RESULT_IN_PROGRESS and across:
                g.result = await self.final_result(t)
                self.counts["answered IN_PROGRESS"] += 1
        return got

    async def send_refused(self, items: list[pb.Transfer]) -> None:
        """A chain across shards: the whole call is refused and nothing is written."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            response = await self.service.stub.CreateTransfers(
                pb.CreateTransfersRequest(transfers=items), timeout=RPC_TIMEOUT_S
            )
            codes = [_code(r.result) for r in response.results]
            raise AssertionError(
                f"a chain across shards was not refused: {codes}\n{self.describe(items)}"
            )
        got = (caught.value.code(), error_reason(caught.value))
        assert got == (grpc.StatusCode.FAILED_PRECONDITION, "LINKED_CHAIN_SPANS_SHARDS"), (
            f"a chain across shards: {got} {caught.value.details()}\n{self.describe(items)}"
        )
        self.log.append(
            f"step {self.step_no}: refused whole (a chain across shards): "
            + "; ".join(_show(t, self.names) for t in items)
        )
        self.counts["calls refused: chain across shards"] += 1
        await self.check_transfers(items)

    async def final_result(self, t: pb.Transfer) -> int:
        key = pb.TransferRef(merchant_id=t.debit_account.merchant_id, transfer_id=t.id)
        results: list[int] = []

        async def finished() -> bool:
            response = await self.service.stub.LookupTransfers(
                pb.LookupTransfersRequest(refs=[key], wait_timeout_ms=5_000),
                timeout=RPC_TIMEOUT_S,
            )
            results[:] = [r.result for r in response.transfers]
            return results != [pb.TRANSFER_RESULT_IN_PROGRESS]

        await wait_until(finished, what=f"{t.id}'s saga to finish\n{self.describe([t])}")
        assert len(results) == 1, f"{t.id} not found after IN_PROGRESS\n{self.describe([t])}"
        return results[0]

    async def expire_short_holds(self, items: Sequence[pb.Transfer], before: State) -> None:
        """Holds made now with a short timeout: the model expires them, and the service
        must release them (the sweeper within a second of their due time)."""
        state = self.model.state
        due = [
            (t.debit_account.merchant_id, t.id)
            for t in items
            if t.timeout_ms == SHORT_TIMEOUT_MS
            and (t.debit_account.merchant_id, t.id) not in before.records
            and state.pending_state.get((t.debit_account.merchant_id, t.id)) == "pending"
        ]
        if not due:
            return
        for key in due:
            self.model.expire(key)
        self.counts["expired"] += len(due)
        keys = {k for d in due for k in (state.records[d].debit, state.records[d].credit)}
        expected = {k: state.accounts[k].as_tuple() for k in keys}

        async def released() -> bool:
            return await self.balances(sorted(keys)) == expected

        await wait_until(
            released, what=f"holds {due} to expire and be released\n{self.describe(items)}"
        )

    async def balances(self, keys: Sequence[Key]) -> dict[Key, tuple[int, int, int, int]]:
        response = await self.service.stub.LookupAccounts(
            pb.LookupAccountsRequest(refs=[ref(*k) for k in keys]), timeout=RPC_TIMEOUT_S
        )
        return {
            _key(a.ref): (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)
            for a in response.accounts
        }

    async def check_accounts(self, items: Sequence[pb.Transfer]) -> None:
        """Every account (and the ghosts, which must stay missing) as the model has it;
        GetBalance of every account the batch named agrees."""
        state = self.model.state
        keys = [*state.accounts, *((m, GHOST) for m in (*self.merchants, *self.unknown))]
        response = await self.service.stub.LookupAccounts(
            pb.LookupAccountsRequest(refs=[ref(*k) for k in keys]), timeout=RPC_TIMEOUT_S
        )
        got = {
            _key(a.ref): (
                a.currency,
                a.closed,
                a.debits_posted,
                a.credits_posted,
                a.debits_pending,
                a.credits_pending,
            )
            for a in response.accounts
        }
        expected = {k: (b.currency, b.closed, *b.as_tuple()) for k, b in state.accounts.items()}
        if got != expected:
            differ = [
                f"  {self.names[k[0]]}/{k[1]}: expected {expected.get(k)}, got {got.get(k)}"
                for k in sorted({*got, *expected})
                if got.get(k) != expected.get(k)
            ]
            raise AssertionError(
                "balances differ from the model's (currency, closed, debits posted, credits "
                "posted, debits pending, credits pending):\n"
                + "\n".join(differ)
                + "\n"
                + self.describe(items)
            )
        touched = sorted(
            {_key(r) for t in items for r in (t.debit_account, t.credit_account)}
            & set(state.accounts)
        )
        for k in touched:
            b = await self.service.stub.GetBalance(
                pb.GetBalanceRequest(account=ref(*k)), timeout=RPC_TIMEOUT_S
            )
            got_balance = (
                b.currency,
                b.debits_posted,
                b.credits_posted,
                b.debits_pending,
                b.credits_pending,
            )
            want = (state.accounts[k].currency, *state.accounts[k].as_tuple())
            assert got_balance == want, (
                f"GetBalance {self.names[k[0]]}/{k[1]}: expected {want}, got {got_balance}\n"
                + self.describe(items)
            )

    async def check_transfers(self, items: Sequence[pb.Transfer]) -> None:
        """The batch's transfers, and the holds and originals they named, are stored as
        the model has them (result; a hold's state)."""
        state = self.model.state
        keys: list[Key] = []
        for t in items:
            m = t.debit_account.merchant_id
            for k in ((m, t.id), (m, t.pending_id), (t.credit_account.merchant_id, t.reversal_of)):
                # A journal's id is checked by the journal steps (PostJournal's replays).
                if k[1] and k not in keys and k not in state.journals:
                    keys.append(k)
        if not keys:
            return
        response = await self.service.stub.LookupTransfers(
            pb.LookupTransfersRequest(
                refs=[pb.TransferRef(merchant_id=m, transfer_id=i) for m, i in keys]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        states = {
            "pending": pb.PENDING_STATE_PENDING,
            "posted": pb.PENDING_STATE_POSTED,
            "voided": pb.PENDING_STATE_VOIDED,
            "expired": pb.PENDING_STATE_EXPIRED,
        }
        got = {
            (r.transfer.debit_account.merchant_id, r.transfer.id): (
                _code(r.result),
                pb.PendingState.Name(r.pending_state),
                r.transfer.debit_account.account_id,
                r.transfer.credit_account.account_id,
                r.transfer.currency,
            )
            for r in response.transfers
        }
        expected = {}
        for k in keys:
            record = state.records.get(k)
            if record is None:
                continue
            pending = state.pending_state.get(k) if record.result == OK else None
            expected[k] = (
                _code(record.result),
                pb.PendingState.Name(states[pending] if pending else 0),
                record.debit[1] if record.result == OK else record.request.debit_account.account_id,
                record.credit[1]
                if record.result == OK
                else record.request.credit_account.account_id,
                record.currency if record.result == OK else record.request.currency,
            )
        if got != expected:
            differ = [
                f"  {self.names.get(k[0], k[0])}/{k[1]}: "
                f"expected {expected.get(k)}, got {got.get(k)}"
                for k in sorted({*got, *expected})
                if got.get(k) != expected.get(k)
            ]
            raise AssertionError(
                "stored transfers differ from the model's (result, pending state, debit, "
                "credit, currency):\n" + "\n".join(differ) + "\n" + self.describe(items)
            )

    # ---- steps --------------------------------------------------------------

    async def close_or_reopen(self) -> set[Key]:
        rng = self.rng
        state = self.model.state
        closed = [k for k, b in state.accounts.items() if b.closed]
        reopen = bool(closed) and rng.random() < 0.6
        keys = (
            rng.sample(closed, min(len(closed), rng.randint(1, 2)))
            if reopen
            else [self.pick_account() for _ in range(rng.randint(1, 2))]
        )
        keys = list(dict.fromkeys(keys))
        if rng.random() < 0.2:
            keys.append((rng.choice(self.merchants), GHOST))
        response = await self.service.stub.SetAccountsClosed(
            pb.SetAccountsClosedRequest(refs=[ref(*k) for k in keys], closed=not reopen),
            timeout=RPC_TIMEOUT_S,
        )
        what = f"{'reopen' if reopen else 'close'} " + ", ".join(
            f"{self.names[k[0]]}/{k[1]}" for k in keys
        )
        expected = [k in state.accounts for k in keys]
        assert list(response.found) == expected, (
            f"SetAccountsClosed {what}: found {list(response.found)}, expected {expected}\n"
            + self.describe([])
        )
        for k in keys:
            if k in state.accounts:
                state.accounts[k].closed = not reopen
        self.log.append(f"step {self.step_no}: {what}")
        self.counts["reopen" if reopen else "close"] += 1
        await self.check_accounts([])
        return set(keys) & set(state.accounts)

    async def batch_step(self, *, resend: bool) -> set[Key]:
        if resend:
            items = [_copied(t) for t in self.rng.choice(self.batches)]
            self.counts["batches resent"] += 1
        else:
            items = self.generate_batch()
            self.batches.append(items)
        copies = 2 if self.rng.random() < CONCURRENT_COPIES_SHARE else 1
        self.counts["batches sent twice at once"] += copies > 1
        await self.send(items, copies=copies)
        await self.check_accounts(items)
        named = {k for t in items for k in self.item_accounts(t)}
        return named & set(self.model.state.accounts)

    # ---- journals -----------------------------------------------------------

    def new_journal(self, home: str | None = None, *, twists: bool = True) -> pb.PostJournalRequest:
        """A journal among accounts of merchants on its home merchant's shard, balanced
        per currency (1 or 2 debits and credits each, the same account maybe more than
        once); now and then one that breaks a rule."""
        rng = self.rng
        state = self.model.state
        home = home or rng.choice(self.merchants)
        shard = self.shard_of[home]
        local = [m for m in self.merchants if self.shard_of[m] == shard]

        def pick(currency: str, direction: int | None = None) -> Key:
            """An account of the currency; for a direction, mostly one its flags allow
            (a debits-limited account credited, a credits-limited one debited)."""
            keys = [
                k
                for k, b in state.accounts.items()
                if k[0] in local and b.currency == currency and k[1] not in SET_ASIDE
            ]
            if direction is not None and rng.random() < 0.8:
                accounts = state.accounts
                breaks = "debits_limited" if direction == DEBIT else "credits_limited"
                keys = [k for k in keys if not getattr(accounts[k], breaks)] or keys
            return rng.choice(keys)

        def posting(key: Key, direction: int, amount: int, currency: str) -> pb.Posting:
            return pb.Posting(
                account=ref(*key), amount_minor=amount, currency=currency, direction=direction
            )

        postings: list[pb.Posting] = []
        for currency in ["USD", "EUR"] if rng.random() < 0.3 else ["USD"]:
            debits, credits = rng.randint(1, JOURNAL_LEGS_MAX), rng.randint(1, JOURNAL_LEGS_MAX)
            total_max = rng.choice([AMOUNT_MINOR_MAX, FUNDING_MINOR_MAX])
            total = rng.randint(max(debits, credits), total_max)
            for direction, parts in ((DEBIT, debits), (CREDIT, credits)):
                for amount in _split(rng, total, parts):
                    postings.append(posting(pick(currency, direction), direction, amount, currency))
        rng.shuffle(postings)
        twist = rng.random() if twists else 1.0
        m0 = self.merchants[0]
        if twist < 0.04:
            # Not balanced in one currency.
            rng.choice(postings).amount_minor += 1
        elif twist < 0.07:
            # Too few postings (none, or one).
            del postings[rng.randint(0, 1) :]
        elif twist < 0.12 and len(self.shards) > 1:
            # An account of a merchant on another shard.
            p = rng.choice(postings)
            away = rng.choice([m for m in self.merchants if self.shard_of[m] != shard])
            p.account.CopyFrom(ref(away, "cash" if p.currency == "USD" else "eur"))
        elif twist < 0.16:
            # An account nobody created (of a known merchant, or of nobody, on this shard).
            nobody = [m for m in self.unknown if self.shard_of[m] == shard]
            rng.choice(postings).account.CopyFrom(ref(rng.choice([*local, *nobody]), GHOST))
        elif twist < 0.19:
            # An account of the other currency than its posting's.
            p = rng.choice(postings)
            p.account.CopyFrom(ref(*pick("EUR" if p.currency == "USD" else "USD")))
        elif twist < 0.23 and self.shard_of[m0] == shard:
            # Balances near 2^63-1.
            amount = rng.choice([BALANCE_MAX, BALANCE_MAX // 2, rng.randint(1, AMOUNT_MINOR_MAX)])
            big = [(m0, "big1"), (m0, "big2")]
            rng.shuffle(big)
            postings = [
                posting(big[0], DEBIT, amount, "USD"),
                posting(big[1], CREDIT, amount, "USD"),
            ]
        request = pb.PostJournalRequest(
            journal_id=self.next_id("j"), merchant_id=home, postings=postings
        )
        if rng.random() < 0.1:
            request.metadata["order"] = str(rng.randint(1, 99))
        return request

    def draw_journal(self) -> pb.PostJournalRequest:
        """A new journal, an earlier one resent (the same, or changed), or one under the
        id of a transfer of its home merchant."""
        rng = self.rng
        roll = rng.random()
        if self.journals_sent and roll < JOURNAL_RESEND_SHARE:
            request = pb.PostJournalRequest()
            request.CopyFrom(rng.choice(self.journals_sent))
            change = rng.random()
            if change >= 0.6 and (change < 0.8 or not _change_postings(request)):
                request.metadata["retry"] = f"changed at step {self.step_no}"
            return request
        transfers = [k for k in self.model.state.records if k[0] in self.merchants]
        if transfers and roll < JOURNAL_RESEND_SHARE + JOURNAL_COLLIDE_SHARE:
            merchant, transfer_id = rng.choice(transfers)
            request = self.new_journal(merchant, twists=False)
            request.journal_id = transfer_id
            return request
        return self.new_journal()

    async def journal_step(self) -> set[Key]:
        """One PostJournal: its answer (status, reason, details), balances and (later)
        entries as the model has them, and a replay's created_at the original's."""
        request = self.draw_journal()
        self.journals_sent.append(request)
        key = (request.merchant_id, request.journal_id)
        shown = _show_journal(request, self.names)
        expected = self.model.post_journal(request)
        created_at: Timestamp | None = None
        try:
            response = await self.service.stub.PostJournal(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            got = _journal_refusal(error)
        else:
            assert response.result == OK, f"PostJournal answered {response}\n{shown}"
            got = JournalOutcome(None, replayed=response.replayed)
            created_at = response.created_at
        assert got == expected, (
            f"PostJournal {shown}:\n  expected {expected}\n  got      {got}\n" + self.describe([])
        )
        if created_at is not None:
            if expected.replayed:
                assert created_at == self.journal_created_at[key], (
                    f"replayed journal {key[1]}: created_at {created_at}, "
                    f"recorded first at {self.journal_created_at[key]}"
                )
            else:
                self.journal_created_at[key] = created_at
        outcome = "OK" if expected.code is None else f"{expected.code.name} {expected.reason}"
        outcome += " (replayed)" if expected.replayed else ""
        self.log.append(f"step {self.step_no}: {shown} = {outcome}")
        self.counts[f"journal {outcome}"] += 1
        await self.check_accounts([])
        return {_key(p.account) for p in request.postings} & set(self.model.state.accounts)

    # ---- limits -------------------------------------------------------------

    def new_limits(self, key: Key) -> pb.AccountLimits:
        """Overdraft flags (kept, cleared or either set) and 0 to VELOCITY_RULES_MAX rules
        of the long windows, their limits near what the account already moved."""
        rng = self.rng
        b = self.model.state.accounts[key]
        flag = rng.choice(["same", "same", "none", "debits", "credits"])
        limits = pb.AccountLimits(
            debits_must_not_exceed_credits=b.debits_limited if flag == "same" else flag == "debits",
            credits_must_not_exceed_debits=(
                b.credits_limited if flag == "same" else flag == "credits"
            ),
        )
        for i in range(rng.choice([0, 0, 1, 1, 2, VELOCITY_RULES_MAX])):
            direction = rng.choice([DEBIT, CREDIT])
            metric = rng.choice([AMOUNT, COUNT])
            moved_minor, moved_count = b.moved(direction)
            limit = (
                # An account of balances near 2^63-1 has moved nearly that much.
                min(BALANCE_MAX, moved_minor + rng.randint(0, 3 * AMOUNT_MINOR_MAX))
                if metric == AMOUNT
                else moved_count + rng.randint(0, 4)
            )
            limits.velocity_rules.append(
                pb.VelocityRule(
                    rule_id=f"rule{i}",
                    direction=direction,
                    metric=metric,
                    window_s=rng.choice(VELOCITY_WINDOWS_S),
                    limit=0 if rng.random() < 0.1 else limit,
                )
            )
        return limits

    def draw_limits(self) -> pb.SetAccountLimitsRequest:
        """A new change of a random account's limits (now and then an invalid one), or
        an earlier change resent (the same, or other content under its change_id)."""
        rng = self.rng
        if self.limit_requests and rng.random() < LIMITS_RESEND_SHARE:
            request = pb.SetAccountLimitsRequest()
            request.CopyFrom(rng.choice(self.limit_requests))
            if rng.random() < 0.4:
                rules = request.limits.velocity_rules
                if rules:
                    rules[0].limit += 1
                else:
                    rules.append(
                        pb.VelocityRule(
                            rule_id="added",
                            direction=DEBIT,
                            metric=COUNT,
                            window_s=VELOCITY_WINDOWS_S[0],
                            limit=STEPS * BATCH_ITEMS_MAX,
                        )
                    )
            return request
        key = self.pick_account()
        request = pb.SetAccountLimitsRequest(
            account=ref(*key),
            change_id=self.next_id("c"),
            limits=self.new_limits(key),
            reason=f"model step {self.step_no}",
        )
        invalid = rng.random()
        if invalid < 0.04:
            # Both flags: an account cannot limit debits and credits by each other.
            request.limits.debits_must_not_exceed_credits = True
            request.limits.credits_must_not_exceed_debits = True
        elif invalid < 0.08 and request.limits.velocity_rules:
            # Two rules of one id.
            request.limits.velocity_rules.append(request.limits.velocity_rules[0])
        return request

    async def change_limits(self) -> set[Key]:
        """SetAccountLimits: a new change takes effect for every later transfer (the model's
        flags and rules), a resend replays or is ALREADY_EXISTS, an invalid one or a
        flag the balances break is refused and recorded nowhere; then the limits in
        force and their history (GetAccountLimits), and the account's original
        CreateAccounts item compared with the flags in force."""
        request = self.draw_limits()
        key = _key(request.account)
        changes = self.limit_changes.setdefault(key, [])
        limits = request.limits
        rule_ids = [r.rule_id for r in limits.velocity_rules]
        original = next((c for c in changes if c.change_id == request.change_id), None)
        expected: tuple[object, ...]
        if (limits.debits_must_not_exceed_credits and limits.credits_must_not_exceed_debits) or len(
            set(rule_ids)
        ) < len(rule_ids):
            expected = (grpc.StatusCode.INVALID_ARGUMENT,)
        elif original is not None:
            same = (original.limits, original.reason) == (limits, request.reason)
            expected = ("replayed", original) if same else (grpc.StatusCode.ALREADY_EXISTS,)
        else:
            refusal = self.model.set_limits(key, limits)
            expected = (
                (grpc.StatusCode.FAILED_PRECONDITION, _code(refusal))
                if refusal
                else ("new", len(changes) + 1)
            )
        what = (
            f"limits of {self.names[key[0]]}/{key[1]} ({request.change_id}): "
            f"debits_must_not_exceed_credits={limits.debits_must_not_exceed_credits} "
            f"credits_must_not_exceed_debits={limits.credits_must_not_exceed_debits} rules "
            + ", ".join(
                f"{r.rule_id} {pb.Direction.Name(r.direction)} "
                f"{pb.VelocityMetric.Name(r.metric)} {r.window_s}s {r.limit}"
                for r in limits.velocity_rules
            )
        )
        try:
            response = await self.admin.SetAccountLimits(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            got: tuple[object, ...] = (error.code(),)
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                got += (error_reason(error),)
        else:
            if response.replayed:
                got = ("replayed", response.change)
            else:
                got = ("new", response.change.sequence)
                want = pb.AccountLimitsChange(
                    sequence=len(changes) + 1,
                    change_id=request.change_id,
                    limits=limits,
                    changed_by="anonymous",
                    reason=request.reason,
                    changed_at=response.change.changed_at,
                )
                assert response.change == want, (
                    f"SetAccountLimits {what}: recorded {response.change}, expected {want}"
                )
                changes.append(response.change)
                self.limit_requests.append(request)
        assert got == expected, (
            f"SetAccountLimits {what}:\n  expected {expected}\n  got      {got}\n"
            + self.describe([])
        )
        outcome = expected[0] if isinstance(expected[0], str) else expected[0].name
        self.log.append(f"step {self.step_no}: {what} = {outcome}")
        self.counts[f"limits {outcome}"] += 1
        await self.check_limits(key)
        return {key}

    async def check_limits(self, key: Key) -> None:
        b = self.model.state.accounts[key]
        page_size = self.check_rng.choice([0, 1, 2, 5])
        response = await self.admin.GetAccountLimits(
            pb.GetAccountLimitsRequest(account=ref(*key), page_size=page_size),
            timeout=RPC_TIMEOUT_S,
        )
        where = f"{self.names[key[0]]}/{key[1]}"
        assert response.limits == b.limits(), (
            f"limits in force of {where}: {response.limits}, expected {b.limits()}\n"
            + self.describe([])
        )
        history = self.limit_changes.get(key, [])[::-1][: page_size or 100]
        assert list(response.history) == history, (
            f"limits history of {where} (page_size {page_size}): "
            f"{[(c.sequence, c.change_id) for c in response.history]}, expected "
            f"{[(c.sequence, c.change_id) for c in history]}\n" + self.describe([])
        )
        # The original CreateAccounts item compares with the flags in force (README,
        # "Limits change at run time"); of two flags that differ, the first in
        # Account's field order is named (the service's choice).
        created = self.created[key]
        differing = [
            name
            for name, now in (
                ("debits_must_not_exceed_credits", b.debits_limited),
                ("credits_must_not_exceed_debits", b.credits_limited),
            )
            if getattr(created, name) != now
        ]
        answer = await self.service.stub.CreateAccounts(
            pb.CreateAccountsRequest(accounts=[created]), timeout=RPC_TIMEOUT_S
        )
        got = (answer.results[0].result, answer.results[0].differing_field)
        want = (
            (pb.ACCOUNT_RESULT_EXISTS_WITH_DIFFERENT_FIELDS, differing[0])
            if differing
            else (pb.ACCOUNT_RESULT_EXISTS, "")
        )
        assert got == want, (
            f"CreateAccounts of {where} again, limit flags now {b.limits()}: {got}, "
            f"expected {want}\n" + self.describe([])
        )

    # ---- entries and balances as of an instant -------------------------------

    async def list_entries(self, key: Key, order: int, page_size: int) -> list[pb.Entry]:
        """Every entry of an account, page by page (a next_page_token promises more)."""
        entries: list[pb.Entry] = []
        token = ""
        pages_max = len(self.model.state.entries.get(key, [])) + 2
        for _ in range(pages_max):
            response = await self.service.stub.ListEntries(
                pb.ListEntriesRequest(
                    account=ref(*key), page_size=page_size, page_token=token, order=order
                ),
                timeout=RPC_TIMEOUT_S,
            )
            where = f"ListEntries {self.names[key[0]]}/{key[1]} {pb.Order.Name(order)}"
            assert len(response.entries) <= page_size, (
                f"{where}: a page of {len(response.entries)} for page_size {page_size}"
            )
            assert response.entries or not token, f"{where}: the page after a token is empty"
            entries += response.entries
            token = response.next_page_token
            if not token:
                return entries
        raise AssertionError(
            f"ListEntries {self.names[key[0]]}/{key[1]}: more than {pages_max} pages of "
            f"{page_size}, the model has {pages_max - 2} entries\n" + self.describe([])
        )

    async def check_entries(self, keys: Sequence[Key], *, as_of_checks: int) -> None:
        self.counts["entry listings"] += len(keys)
        outcomes = await asyncio.gather(
            *(self.check_account_entries(k, as_of_checks) for k in keys), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def check_account_entries(self, key: Key, as_of_checks: int) -> None:
        """An account's entries, listed oldest first and newest first (one order in small
        pages), are the model's: for each applied transfer, journal, settle and expiry
        the right kinds, amounts, transfer, in order (a failed transfer makes none, a
        saga the credit side refused its reservation and release), each with the
        balances after it, sequences 1..n, times that do not go back, and the hash chain
        of README "Tamper evidence". Then GetBalance as_of instants between steps."""
        rng = self.check_rng
        model = self.model.state.entries.get(key, [])
        sizes = [rng.randint(1, ENTRIES_PAGE_SMALL_MAX), ENTRIES_PAGE_LARGE]
        rng.shuffle(sizes)
        newest_order = rng.choice([pb.ORDER_NEWEST_FIRST, pb.ORDER_UNSPECIFIED])
        oldest = await self.list_entries(key, pb.ORDER_OLDEST_FIRST, sizes[0])
        newest = await self.list_entries(key, newest_order, sizes[1])

        def fail(problem: str) -> NoReturn:
            raise AssertionError(
                f"entries of {self.names[key[0]]}/{key[1]}: {problem}\n"
                "  the model's (oldest first):\n"
                + "\n".join(f"    {_show_entry(e)}" for e in model)
                + "\n  the service's (oldest first):\n"
                + "\n".join(f"    {_show_entry(e)}" for e in oldest)
                + "\n"
                + self.describe([])
            )

        if newest != oldest[::-1]:
            fail("newest first is not oldest first reversed")
        if [e.sequence for e in oldest] != list(range(1, len(oldest) + 1)):
            fail("sequences are not 1, 2, 3, ...")
        previous = bytes(32)
        for e in oldest:
            if e.hash != _entry_hash(previous, key, e):
                fail(f"entry {e.sequence}'s hash does not chain")
            previous = e.hash
        stamps = [_micros(e.created_at) for e in oldest]
        if stamps != sorted(stamps):
            fail("an entry is recorded before the one it follows")
        running = [0, 0, 0, 0]
        for e in oldest:
            position = (0 if e.direction == DEBIT else 1) + (0 if e.kind == POSTED else 2)
            running[position] += -e.amount_minor if e.kind == RELEASED else e.amount_minor
            after = (e.debits_posted, e.credits_posted, e.debits_pending, e.credits_pending)
            if after != tuple(running):
                fail(
                    f"entry {e.sequence}: balances after it {after}, its entries add up to "
                    f"{tuple(running)}"
                )
        # In the model's order, but for an expiry's release: anywhere after its hold (the
        # sweeper may book it between its batch's waves). Each entry's step, for as_of.
        floating: dict[tuple[Key, int, int, int], list[int]] = {}
        for m in model:
            if m.floating:
                floating.setdefault(m.fields(), []).append(m.step)
        fixed = [m for m in model if not m.floating]
        got_fixed: list[pb.Entry] = []
        steps: list[int] = []
        for e in oldest:
            fields = _entry_fields(e)
            if e.kind == RELEASED and floating.get(fields):
                steps.append(floating[fields].pop(0))
                held = [
                    x
                    for x in oldest[: e.sequence - 1]
                    if _entry_fields(x)[:3] == (fields[0], fields[1], HELD)
                ]
                if not held:
                    fail(f"entry {e.sequence}: an expiry's release before its hold")
            else:
                got_fixed.append(e)
                steps.append(fixed[len(got_fixed) - 1].step if len(got_fixed) <= len(fixed) else -1)
        if [m.fields() for m in fixed] != [_entry_fields(e) for e in got_fixed] or any(
            floating.values()
        ):
            fail("the entries differ from the model's")
        if tuple(running) != self.model.state.accounts[key].as_tuple():
            fail("the last entry's balances are not the account's")
        await self.check_as_of(key, list(zip(stamps, steps, strict=True)), as_of_checks)

    async def check_as_of(self, key: Key, stepped: list[tuple[int, int]], checks: int) -> None:
        """GetBalance as_of an instant between two steps equals the model's balances once
        the earlier step was done.

        The instants come from the service's own clock: the times of the account's
        entries (each matched to the step that made it). For the boundary after step k,
        lo is the latest time of its entries of steps up to k and hi the earliest of
        later steps; the instant is lo itself ("at or before" it: lo's entries count),
        a midpoint strictly between, or hi - 1 microsecond (the service's precision),
        so that no instant is ambiguous. Steps whose entries share a time are skipped."""
        rng = self.check_rng
        for _ in range(checks):
            k = rng.randint(0, self.step_no)
            pick = rng.random()
            before = [us for us, step in stepped if step <= k]
            later = [us for us, step in stepped if step > k]
            lo = max(before) if before else None
            hi = min(later) if later else None
            if lo is not None and hi is not None and hi <= lo:
                self.counts["as_of: steps not apart in time"] += 1
                continue
            instants = []
            if lo is not None:
                instants.append(lo)
            if lo is not None and hi is not None:
                instants.append((lo + hi) // 2)
            if hi is not None:
                instants.append(hi - 1)
            if not instants:
                continue
            instant = instants[int(pick * len(instants))]
            response = await self.service.stub.GetBalance(
                pb.GetBalanceRequest(account=ref(*key), as_of=_timestamp(instant)),
                timeout=RPC_TIMEOUT_S,
            )
            got = (
                response.currency,
                response.debits_posted,
                response.credits_posted,
                response.debits_pending,
                response.credits_pending,
            )
            want = (self.model.state.accounts[key].currency, *self.model.balance_after_step(key, k))
            assert got == want, (
                f"GetBalance {self.names[key[0]]}/{key[1]} as_of {instant} (after step {k}: "
                f"its entries up to {lo}, the next at {hi}): {got}, expected {want}\n"
                + self.describe([])
            )
            self.counts["as_of checks"] += 1

    async def check_missing_accounts(self) -> None:
        """History and balance of an account nobody created are NOT_FOUND; the hidden
        settlement accounts cannot be addressed (ids never start with '$')."""
        for k in [*((m, GHOST) for m in self.merchants), *((u, GHOST) for u in self.unknown)]:
            for call in (
                self.service.stub.ListEntries(
                    pb.ListEntriesRequest(account=ref(*k)), timeout=RPC_TIMEOUT_S
                ),
                self.service.stub.GetBalance(
                    pb.GetBalanceRequest(account=ref(*k)), timeout=RPC_TIMEOUT_S
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                got = (caught.value.code(), error_reason(caught.value))
                assert got == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"), (
                    f"history or balance of {self.names[k[0]]}/{k[1]}: {got}"
                )
        settlement = ref("$settlement", f"{self.shards[-1]}/USD/0")
        for call in (
            self.service.stub.ListEntries(
                pb.ListEntriesRequest(account=settlement), timeout=RPC_TIMEOUT_S
            ),
            self.service.stub.GetBalance(
                pb.GetBalanceRequest(account=settlement), timeout=RPC_TIMEOUT_S
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert "account.merchant_id" in field_violations(caught.value), caught.value

    async def step(self) -> None:
        self.step_no += 1
        self.model.step_no = self.step_no
        roll = self.rng.random()
        if roll < CLOSE_SHARE:
            touched = await self.close_or_reopen()
        elif roll < CLOSE_SHARE + JOURNAL_SHARE:
            touched = await self.journal_step()
        elif roll < CLOSE_SHARE + JOURNAL_SHARE + LIMITS_SHARE:
            touched = await self.change_limits()
        else:
            resend_share = CLOSE_SHARE + JOURNAL_SHARE + LIMITS_SHARE + RESEND_BATCH_SHARE
            touched = await self.batch_step(resend=roll < resend_share and bool(self.batches))
        if self.check_rng.random() < ENTRIES_CHECK_SHARE:
            await self.check_entries(sorted(touched), as_of_checks=1)

    async def finish(self) -> None:
        """Once no saga of these merchants runs (and none is dead-lettered), every
        account is still the model's, with its entries and balances as of earlier
        steps, and per currency debits equal credits over them (posted, and pending)."""
        ours = {*self.merchants, *self.unknown}
        unfinished: list[str] = []

        async def sagas_done() -> bool:
            response = await self.admin.ListSagas(pb.ListSagasRequest(), timeout=RPC_TIMEOUT_S)
            unfinished[:] = [
                f"{s.ref.transfer_id} {pb.SagaState.Name(s.state)}"
                for s in response.sagas
                if s.ref.merchant_id in ours
            ]
            return not unfinished and not response.unreachable_shards

        await wait_until(sagas_done, what=f"every saga to finish: {unfinished}")
        await self.check_accounts([])
        await self.check_entries(list(self.model.state.accounts), as_of_checks=AS_OF_CHECKS_AT_END)
        await self.check_missing_accounts()
        totals: dict[str, list[int]] = {}
        for k, balances in (await self.balances(list(self.model.state.accounts))).items():
            total = totals.setdefault(self.model.state.accounts[k].currency, [0, 0, 0, 0])
            for i, v in enumerate(balances):
                total[i] += v
        for currency, (dp, cp, dpend, cpend) in totals.items():
            assert (dp, dpend) == (cp, cpend), (
                f"seed {self.seed}: {currency} debits {dp} posted, {dpend} pending; "
                f"credits {cp} posted, {cpend} pending"
            )


def _change_postings(request: pb.PostJournalRequest) -> bool:
    """One more (or less) minor unit on a debit and a credit of one currency: other
    postings, still balanced. False if no currency has both."""
    for currency in sorted({p.currency for p in request.postings}):
        debits = [p for p in request.postings if p.currency == currency and p.direction == DEBIT]
        credits = [p for p in request.postings if p.currency == currency and p.direction == CREDIT]
        if debits and credits:
            d, c = debits[0], credits[0]
            delta = 1 if max(d.amount_minor, c.amount_minor) < BALANCE_MAX else -1
            if min(d.amount_minor, c.amount_minor) + delta >= 1:
                d.amount_minor += delta
                c.amount_minor += delta
                return True
    return False


def _journal_refusal(error: grpc.aio.AioRpcError) -> JournalOutcome:
    """A refused PostJournal as a JournalOutcome (its status, reason and details)."""
    details = status_details(error)
    info = next((d for d in details if isinstance(d, error_details_pb2.ErrorInfo)), None)
    metadata = dict(info.metadata) if info is not None else {}
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return JournalOutcome(error.code(), field=",".join(sorted(field_violations(error))))
    return JournalOutcome(
        error.code(),
        info.reason if info is not None else "",
        replayed=metadata.get("replayed") == "true",
        field=metadata.get("field", ""),
        subjects=tuple(
            v.subject
            for d in details
            if isinstance(d, error_details_pb2.PreconditionFailure)
            for v in d.violations
        ),
        rule=metadata.get("rule_id", ""),
    )


def _copied(t: pb.Transfer) -> pb.Transfer:
    item = pb.Transfer()
    item.CopyFrom(t)
    return item


async def _run(service: Service, seed: int, shards: Sequence[str]) -> None:
    run = Run(service, seed, shards)
    await run.create()
    for _ in range(STEPS):
        await run.step()
    await run.finish()
    print(
        f"\nseed {seed}, {len(shards)} shard(s): {STEPS} steps, {dict(sorted(run.counts.items()))}"
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", _seeds())
async def test_random_transfer_batches_on_one_shard_match_the_model(
    service: Service, seed: int
) -> None:
    await _run(service, seed, ["shard-a"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", _seeds())
async def test_random_transfer_batches_across_two_shards_match_the_model(
    service: Service, seed: int
) -> None:
    """The same, with merchants on two shards: cross-shard items run as sagas."""
    await _run(service, seed, ["shard-a", "shard-b"])
