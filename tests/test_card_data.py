"""Card numbers never enter the books or the telemetry (PCI DSS 3.4).

The first test runs the service as a real process that exports its spans over OTLP to
a receiver of the test's own, sends card numbers (in every common format) in every id
and metadata field of every call, expects each call refused with INVALID_ARGUMENT
naming the field, and then searches the whole run for the numbers: the service's log
file, every span exported, and a pg_dump of every shard database. The search is a
pattern of its own (the digits with any non-alphanumeric characters between them),
not the detector under test.

The second test runs a service with LEDGER_CARD_METADATA=mask: metadata values are
stored with the card number cut to its first six and last four digits.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import Message
from opentelemetry.proto.trace.v1 import trace_pb2

from ledger.embedded.postgres import EmbeddedPostgres, find_bin_dir
from ledger.routing.config import ShardConfig
from ledger.settings import Settings
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.process_cluster import ProcessCluster
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    field_violations,
    fresh_databases,
    ref,
    start_service,
    transfer,
    transfers,
    uid,
    wait_until,
    write_config,
)
from tests.test_otlp_export import TraceReceiver, exporting_cluster

# Test numbers of several networks and lengths, as people and systems write them.
CARDS = (
    "4111111111111111",
    "4111 1111 1111 1111",
    "4111  1111  1111  1111",
    "4111-1111-1111-1111",
    "4111.1111.1111.1111",
    "4111\t1111\t1111\t1111",
    "4111 - 1111 - 1111 - 1111",
    "5555 5555 5555 4444",
    "3782 822463 10005",
    "4222222222222",
    "6011 0000 0000 0000 001",
)
# A pg_dump of one shard database takes well under this.
DUMP_TIMEOUT_S = 60.0


def found_anywhere(digits: str) -> re.Pattern[str]:
    """The digits in order, with up to four non-alphanumeric characters (or a \\t or \\n
    escape, as JSON, pg_dump and protobuf text write a tab) between any two of them."""
    separator = r"(?:\\[tn]|[^0-9A-Za-z]){0,4}"
    return re.compile(separator.join(digits))


PATTERNS = {card: found_anywhere(re.sub(r"\D", "", card)) for card in CARDS}


@dataclass
class Stack:
    receiver: TraceReceiver
    cluster: ProcessCluster

    @property
    def stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        assert self.cluster.service.stub is not None
        return self.cluster.service.stub

    @property
    def admin(self) -> ledger_pb2_grpc.LedgerAdminServiceStub:
        assert self.cluster.service.admin is not None
        return self.cluster.service.admin


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    directory = tmp_path_factory.mktemp("card-data")
    async with exporting_cluster(directory, {"LEDGER_METRICS_LISTEN": "off"}) as (
        receiver,
        cluster,
    ):
        yield Stack(receiver=receiver, cluster=cluster)


# A call that carries a value in one field: (method, request, the field it names).
Call = tuple[str, Message, str]


def every_field(payer: str, payee: str, v: str) -> list[Call]:
    """The value v in every id and metadata field of every call, one field per call."""
    cash, sales = ref(payer, "cash"), ref(payee, "sales")

    def one(**fields: object) -> pb.CreateTransfersRequest:
        base: dict[str, object] = {
            "id": uid("t"),
            "debit_account": cash,
            "credit_account": sales,
            "amount_minor": 1,
            "currency": "USD",
            "action": pb.TRANSFER_ACTION_POST,
        }
        base.update(fields)
        return pb.CreateTransfersRequest(transfers=[pb.Transfer(**base)])  # type: ignore[arg-type]

    def journal(**fields: object) -> pb.PostJournalRequest:
        base: dict[str, object] = {
            "journal_id": uid("j"),
            "merchant_id": payer,
            "postings": [
                pb.Posting(account=cash, amount_minor=1, currency="USD", direction=1),
                pb.Posting(account=ref(payer, "fees"), amount_minor=1, currency="USD", direction=2),
            ],
        }
        base.update(fields)
        return pb.PostJournalRequest(**base)  # type: ignore[arg-type]

    def new_account(**fields: object) -> pb.CreateAccountsRequest:
        base: dict[str, object] = {"ref": ref(payer, uid("a")), "currency": "USD"}
        base.update(fields)
        return pb.CreateAccountsRequest(accounts=[pb.Account(**base)])  # type: ignore[arg-type]

    settle = {
        "action": pb.TRANSFER_ACTION_VOID_PENDING,
        "credit_account": None,
        "amount_minor": 0,
        "currency": "",
    }
    return [
        ("CreateAccounts", new_account(ref=ref(v, "cash")), "accounts[0].ref.merchant_id"),
        ("CreateAccounts", new_account(ref=ref(payer, v)), "accounts[0].ref.account_id"),
        ("CreateAccounts", new_account(metadata={"pan": v}), "accounts[0].metadata['pan']"),
        ("CreateAccounts", new_account(metadata={v: "x"}), "accounts[0].metadata["),
        ("CreateTransfers", one(id=v), "transfers[0].id"),
        (
            "CreateTransfers",
            one(debit_account=ref(v, "cash")),
            "transfers[0].debit_account.merchant_id",
        ),
        (
            "CreateTransfers",
            one(debit_account=ref(payer, v)),
            "transfers[0].debit_account.account_id",
        ),
        (
            "CreateTransfers",
            one(credit_account=ref(v, "s")),
            "transfers[0].credit_account.merchant_id",
        ),
        (
            "CreateTransfers",
            one(credit_account=ref(payee, v)),
            "transfers[0].credit_account.account_id",
        ),
        ("CreateTransfers", one(**settle, pending_id=v), "transfers[0].pending_id"),
        ("CreateTransfers", one(reversal_of=v), "transfers[0].reversal_of"),
        ("CreateTransfers", one(metadata={"pan": v}), "transfers[0].metadata['pan']"),
        ("CreateTransfers", one(metadata={v: "x"}), "transfers[0].metadata["),
        ("PostJournal", journal(journal_id=v), "journal_id"),
        ("PostJournal", journal(merchant_id=v), "merchant_id"),
        ("PostJournal", journal(metadata={"pan": v}), "metadata['pan']"),
        ("PostJournal", journal(metadata={v: "x"}), "metadata["),
        (
            "PostJournal",
            journal(
                postings=[
                    pb.Posting(account=cash, amount_minor=1, currency="USD", direction=1),
                    pb.Posting(account=ref(payer, v), amount_minor=1, currency="USD", direction=2),
                ]
            ),
            "postings[1].account.account_id",
        ),
        ("LookupAccounts", pb.LookupAccountsRequest(refs=[ref(v, "cash")]), "refs[0].merchant_id"),
        ("LookupAccounts", pb.LookupAccountsRequest(refs=[ref(payer, v)]), "refs[0].account_id"),
        (
            "SetAccountsClosed",
            pb.SetAccountsClosedRequest(refs=[ref(payer, v)], closed=True),
            "refs[0].account_id",
        ),
        (
            "LookupTransfers",
            pb.LookupTransfersRequest(refs=[pb.TransferRef(merchant_id=payer, transfer_id=v)]),
            "refs[0].transfer_id",
        ),
        (
            "LookupTransfers",
            pb.LookupTransfersRequest(refs=[pb.TransferRef(merchant_id=v, transfer_id="t")]),
            "refs[0].merchant_id",
        ),
        ("ListAccounts", pb.ListAccountsRequest(merchant_id=v), "merchant_id"),
        ("GetBalance", pb.GetBalanceRequest(account=ref(payer, v)), "account.account_id"),
        ("ListEntries", pb.ListEntriesRequest(account=ref(v, "cash")), "account.merchant_id"),
        (
            "admin.GetSaga",
            pb.GetSagaRequest(
                ref=pb.SagaRef(merchant_id=payer, transfer_id=v, kind=pb.SAGA_KIND_TRANSFER)
            ),
            "ref.transfer_id",
        ),
    ]


def dump_database(server: EmbeddedPostgres, database: str) -> str:
    done = subprocess.run(
        [str(find_bin_dir() / "pg_dump"), "--dbname", server.dsn(database)],
        capture_output=True,
        text=True,
        timeout=DUMP_TIMEOUT_S,
        check=True,
    )
    return done.stdout


def assert_no_card_number(where: str, text: str) -> None:
    for card, pattern in PATTERNS.items():
        match = pattern.search(text)
        if match is not None:
            around = text[max(0, match.start() - 80) : match.end() + 80]
            raise AssertionError(f"{card!r} found in {where}: ...{around!r}...")


async def test_card_numbers_in_every_field_are_refused_and_found_nowhere(stack: Stack) -> None:
    payer = stack.cluster.merchant_on("shard-a", "payer")
    payee = stack.cluster.merchant_on("shard-b", "payee")
    await create_accounts(stack.stub, account(payer, "cash"), account(payer, "fees"))
    await create_accounts(stack.stub, account(payee, "sales"))
    # A control: a cross-shard transfer that is stored, traced and dumped, so an empty
    # dump or an exporter that sends nothing cannot pass this test.
    control_id = uid("control")
    results = await transfers(
        stack.stub, transfer(control_id, ref(payer, "cash"), ref(payee, "sales"), 7)
    )
    assert [r.result for r in results] == [pb.TRANSFER_RESULT_OK]

    trace_id = f"{secrets.randbits(128) | 1:032x}"
    calls = 0
    for card in CARDS:
        for method, request, field in every_field(payer, payee, f"ref {card} x"):
            metadata = (("traceparent", f"00-{trace_id}-{secrets.randbits(64) | 1:016x}-01"),)
            stub: object = stack.stub
            name = method
            if method.startswith("admin."):
                stub, name = stack.admin, method.removeprefix("admin.")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await getattr(stub, name)(request, timeout=RPC_TIMEOUT_S, metadata=metadata)
            calls += 1
            error = refused.value
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, field, card)
            violations = field_violations(error)
            named = [
                f for f in violations if f == field or (field.endswith("[") and f.startswith(field))
            ]
            assert named, (method, field, card, violations)
            assert "card number" in violations[named[0]], violations
            assert_no_card_number(
                f"the error of {method} {field}", repr(violations) + error.details()
            )

    async def all_traced() -> bool:
        spans = stack.receiver.in_trace(trace_id)
        return sum(1 for s in spans if s.span.kind == trace_pb2.Span.SPAN_KIND_SERVER) >= calls

    await wait_until(all_traced, what="the server span of every refused call at the receiver")

    async def control_traced() -> bool:
        return any(
            s.attributes.get("ledger.transfer_id") == control_id for s in stack.receiver.spans()
        )

    await wait_until(control_traced, what="the control transfer's spans at the receiver")
    exported = "\n".join(str(request) for request in list(stack.receiver.requests))
    assert control_id in exported
    assert_no_card_number("the exported spans", exported)

    log = stack.cluster.service.log()
    assert "serving" in log
    assert_no_card_number("the service log", log)

    dumps = {
        name: await asyncio.to_thread(dump_database, server, "ledger")
        for name, server in stack.cluster.shards.servers.items()
    }
    for name, dump in dumps.items():
        assert "COPY public.transfers" in dump, name
        assert_no_card_number(f"the dump of {name}", dump)
    assert any(control_id in dump for dump in dumps.values()), "the control is in no dump"


# --- LEDGER_CARD_METADATA=mask ---------------------------------------------------------


@pytest.fixture(scope="module")
async def masking(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    specs = fresh_databases(pg_server, ("shard-a", "shard-b"))
    path = write_config(
        tmp_path_factory.mktemp("mask") / "shards.toml", ShardConfig(epoch=1, shards=tuple(specs))
    )
    service = await start_service(path, mask_card_metadata=True)
    try:
        yield service
    finally:
        await service.stop()


async def test_with_masking_a_metadata_value_keeps_only_the_first_six_and_last_four_digits(
    masking: Service,
) -> None:
    service = masking
    m = service.merchant_on("shard-a")
    await create_accounts(
        service.stub, account(m, "cash", metadata={"pan": "card 4111 1111 1111 1111 on file"})
    )
    await create_accounts(service.stub, account(m, "wallet"))
    transfer_id = uid("t")
    results = await transfers(
        service.stub,
        transfer(
            transfer_id,
            ref(m, "cash"),
            ref(m, "wallet"),
            3,
            metadata={"pan": "4111.1111.1111.1111", "note": "no card here"},
        ),
    )
    assert [r.result for r in results] == [pb.TRANSFER_RESULT_OK]
    looked_up = await service.stub.LookupTransfers(
        pb.LookupTransfersRequest(refs=[pb.TransferRef(merchant_id=m, transfer_id=transfer_id)]),
        timeout=RPC_TIMEOUT_S,
    )
    assert dict(looked_up.transfers[0].transfer.metadata) == {
        "pan": "411111******1111",
        "note": "no card here",
    }
    accounts = await service.stub.LookupAccounts(
        pb.LookupAccountsRequest(refs=[ref(m, "cash")]), timeout=RPC_TIMEOUT_S
    )
    assert dict(accounts.accounts[0].metadata) == {"pan": "card 411111******1111 on file"}
    # Keys and ids are refused even so: masking is for metadata values only.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await transfers(
            service.stub,
            transfer(
                uid("t"), ref(m, "cash"), ref(m, "wallet"), 1, metadata={"4111111111111111": "x"}
            ),
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    for shard in service.cluster.shards.values():
        async with shard.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT metadata::text AS m FROM transfers"
                " UNION ALL SELECT metadata::text FROM accounts"
            )
        for row in rows:
            assert_no_card_number(f"{shard.name} metadata", row["m"])


def test_the_search_pattern_finds_each_format_as_stored_or_escaped() -> None:
    """The control for the search itself: it finds what it must, in the forms a log
    line, a protobuf text dump or a pg_dump write."""
    for card, pattern in PATTERNS.items():
        assert pattern.search(f"id: {card}"), card
        assert pattern.search(f'"{card.replace(chr(9), chr(92) + "t")}"'), card
    assert not PATTERNS["4111111111111111"].search("411111******1111")


def test_the_card_metadata_setting_reads_refuse_or_mask_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LEDGER_CARD_METADATA", raising=False)
    assert not Settings.from_env().mask_card_metadata
    monkeypatch.setenv("LEDGER_CARD_METADATA", "mask")
    assert Settings.from_env().mask_card_metadata
    monkeypatch.setenv("LEDGER_CARD_METADATA", "refuse")
    assert not Settings.from_env().mask_card_metadata
    monkeypatch.setenv("LEDGER_CARD_METADATA", "store")
    with pytest.raises(ValueError, match="LEDGER_CARD_METADATA"):
        Settings.from_env()
