"""Routing: the ring is stable and predictable, shards fence writes, the API refuses spans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from ledger.domain.accounts import AccountKey, AccountSpec
from ledger.domain.transfers import TransferAction, TransferRequest, TransferResult
from ledger.routing.config import ConfigError, ShardConfig, ShardSpec, parse_config
from ledger.routing.ring import ShardRing
from ledger.storage.errors import MerchantsNotOwned, StaleEpoch
from ledger.storage.shard import Fence, Shard
from ledger.v1 import ledger_pb2 as pb
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    balance,
    count_rows,
    create_accounts,
    error_reason,
    ref,
    result_names,
    status_details,
    transfer,
    transfers,
    uid,
)

NAMES = ("shard-a", "shard-b", "shard-c")
# Subprocesses only import the ring; this bounds each so a hang fails the test.
SUBPROCESS_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def _config(
    names: tuple[str, ...] = NAMES, *, host: str = "db", weights: dict[str, int] | None = None
) -> ShardConfig:
    weights = weights or {}
    return ShardConfig(
        epoch=1,
        shards=tuple(
            ShardSpec(
                name=n,
                dsn=f"postgresql://ledger@{host}:5432/{n.replace('-', '_')}",
                weight=weights.get(n, 1),
            )
            for n in names
        ),
    )


def _merchants(count: int) -> list[str]:
    return [f"merchant-{i:05d}" for i in range(count)]


_SUBPROCESS_CODE = """
import json, sys
from ledger.routing.config import ShardConfig, ShardSpec
from ledger.routing.ring import ShardRing
names, merchants = json.load(sys.stdin)
config = ShardConfig(epoch=1, shards=tuple(
    ShardSpec(name=n, dsn="postgresql://ledger@db:5432/x", weight=1) for n in names))
