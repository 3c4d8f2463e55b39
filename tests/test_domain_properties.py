"""Property tests of the pure ledger rules (ledger.domain.engine), no database involved.

A small in-memory store carries state between batches the way a shard does, so
hypothesis can throw long random sequences of transfers at the rules.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.domain.accounts import Account, AccountKey, AccountSpec, Balances
from ledger.domain.chain import GENESIS_HASH, chained_entry
from ledger.domain.engine import (
    PendingView,
    TransferBatchState,
    advanced,
    apply_transfers,
    expire_pending,
)
from ledger.domain.sagas import relay_plan
from ledger.domain.transfers import (
    Direction,
    Entry,
    EntryKind,
    PendingState,
    TransferAction,
    TransferKey,
    TransferRecord,
    TransferRequest,
    TransferResult,
)
from ledger.limits import AMOUNT_MINOR_MAX

MERCHANT = "m"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Store:
    """What a shard keeps, in memory."""

    def __init__(self, specs: list[AccountSpec]) -> None:
        self.accounts = {
            s.key: Account(
                s,
                closed=False,
                balances=Balances(),
                entry_count=0,
                created_at=T0,
                head_hash=GENESIS_HASH,
            )
            for s in specs
        }
        self.records: dict[TransferKey, TransferRecord] = {}
        self.states: dict[TransferKey, PendingState] = {}
        self.entries: dict[AccountKey, list[tuple[Direction, EntryKind, int, Balances]]] = {
            k: [] for k in self.accounts
        }
        self.now = T0
        self.heads: dict[AccountKey, bytes] = {}

    def apply(self, requests: list[TransferRequest]) -> list[TransferResult]:
        self.now += timedelta(milliseconds=10)
        pendings = {
            k: PendingView(r, self.states.get(k, PendingState.PENDING))
            for k, r in self.records.items()
            if r.request.action is TransferAction.PENDING
        }
        reversed_minor: dict[TransferKey, int] = {}
        for r in self.records.values():
            if r.request.reversal_of and r.result is TransferResult.OK:
                target = TransferKey(MERCHANT, r.request.reversal_of)
                reversed_minor[target] = reversed_minor.get(target, 0) + r.amount_effective_minor
        state = TransferBatchState(
            accounts=self.accounts,
            existing={r.key: self.records[r.key] for r in requests if r.key in self.records},
            taken_by_journal=frozenset(),
            pendings=pendings,
            reversal_targets=dict(self.records),
            reversed_minor=reversed_minor,
            now=self.now,
        )
        plan = apply_transfers(requests, state)
        for record in plan.records:
            assert record.key not in self.records, "a recorded id is never recorded twice"
            self.records[record.key] = record
        for resolution in plan.resolutions:
            assert resolution.pending not in self.states, "a pending transfer ends once"
            self.states[resolution.pending] = resolution.state
        self.record_entries(plan.entries)
        for key, account_state in plan.accounts.items():
            self.accounts[key] = advanced(self.accounts[key], account_state)
        return [o.result for o in plan.outcomes]

    def expire_due(self, advance: timedelta) -> None:
        self.now += advance
        for key, record in list(self.records.items()):
            if (
                record.request.action is TransferAction.PENDING
                and record.result is TransferResult.OK
                and key not in self.states
                and record.expires_at is not None
                and record.expires_at <= self.now
            ):
                plan = expire_pending(record, self.accounts, self.now)
                self.states[key] = PendingState.EXPIRED
                self.record_entries(plan.entries)
                for account_key, s in plan.accounts.items():
                    self.accounts[account_key] = advanced(self.accounts[account_key], s)

    def record_entries(self, entries: list[Entry]) -> None:
        for entry in entries:
            log = self.entries[entry.account]
            assert entry.sequence == len(log) + 1, "entry sequences have no gaps"
            previous = self.heads.get(entry.account, GENESIS_HASH)
            rehashed = chained_entry(
                previous,
                account=entry.account,
                sequence=entry.sequence,
                transfer=entry.transfer,
                direction=entry.direction,
                kind=entry.kind,
                amount_minor=entry.amount_minor,
                balances_after=entry.balances_after,
                created_at=entry.created_at,
            )
            assert entry.hash == rehashed.hash, "each entry chains from its account's last one"
            self.heads[entry.account] = entry.hash
            log.append((entry.direction, entry.kind, entry.amount_minor, entry.balances_after))

    def check_invariants(self) -> None:
        per_currency: dict[str, list[int]] = {}
        for account in self.accounts.values():
            b = account.balances
            assert b.fits(), "balances stay within bigint and never go negative"
            totals = per_currency.setdefault(account.spec.currency, [0, 0])
            totals[0] += b.credits_posted - b.debits_posted
            totals[1] += b.credits_pending - b.debits_pending
            assert account.head_hash == self.heads.get(account.key, GENESIS_HASH), (
                "an account's head is the hash of its last entry"
            )
            if account.spec.debits_must_not_exceed_credits:
                assert b.debits_posted + b.debits_pending <= b.credits_posted
            if account.spec.credits_must_not_exceed_debits:
                assert b.credits_posted + b.credits_pending <= b.debits_posted
            replayed = Balances()
            for direction, kind, amount, after in self.entries[account.key]:
                replayed = _step(replayed, direction, kind, amount)
                assert replayed == after, "each entry's balances follow from the previous"
            assert replayed == b, "an account's entries add up to its balances"
        for currency, (posted, pending) in per_currency.items():
            assert posted == 0, f"posted sums to zero in {currency}"
            assert pending == 0, f"pending sums to zero in {currency}"


def _step(b: Balances, direction: Direction, kind: EntryKind, amount: int) -> Balances:
    debit = direction is Direction.DEBIT
    if kind is EntryKind.POSTED:
        return (
            replace(b, debits_posted=b.debits_posted + amount)
            if debit
            else replace(b, credits_posted=b.credits_posted + amount)
        )
    sign = 1 if kind is EntryKind.PENDING else -1
    return (
        replace(b, debits_pending=b.debits_pending + sign * amount)
        if debit
        else replace(b, credits_pending=b.credits_pending + sign * amount)
    )


ACCOUNT_IDS = [f"a{i}" for i in range(5)]
CURRENCIES = ["USD", "EUR"]

account_specs = st.lists(
    st.tuples(st.sampled_from(CURRENCIES), st.sampled_from(["none", "no_overdraft", "no_credit"])),
    min_size=len(ACCOUNT_IDS),
    max_size=len(ACCOUNT_IDS),
).map(
    lambda rows: [
        AccountSpec(
            key=AccountKey(MERCHANT, account_id),
            currency=currency,
            debits_must_not_exceed_credits=flag == "no_overdraft",
            credits_must_not_exceed_debits=flag == "no_credit",
        )
        for account_id, (currency, flag) in zip(ACCOUNT_IDS, rows, strict=True)
    ]
)

amounts = st.one_of(
    st.integers(min_value=1, max_value=1_000),
    st.sampled_from([AMOUNT_MINOR_MAX, AMOUNT_MINOR_MAX // 2 + 1]),
)


@st.composite
def transfer_batches(draw: st.DrawFn) -> list[list[dict[str, object]]]:
    batch_count = draw(st.integers(min_value=1, max_value=8))
    return [
        draw(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "action": st.sampled_from(list(TransferAction)),
                        "debit": st.sampled_from(ACCOUNT_IDS),
                        "credit": st.sampled_from(ACCOUNT_IDS),
                        "amount": amounts,
                        "currency": st.sampled_from(CURRENCIES),
                        "linked": st.booleans(),
                        "target": st.integers(min_value=0, max_value=30),
                        "timeout_ms": st.sampled_from([0, 0, 5, 50]),
                        "reverse": st.booleans(),
                        "replay": st.integers(min_value=0, max_value=40),
                    }
                ),
                min_size=1,
                max_size=12,
            )
        )
        for _ in range(batch_count)
    ]


def _requests(raw: list[dict[str, object]], serial: int, known: list[str]) -> list[TransferRequest]:
    requests = []
    for index, item in enumerate(raw):
        action = item["action"]
        assert isinstance(action, TransferAction)
        target = known[int(item["target"]) % len(known)] if known else "none"  # type: ignore[call-overload]
        replay = int(item["replay"])  # type: ignore[call-overload]
        if known and replay < 3 and known[replay % len(known)] not in {r.id for r in requests}:
            transfer_id = known[replay % len(known)]
        else:
            transfer_id = f"t{serial}-{index}"
        settles = action in (TransferAction.POST_PENDING, TransferAction.VOID_PENDING)
        requests.append(
            TransferRequest(
                id=transfer_id,
                debit=AccountKey(MERCHANT, str(item["debit"])),
                credit=None if settles else AccountKey(MERCHANT, str(item["credit"])),
                amount_minor=0 if action is TransferAction.VOID_PENDING else int(item["amount"]),  # type: ignore[call-overload]
                currency="" if settles else str(item["currency"]),
                action=action,
                pending_id=target if settles else "",
                timeout_ms=int(item["timeout_ms"]) if action is TransferAction.PENDING else 0,  # type: ignore[call-overload]
                linked=bool(item["linked"]),
                reversal_of=target if action is TransferAction.POST and item["reverse"] else "",
            )
        )
    return requests


@settings(max_examples=300, deadline=None)
@given(specs=account_specs, batches=transfer_batches(), funding=st.integers(0, 5_000))
def test_accepted_transfers_keep_every_currency_balanced_and_limits_hold(
    specs: list[AccountSpec], batches: list[list[dict[str, object]]], funding: int
) -> None:
    store = Store(specs)
    # Fund no-overdraft accounts from a plain account of the same currency, if any.
    for spec in specs:
        source = next(
            (
                s
                for s in specs
                if s.currency == spec.currency
                and s.key != spec.key
                and not s.debits_must_not_exceed_credits
                and not s.credits_must_not_exceed_debits
            ),
            None,
        )
        if spec.debits_must_not_exceed_credits and source is not None and funding:
            store.apply(
                [
                    TransferRequest(
                        f"fund-{spec.key.account_id}",
                        source.key,
                        spec.key,
                        funding,
                        spec.currency,
                        TransferAction.POST,
                    )
                ]
            )
    store.check_invariants()
    known: list[str] = [k.transfer_id for k in store.records]
    for serial, raw in enumerate(batches):
        requests = _requests(raw, serial, known)
        before = {k: (v.balances, v.entry_count) for k, v in store.accounts.items()}
        results = store.apply(requests)
        assert len(results) == len(requests)
        _check_chains(requests, results)
        if all(r is not TransferResult.OK for r in results):
            assert {k: (v.balances, v.entry_count) for k, v in store.accounts.items()} == before, (
                "a batch with no success changes no account"
            )
        store.check_invariants()
        known += [r.id for r in requests]
        store.expire_due(timedelta(milliseconds=20))
        store.check_invariants()


def _check_chains(requests: list[TransferRequest], results: list[TransferResult]) -> None:
    """Members of a linked chain all succeed or all fail."""
    start = 0
    for index, request in enumerate(requests):
        if request.linked and index < len(requests) - 1:
            continue
        chain = results[start : index + 1]
        oks = [r is TransferResult.OK for r in chain]
        assert all(oks) or not any(oks), f"chain {start}..{index} split: {chain}"
        start = index + 1


def test_failed_transfer_id_stays_failed_even_when_a_retry_could_succeed() -> None:
    spec_a = AccountSpec(AccountKey(MERCHANT, "a"), "USD", debits_must_not_exceed_credits=True)
    spec_b = AccountSpec(AccountKey(MERCHANT, "b"), "USD")
    store = Store([spec_a, spec_b])
    overdraw = TransferRequest("t1", spec_a.key, spec_b.key, 100, "USD", TransferAction.POST)
    assert store.apply([overdraw]) == [TransferResult.EXCEEDS_CREDITS]
    store.apply([TransferRequest("fund", spec_b.key, spec_a.key, 500, "USD", TransferAction.POST)])
    assert store.apply([overdraw]) == [TransferResult.EXCEEDS_CREDITS]
    assert store.accounts[spec_a.key].balances.debits_posted == 0


def test_partial_post_releases_the_rest_of_the_pending_amount() -> None:
    a, b = AccountKey(MERCHANT, "a"), AccountKey(MERCHANT, "b")
    store = Store([AccountSpec(a, "USD"), AccountSpec(b, "USD")])
    assert store.apply([TransferRequest("p", a, b, 100, "USD", TransferAction.PENDING)]) == [
        TransferResult.OK
    ]
    post = TransferRequest("s", a, None, 60, "", TransferAction.POST_PENDING, pending_id="p")
    assert store.apply([post]) == [TransferResult.OK]
    assert store.accounts[a].balances == Balances(debits_posted=60)
    assert store.accounts[b].balances == Balances(credits_posted=60)
    again = TransferRequest("s2", a, None, 0, "", TransferAction.VOID_PENDING, pending_id="p")
    assert store.apply([again]) == [TransferResult.PENDING_TRANSFER_ALREADY_POSTED]
    store.check_invariants()


def test_a_duplicate_id_within_one_batch_replays_the_first_and_moves_money_once() -> None:
    a, b = AccountKey(MERCHANT, "a"), AccountKey(MERCHANT, "b")
    store = Store([AccountSpec(a, "USD"), AccountSpec(b, "USD")])
    item = TransferRequest("dup", a, b, 10, "USD", TransferAction.POST)
    changed = replace(item, amount_minor=11)
    plan_results = store.apply([item, item, changed])
    assert plan_results == [
        TransferResult.OK,
        TransferResult.OK,
        TransferResult.EXISTS_WITH_DIFFERENT_FIELDS,
    ]
    assert store.accounts[b].balances.credits_posted == 10
    store.check_invariants()


def _settlement(account_id: str, balances: Balances) -> Account:
    spec = AccountSpec(AccountKey("$settlement", account_id), "USD")
    return Account(spec, False, balances, 0, T0, GENESIS_HASH)


def _replayed(entries: list[Entry]) -> dict[AccountKey, Balances]:
    """Each account's balances after its entries, from what the entries say."""
    found: dict[AccountKey, Balances] = {}
    for e in entries:
        b = found.get(e.account, Balances())
        sign = -1 if e.kind is EntryKind.PENDING_RELEASED else 1
        if e.kind is EntryKind.POSTED and e.direction is Direction.DEBIT:
            b = replace(b, debits_posted=b.debits_posted + e.amount_minor)
        elif e.kind is EntryKind.POSTED:
            b = replace(b, credits_posted=b.credits_posted + e.amount_minor)
        elif e.direction is Direction.DEBIT:
            b = replace(b, debits_pending=b.debits_pending + sign * e.amount_minor)
        else:
            b = replace(b, credits_pending=b.credits_pending + sign * e.amount_minor)
        found[e.account] = b
    return found


@given(
    pending_minor=st.integers(min_value=1, max_value=10**12),
    posted_share=st.fractions(min_value=0, max_value=1),
    same_account=st.booleans(),
)
def test_a_relay_hop_settles_both_sides_even_through_one_account(
    pending_minor: int, posted_share: object, same_account: bool
) -> None:
    """A hold that came back the way it went is relayed by one settlement account
    holding both sides: its entries must chain and add up like two accounts'."""
    posted_minor = int(pending_minor * posted_share)  # type: ignore[operator]
    held_in = Balances(debits_pending=pending_minor)
    held_out = Balances(credits_pending=pending_minor)
    incoming = _settlement("shard-b/USD/3", held_in)
    outgoing = (
        _settlement("shard-b/USD/3", replace(held_in, credits_pending=pending_minor))
        if same_account
        else _settlement("shard-c/USD/3", held_out)
    )
    if same_account:
        incoming = outgoing
    entries, states = relay_plan(
        key=TransferKey("m", "settle-1"),
        incoming=incoming,
        outgoing=outgoing,
        pending_minor=pending_minor,
        posted_minor=posted_minor,
        now=T0,
    )
    after = {k: s.balances for k, s in states.items()}
    if same_account:
        assert after == {
            incoming.key: Balances(debits_posted=posted_minor, credits_posted=posted_minor)
        }
    else:
        assert after == {
            incoming.key: Balances(debits_posted=posted_minor),
            outgoing.key: Balances(credits_posted=posted_minor),
        }
    start = {a.key: a.balances for a in (incoming, outgoing)}
    deltas = _replayed(entries)
    for key, b in after.items():
        d, s0 = deltas[key], start[key]
        assert b == Balances(
            s0.debits_posted + d.debits_posted,
            s0.credits_posted + d.credits_posted,
            s0.debits_pending + d.debits_pending,
            s0.credits_pending + d.credits_pending,
        )
    # Each account's entries chain in sequence from its head.
    for key in after:
        mine = [e for e in entries if e.account == key]
        assert [e.sequence for e in mine] == list(range(1, len(mine) + 1))
        assert mine[-1].hash == states[key].head_hash