ring = ShardRing(config)
json.dump([ring.shard_for(m) for m in merchants], sys.stdout)
"""


def _shards_in_subprocess(merchants: list[str], hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_CODE],
        input=json.dumps([list(NAMES), merchants]),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=True,
    )
    result: list[str] = json.loads(completed.stdout)
    return result


# --- The ring. ---


def test_shard_for_is_identical_across_processes_with_different_hash_seeds() -> None:
    merchants = [uid("m") for _ in range(200)]
    ring = ShardRing(_config())
    here = [ring.shard_for(m) for m in merchants]
    assert set(here) == set(NAMES), "200 merchants should reach every shard"
    assert _shards_in_subprocess(merchants, "1") == here
    assert _shards_in_subprocess(merchants, "4242") == here


def test_changed_dsns_with_same_names_move_no_merchant() -> None:
    merchants = _merchants(2000)
    before = ShardRing(_config(host="old-host"))
    after = ShardRing(_config(host="new-host.internal"))
    assert [before.shard_for(m) for m in merchants] == [after.shard_for(m) for m in merchants]


def test_adding_a_fourth_shard_moves_about_a_quarter_and_only_to_it() -> None:
    merchants = _merchants(2000)
    before = ShardRing(_config())
    after = ShardRing(_config((*NAMES, "shard-d")))
    moved = {m: after.shard_for(m) for m in merchants if before.shard_for(m) != after.shard_for(m)}
    assert 0.15 * len(merchants) <= len(moved) <= 0.35 * len(merchants), len(moved)
    assert set(moved.values()) == {"shard-d"}


def test_weights_skew_the_distribution_toward_the_heavier_shard() -> None:
    merchants = _merchants(2000)
    even = Counter(ShardRing(_config()).shard_for(m) for m in merchants)
    skewed = Counter(ShardRing(_config(weights={"shard-a": 4})).shard_for(m) for m in merchants)
    assert max(even.values()) < 0.45 * len(merchants), even
    # Weight 4 of 6 is two thirds of the ring; allow hashing noise around it.
    assert skewed["shard-a"] > 0.55 * len(merchants), skewed
    assert skewed["shard-a"] > 2 * max(skewed["shard-b"], skewed["shard-c"]), skewed


# --- Config parsing. ---

_GOOD_SHARD = '[[shards]]\nname = "shard-a"\ndsn = "postgresql://h/a"\nweight = 1\n'


def test_config_parses_a_valid_file() -> None:
    config = parse_config("epoch = 3\n" + _GOOD_SHARD)
    assert config.epoch == 3
    assert config.shards == (ShardSpec(name="shard-a", dsn="postgresql://h/a", weight=1),)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("epoch = 1\n" + _GOOD_SHARD + _GOOD_SHARD, "name"),
        ("epoch = 0\n" + _GOOD_SHARD, "epoch"),
        ('epoch = 1\n[[shards]]\nname = "a"\ndsn = "postgresql://h/a"\nweight = 0\n', "weight"),
        ('epoch = 1\n[[shards]]\nname = "a"\ndsn = "postgresql://h/a"\nweight = "2"\n', "weight"),
        ('epoch = 1\n[[shards]]\nname = "a"\ndsn = "mysql://h/a"\n', "dsn"),
    ],
    ids=["duplicate-names", "epoch-zero", "weight-zero", "weight-string", "mysql-dsn"],
)
def test_config_refuses_bad_field_and_names_it(text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_config(text, source="shards.toml")


# --- Shard-level fencing. ---


async def _merchant_rows(shard: Shard, merchant_id: str) -> dict[str, int]:
    counts = {}
    async with shard.pool.acquire() as conn:
        for table in ("merchants", "accounts", "transfers", "entries"):
            counts[table] = int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {table} WHERE merchant_id = $1", merchant_id
                )
            )
    return counts


def _other_shard(service: Service, merchant_id: str) -> Shard:
    home = service.ring.shard_for(merchant_id)
    name = next(n for n in NAMES if n != home)
    return service.cluster.shards[name]


def _local_transfer(merchant_id: str) -> TransferRequest:
    return TransferRequest(
        id=uid("t"),
        debit=AccountKey(merchant_id, "cash"),
        credit=AccountKey(merchant_id, "wallet"),
        amount_minor=10,
        currency="USD",
        action=TransferAction.POST,
    )


async def test_other_shard_refuses_writes_for_a_merchant_it_does_not_own(service: Service) -> None:
    merchant = service.merchant_on("shard-a")
    await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "wallet"))
    other = _other_shard(service, merchant)
    fence = service.cluster.fence(other, {merchant})
    assert fence.claimable == frozenset()

    with pytest.raises(MerchantsNotOwned) as refused:
        await other.create_transfers([_local_transfer(merchant)], fence)
    assert refused.value.owners == {merchant: None}
    with pytest.raises(MerchantsNotOwned):
        await other.create_accounts(
            [AccountSpec(key=AccountKey(merchant, "extra"), currency="USD")], fence
        )
    assert await _merchant_rows(other, merchant) == {
        "merchants": 0,
        "accounts": 0,
        "transfers": 0,
        "entries": 0,
    }


async def test_shard_refuses_a_fence_behind_its_epoch_and_claims_for_one_ahead(
    service: Service,
) -> None:
    """A caller behind the shard must reload. A caller ahead (its config is newer,
    the rebalance to it has not started) may write what the shard owns now, but
    claims nothing: an unknown merchant waits for the rebalance."""
    merchant = service.merchant_on("shard-b")
    await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "wallet"))
    home = service.cluster.shard_for(merchant)
    behind = Fence(epoch=service.cluster.epoch - 1, claimable=frozenset({merchant}))
    with pytest.raises(StaleEpoch):
        await home.create_transfers([_local_transfer(merchant)], behind)
    assert (await _merchant_rows(home, merchant))["transfers"] == 0

    unknown = service.merchant_on("shard-b", prefix="new")
    ahead = Fence(epoch=service.cluster.epoch + 1, claimable=frozenset({merchant, unknown}))
    with pytest.raises(StaleEpoch):
        await home.create_accounts(
            [AccountSpec(key=AccountKey(unknown, "cash"), currency="USD")], ahead
        )
    assert (await _merchant_rows(home, unknown))["merchants"] == 0
    outcomes = await home.create_transfers([_local_transfer(merchant)], ahead)
    assert [o.result for o in outcomes] == [TransferResult.OK]
    assert (await _merchant_rows(home, merchant))["transfers"] == 1


async def test_shard_refuses_writes_for_a_merchant_marked_moved_and_names_new_owner(
    service: Service,
) -> None:
    # A throwaway merchant: it stays 'moved' on its shard after this test.
    merchant = service.merchant_on("shard-c", prefix="moved")
    await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "wallet"))
    home = service.cluster.shard_for(merchant)
    async with home.pool.acquire() as conn:
        status = await conn.execute(
            "UPDATE merchants SET state = 'moved', moved_to = 'shard-x' WHERE merchant_id = $1",
            merchant,
        )
    assert status == "UPDATE 1"
    fence = service.cluster.fence(home, {merchant})
    assert fence.claimable == frozenset({merchant})

    with pytest.raises(MerchantsNotOwned) as refused:
        await home.create_transfers([_local_transfer(merchant)], fence)
    assert refused.value.owners == {merchant: "shard-x"}
    with pytest.raises(MerchantsNotOwned) as refused_accounts:
        await home.create_accounts(
            [AccountSpec(key=AccountKey(merchant, "extra"), currency="USD")], fence
        )
    assert refused_accounts.value.owners == {merchant: "shard-x"}
    rows = await _merchant_rows(home, merchant)
    assert rows == {"merchants": 1, "accounts": 2, "transfers": 0, "entries": 0}


# --- Through the API. ---


def _precondition_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    return [
        v.subject
        for d in status_details(error)
        if isinstance(d, error_details_pb2.PreconditionFailure)
        for v in d.violations
    ]


async def _history_rows(service: Service) -> tuple[int, int]:
    return await count_rows(service, "transfers"), await count_rows(service, "entries")


async def _refused_whole(service: Service, *items: pb.Transfer) -> grpc.aio.AioRpcError:
    """Sends a batch whose chain spans shards: refused whole, nothing written."""
    before = await _history_rows(service)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await transfers(service.stub, *items)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "LINKED_CHAIN_SPANS_SHARDS"
    assert await _history_rows(service) == before
    return refused.value


async def test_cross_shard_item_in_a_batch_runs_as_a_saga_beside_the_local_items(
    service: Service,
) -> None:
    on_a, on_b = service.merchant_on("shard-a"), service.merchant_on("shard-b")
    await create_accounts(
        service.stub, account(on_a, "cash"), account(on_a, "wallet"), account(on_b, "wallet")
    )
    results = await transfers(
        service.stub,
        transfer(uid("t"), ref(on_a, "cash"), ref(on_a, "wallet"), 5),
        transfer(uid("t"), ref(on_a, "cash"), ref(on_b, "wallet"), 7),
        transfer(uid("t"), ref(on_a, "wallet"), ref(on_a, "cash"), 1),
    )
    assert [r.result for r in results] == [pb.TRANSFER_RESULT_OK] * 3
    assert (await balance(service.stub, on_b, "wallet")).credits_posted == 7
    assert (await balance(service.stub, on_a, "cash")).debits_posted == 12


async def test_cross_shard_transfer_inside_a_linked_chain_is_refused_and_nothing_is_written(
    service: Service,
) -> None:
    on_a, on_b = service.merchant_on("shard-a"), service.merchant_on("shard-b")
    await create_accounts(
        service.stub, account(on_a, "cash"), account(on_a, "wallet"), account(on_b, "wallet")
    )
    refused = await _refused_whole(
        service,
        transfer(uid("t"), ref(on_a, "cash"), ref(on_a, "wallet"), 5, linked=True),
        transfer(uid("t"), ref(on_a, "cash"), ref(on_b, "wallet"), 7),
    )
    assert _precondition_subjects(refused) == ["transfers[0]", "transfers[1]"]


async def test_linked_chain_across_shards_is_refused_and_nothing_is_written(
    service: Service,
) -> None:
    on_a, on_c = service.merchant_on("shard-a"), service.merchant_on("shard-c")
    await create_accounts(
        service.stub,
        account(on_a, "cash"),
        account(on_a, "wallet"),
        account(on_c, "cash"),
        account(on_c, "wallet"),
    )
    await _refused_whole(
        service,
        transfer(uid("t"), ref(on_a, "cash"), ref(on_a, "wallet"), 5, linked=True),
        transfer(uid("t"), ref(on_c, "cash"), ref(on_c, "wallet"), 5),
    )


async def test_open_linked_chain_across_shards_at_the_batch_end_is_refused_and_nothing_is_written(
    service: Service,
) -> None:
    # Found by tests/test_ledger_model.py: a chain left open at the end of the batch
    # was not checked, and each shard stored its part as LINKED_EVENT_CHAIN_OPEN.
    on_a, on_b = service.merchant_on("shard-a"), service.merchant_on("shard-b")
    await create_accounts(
        service.stub,
        account(on_a, "cash"),
        account(on_a, "wallet"),
        account(on_b, "cash"),
        account(on_b, "wallet"),
    )
    for second in (
        transfer(uid("t"), ref(on_a, "cash"), ref(on_b, "wallet"), 7, linked=True),
        transfer(uid("t"), ref(on_b, "cash"), ref(on_b, "wallet"), 7, linked=True),
    ):
        refused = await _refused_whole(
            service,
            transfer(uid("t"), ref(on_a, "cash"), ref(on_a, "wallet"), 5, linked=True),
            second,
        )
        assert _precondition_subjects(refused) == ["transfers[0]", "transfers[1]"]


async def test_items_of_a_batch_that_depend_on_a_cross_shard_item_are_applied_after_it(
    service: Service,
) -> None:
    # Found by tests/test_ledger_model.py: a batch's sagas ran beside its local items,
    # so an item was decided before an earlier cross-shard item it depends on.
    on_a, on_b = service.merchant_on("shard-a"), service.merchant_on("shard-b")
    await create_accounts(
        service.stub,
        account(on_a, "bank"),
        account(on_a, "wallet", no_overdraft=True),
        account(on_a, "sales"),
        account(on_b, "cash"),
        account(on_b, "sales"),
    )
    [funded] = await transfers(
        service.stub, transfer(uid("t"), ref(on_a, "bank"), ref(on_a, "wallet"), 400)
    )
    assert funded.result == pb.TRANSFER_RESULT_OK
    hold = uid("h")
    results = await transfers(
        service.stub,
        # Spends the wallet's 400 across shards: the local spend after it must fail.
        transfer(uid("t"), ref(on_a, "wallet"), ref(on_b, "sales"), 400),
        transfer(uid("t"), ref(on_a, "wallet"), ref(on_a, "sales"), 400),
        # A hold across shards, then its post in the same call.
        transfer(
            hold, ref(on_b, "cash"), ref(on_a, "sales"), 100, action=pb.TRANSFER_ACTION_PENDING
        ),
        transfer(
            uid("t"),
            ref(on_b, "cash"),
            None,
            100,
            action=pb.TRANSFER_ACTION_POST_PENDING,
            pending_id=hold,
        ),
        # Credits the empty wallet across shards, then spends it locally.
        transfer(uid("t"), ref(on_b, "cash"), ref(on_a, "wallet"), 250),
        transfer(uid("t"), ref(on_a, "wallet"), ref(on_a, "sales"), 250),
    )
    assert result_names(results) == [
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_EXCEEDS_CREDITS",
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_OK",
    ]
    wallet = await balance(service.stub, on_a, "wallet")
    assert (wallet.credits_posted, wallet.debits_posted) == (650, 650)
    sales = await balance(service.stub, on_a, "sales")
    assert (sales.credits_posted, sales.credits_pending) == (350, 0)


async def test_batch_over_all_three_shards_gets_per_item_results_in_request_order(
    service: Service,
) -> None:
    merchants = {name: service.merchant_on(name) for name in NAMES}
    for m in merchants.values():
        await create_accounts(
            service.stub,
            account(m, "cash"),
            account(m, "wallet", no_overdraft=True),
        )
    a, b, c = merchants["shard-a"], merchants["shard-b"], merchants["shard-c"]
    items = [
        transfer(uid("t"), ref(c, "cash"), ref(c, "wallet"), 30),
        transfer(uid("t"), ref(a, "wallet"), ref(a, "cash"), 1),  # a's wallet is empty
        transfer(uid("t"), ref(b, "cash"), ref(b, "wallet"), 20),
        transfer(uid("t"), ref(a, "cash"), ref(a, "nowhere"), 1),
        transfer(uid("t"), ref(a, "cash"), ref(a, "wallet"), 10),
        transfer(uid("t"), ref(c, "wallet"), ref(c, "cash"), 5),
    ]
    response = await service.stub.CreateTransfers(
        pb.CreateTransfersRequest(transfers=items), timeout=RPC_TIMEOUT_S
    )
    results = list(response.results)
    assert [r.index for r in results] == list(range(len(items)))
    assert [r.id for r in results] == [t.id for t in items]
    assert result_names(results) == [
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_EXCEEDS_CREDITS",
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND",
        "TRANSFER_RESULT_OK",
        "TRANSFER_RESULT_OK",
    ]
    wallets = {name: await balance(service.stub, m, "wallet") for name, m in merchants.items()}
    net = {n: w.credits_posted - w.debits_posted for n, w in wallets.items()}
    assert net == {"shard-a": 10, "shard-b": 20, "shard-c": 25}
