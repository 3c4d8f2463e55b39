"""Tamper evidence anchored outside the shard database (issue 23, item 2).

The insider here has write access to a shard database and nothing else: they
rewrite a transfer's amount in its row and both entries, recompute every chain
hash with the plain SHA-256 the service uses, and fix the account rows, the
checkpoint heads and the checkpoint digests, all in the same database. Before
the checkpoint key and the export, `ledger verify` passed that forgery; now the
MACs (keyed with a secret the database never sees) and the exported checkpoints
name it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ledger.api.server import LedgerServer
from ledger.core.checkpoints import ChainCheckpointer, verify_against_export
from ledger.domain.chain import GENESIS_HASH, checkpoint_digest, checkpoint_mac
from ledger.domain.checkpoint_keys import CheckpointKeys
from ledger.embedded.postgres import EmbeddedPostgres
from ledger.routing.cluster import Cluster
from ledger.routing.config import ShardConfig, load_config
from ledger.sagas.reconcile import reconcile
from ledger.settings import SettingsError, checkpoint_keys_from_env
from ledger.storage.chain import ChainStore
from ledger.storage.checkpoint_export import CheckpointExport
from ledger.storage.shard import Shard
from ledger.telemetry import metrics
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.auth_support import child_env, run_cli
from tests.support import (
    RPC_TIMEOUT_S,
    Service,
    account,
    create_accounts,
    fresh_databases,
    ref,
    result_names,
    transfer,
    transfers,
    uid,
    write_config,
)

SHARDS = ("shard-a", "shard-b")
KEY = b"test-checkpoint-key-32-bytes-ok!"
KEYS = CheckpointKeys(KEY)
TRANSFERS = 4
FORGED_AMOUNT_MINOR = 99_999


@pytest.fixture
async def anchored(
    pg_server: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    """A service with a checkpoint key and an export directory, on shards of its own."""
    directory = tmp_path_factory.mktemp("anchor")
    specs = fresh_databases(pg_server, SHARDS)
    path = write_config(directory / "shards.toml", ShardConfig(epoch=1, shards=tuple(specs)))
    cluster = Cluster(load_config(path), config_path=path)
    await cluster.open()
    server = LedgerServer(
        cluster,
        listen="127.0.0.1:0",
        checkpoint_keys=KEYS,
        checkpoint_export_dir=directory / "export",
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    service = Service(
        cluster=cluster,
        server=server,
        channel=channel,
        stub=ledger_pb2_grpc.LedgerServiceStub(channel),
        config_path=path,
        extra={"export": directory / "export"},
    )
    try:
        yield service
    finally:
        await service.stop()


def export_of(service: Service) -> CheckpointExport:
    directory = service.extra["export"]
    assert isinstance(directory, Path)
    return CheckpointExport(directory)


async def books(service: Service) -> tuple[str, list[str], Shard]:
    merchant = service.merchant_on("shard-a")
    await create_accounts(service.stub, account(merchant, "cash"), account(merchant, "wallet"))
    ids = [uid("t") for _ in range(TRANSFERS)]
    for n, transfer_id in enumerate(ids):
        answer = await transfers(
            service.stub,
            transfer(transfer_id, ref(merchant, "cash"), ref(merchant, "wallet"), 100 + n),
        )
        assert result_names(answer) == ["TRANSFER_RESULT_OK"]
    return merchant, ids, service.cluster.shards["shard-a"]


# The insider's re-hash: every entry of the account again, with the service's
# own SQL encoding, then the head; then the checkpoint heads from the entries.
_REHASH_ACCOUNT = """
DO $$
DECLARE
    e entries;
    head bytea := '\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
BEGIN
    FOR e IN SELECT * FROM entries WHERE merchant_id = '{merchant}' AND account_id = '{account}'
             ORDER BY sequence LOOP
        head := ledger_entry_hash(head, e);
        UPDATE entries SET entry_hash = head
        WHERE merchant_id = e.merchant_id AND account_id = e.account_id
          AND sequence = e.sequence;
    END LOOP;
    UPDATE accounts a SET entry_hash = head, debits_posted = l.debits_posted,
        credits_posted = l.credits_posted
    FROM entries l
    WHERE a.merchant_id = '{merchant}' AND a.account_id = '{account}'
      AND l.merchant_id = a.merchant_id AND l.account_id = a.account_id
      AND l.sequence = a.entry_count;
END $$
"""


async def forge_amount(shard: Shard, merchant: str, transfer_id: str, amount_minor: int) -> None:
    """The attack of issue 23: a consistent forgery of one transfer's amount."""
    async with shard.pool.acquire() as conn, conn.transaction():
        # Write access to the database, as the table owner has: triggers off.
        await conn.execute("SET LOCAL session_replication_role = replica")
        old = await conn.fetchval(
            "SELECT amount_minor FROM transfers WHERE merchant_id = $1 AND transfer_id = $2",
            merchant,
            transfer_id,
        )
        delta = amount_minor - old
        await conn.execute(
            "UPDATE transfers SET amount_minor = $3, amount_effective_minor = $3"
            " WHERE merchant_id = $1 AND transfer_id = $2",
            merchant,
            transfer_id,
            amount_minor,
        )
        for leg in await conn.fetch(
            "SELECT account_id, sequence, direction FROM entries"
            " WHERE transfer_merchant_id = $1 AND transfer_id = $2",
            merchant,
            transfer_id,
        ):
            column = "debits_posted" if leg["direction"] == 1 else "credits_posted"
            await conn.execute(
                "UPDATE entries SET amount_minor = amount_minor + $4 WHERE merchant_id = $1"
                " AND account_id = $2 AND sequence = $3",
                merchant,
                leg["account_id"],
                leg["sequence"],
                delta,
            )
            await conn.execute(
                f"UPDATE entries SET {column} = {column} + $4 WHERE merchant_id = $1"
                " AND account_id = $2 AND sequence >= $3",
                merchant,
                leg["account_id"],
                leg["sequence"],
                delta,
            )
            await conn.execute(_REHASH_ACCOUNT.format(merchant=merchant, account=leg["account_id"]))
        await conn.execute(
            "UPDATE chain_checkpoint_heads h SET entry_hash = e.entry_hash FROM entries e"
            " WHERE e.merchant_id = h.merchant_id AND e.account_id = h.account_id"
            " AND e.sequence = h.sequence"
        )
        previous = GENESIS_HASH
        for c in await conn.fetch("SELECT checkpoint_id FROM chain_checkpoints ORDER BY 1"):
            heads = await conn.fetch(
                "SELECT merchant_id, account_id, sequence, entry_hash FROM chain_checkpoint_heads"
                ' WHERE checkpoint_id = $1 ORDER BY merchant_id COLLATE "C",'
                ' account_id COLLATE "C"',
                c["checkpoint_id"],
            )
            previous = checkpoint_digest(previous, [tuple(h) for h in heads])
            await conn.execute(
                "UPDATE chain_checkpoints SET digest = $2 WHERE checkpoint_id = $1",
                c["checkpoint_id"],
                previous,
            )


async def test_a_consistent_forgery_passes_the_plain_chain_but_not_the_key_or_the_export(
    anchored: Service,
) -> None:
    merchant, ids, shard = await books(anchored)
    made = await anchored.server.checkpointer.checkpoint_once()
    assert made["shard-a"].mac == checkpoint_mac(
        KEY, shard="shard-a", checkpoint_id=1, digest=made["shard-a"].digest
    )
    assert [r.checkpoint.digest for r in export_of(anchored).read("shard-a")] == [
        made["shard-a"].digest
    ]

    await forge_amount(shard, merchant, ids[1], FORGED_AMOUNT_MINOR)

    # The attack as the issue found it: the forged amount is served, and the
    # database alone (no key, no export) cannot tell.
    (looked_up,) = (
        await anchored.stub.LookupTransfers(
            pb.LookupTransfersRequest(
                refs=[pb.TransferRef(merchant_id=merchant, transfer_id=ids[1])]
            ),
            timeout=RPC_TIMEOUT_S,
        )
    ).transfers
    assert looked_up.transfer.amount_minor == FORGED_AMOUNT_MINOR
    assert (await ChainStore(shard).verify()).violations == []
    assert (await reconcile(anchored.cluster)).ok, "the books still balance: only amounts moved"
    keyed_reconcile = await reconcile(anchored.cluster, checkpoint_keys=KEYS)
    assert not keyed_reconcile.ok
    assert "checkpoint 1 has a MAC that matches none of the keys held" in keyed_reconcile.render()

    # With the key: the checkpoint's MAC no longer matches its (recomputed) digest.
    keyed = await ChainStore(shard).verify(keys=KEYS)
    assert [v.problem for v in keyed.violations] == [
        "checkpoint 1 has a MAC that matches none of the keys held (the current checkpoint "
        "key and 0 retired): forged, altered, or signed by a key not given to this check"
    ]

    # Against the export: the checkpoint and each rewritten head are named.
    checks = {
        c.shard: c
        for c in await verify_against_export(anchored.cluster, export_of(anchored), keys=KEYS)
    }
    rendered = [v.render() for v in checks["shard-a"].violations]
    assert rendered[0] == (
        "checkpoint 1 in the database differs from the exported one "
        "(history before it was rewritten)"
    )
    assert sorted(rendered[1:]) == [
        f"{merchant}/cash entry {TRANSFERS}: entry differs from the one exported in "
        "checkpoint 1 of shard-a",
        f"{merchant}/wallet entry {TRANSFERS}: entry differs from the one exported in "
        "checkpoint 1 of shard-a",
    ]
    assert checks["shard-b"].violations == []


async def test_ledger_verify_against_the_export_fails_on_the_forgery(
    anchored: Service,
) -> None:
    merchant, ids, shard = await books(anchored)
    await anchored.server.checkpointer.checkpoint_once()
    args = ["verify", "--config", str(anchored.config_path), "--against"]
    env = child_env({"LEDGER_CHECKPOINT_KEY": KEY.decode()})
    clean = await run_cli([*args, str(export_of(anchored).directory)], env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "ok   shard-a export: 0 violation(s); matches exported checkpoints through 1" in (
        clean.stdout
    )

    await forge_amount(shard, merchant, ids[0], FORGED_AMOUNT_MINOR)
    forged = await run_cli([*args, str(export_of(anchored).directory)], env)
    assert forged.returncode == 1, forged.stdout + forged.stderr
    assert f"FAIL shard-a export: {merchant}/cash entry {TRANSFERS}: entry differs" in (
        forged.stdout
    )
    assert "FAIL shard-a checkpoint 1 has a MAC that matches none of the keys held" in (
        forged.stdout
    )


async def test_cross_shard_history_and_settlement_accounts_verify_against_the_export(
    anchored: Service,
) -> None:
    """Settlement accounts have the same ids on every shard: each is checked where it was
    exported, and a cross-shard saga's entries on both shards match."""
    payer = anchored.merchant_on("shard-a")
    payee = anchored.merchant_on("shard-b")
    await create_accounts(anchored.stub, account(payer, "cash"), account(payee, "wallet"))
    answer = await transfers(
        anchored.stub, transfer(uid("t"), ref(payer, "cash"), ref(payee, "wallet"), 25)
    )
    assert result_names(answer) == ["TRANSFER_RESULT_OK"]
    made = await anchored.server.checkpointer.checkpoint_once()
    assert set(made) == {"shard-a", "shard-b"}
    settlement = {h[0] for c in made.values() for h in c.head_list if h[0].startswith("$")}
    assert settlement == {"$settlement"}
    checks = await verify_against_export(anchored.cluster, export_of(anchored), keys=KEYS)
    assert [v.render() for c in checks for v in c.violations] == []
    assert {c.shard: c.exported_through for c in checks} == {"shard-a": 1, "shard-b": 1}


async def test_an_altered_export_line_is_refused_and_does_not_anchor_anything(
    anchored: Service,
) -> None:
    await books(anchored)
    await anchored.server.checkpointer.checkpoint_once()
    path = export_of(anchored).path_for("shard-a")
    record = json.loads(path.read_text())
    record["heads"][0][3] = "00" * 32
    path.write_text(json.dumps(record) + "\n")
    checks = await verify_against_export(anchored.cluster, export_of(anchored), keys=KEYS)
    assert [v.problem for c in checks for v in c.violations] == [
        "export line 1 (checkpoint 1) does not add up: the export itself was altered",
        "none of the 1 checkpoint(s) in the database was exported",
    ]


async def test_checkpoints_missed_by_the_export_are_exported_on_the_next_round(
    anchored: Service,
) -> None:
    """A replica without an export (or a crash before exporting) leaves a gap; it closes."""
    merchant, _, _ = await books(anchored)
    other = ChainCheckpointer(anchored.cluster, interval_s=60.0, keys=KEYS)
    assert (await other.checkpoint_once())["shard-a"].checkpoint_id == 1
    assert export_of(anchored).read("shard-a") == []
    answer = await transfers(
        anchored.stub, transfer(uid("t"), ref(merchant, "cash"), ref(merchant, "wallet"), 1)
    )
    assert result_names(answer) == ["TRANSFER_RESULT_OK"]
    await anchored.server.checkpointer.checkpoint_once()
    exported = [r.checkpoint.checkpoint_id for r in export_of(anchored).read("shard-a")]
    assert exported == [1, 2]
    checks = await verify_against_export(anchored.cluster, export_of(anchored), keys=KEYS)
    assert [v.render() for c in checks for v in c.violations] == []
    assert {c.shard: c.exported_through for c in checks}["shard-a"] == 2


async def test_a_checkpoint_without_a_valid_mac_is_not_exported(anchored: Service) -> None:
    """A checkpoint row forged in the database must not become the exported anchor."""
    _, _, shard = await books(anchored)
    keyless = ChainCheckpointer(anchored.cluster, interval_s=60.0, keys=None)
    assert (await keyless.checkpoint_once())["shard-a"].mac is None
    await anchored.server.checkpointer.checkpoint_once()
    assert export_of(anchored).read("shard-a") == []
    assert [v.problem for v in (await ChainStore(shard).verify(keys=KEYS)).violations] == [
        "checkpoint 1 has no MAC: made without a key, or forged"
    ]


async def test_checkpoints_seal_heads_from_the_entries_not_the_account_row(
    anchored: Service,
) -> None:
    merchant, _, shard = await books(anchored)
    async with shard.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        # The account row claims a different head and more entries than exist.
        await conn.execute(
            "UPDATE accounts SET entry_hash = $2, entry_count = entry_count + 5"
            " WHERE merchant_id = $1 AND account_id = 'wallet'",
            merchant,
            b"\x01" * 32,
        )
        # And a forged entry appended to cash, whose hash does not chain.
        await conn.execute(
            "INSERT INTO entries SELECT merchant_id, account_id, sequence + 1,"
            " transfer_merchant_id, 'forged', direction, kind, amount_minor, debits_posted,"
            " credits_posted, debits_pending, credits_pending, created_at, entry_hash"
            " FROM entries WHERE merchant_id = $1 AND account_id = 'cash' AND sequence = $2",
            merchant,
            TRANSFERS,
        )
    done = await ChainStore(shard).checkpoint_round(keys=KEYS)
    assert done.unsealable == [(merchant, "cash")]
    assert done.checkpoint is not None
    sealed = {(m, a): (seq, h) for m, a, seq, h in done.checkpoint.head_list}
    async with shard.pool.acquire() as conn:
        wallet_head = await conn.fetchval(
            "SELECT entry_hash FROM entries WHERE merchant_id = $1 AND account_id = 'wallet'"
            " AND sequence = $2",
            merchant,
            TRANSFERS,
        )
    assert sealed[(merchant, "wallet")] == (TRANSFERS, wallet_head)
    assert (merchant, "cash") not in sealed
    # The service's rounds count it each time, for LedgerHistoryTampered.
    unsealable = {"shard": "shard-a", "kind": "chain_unsealable"}
    before = metrics.checkpoint_problems.total(unsealable)
    await anchored.server.checkpointer.checkpoint_once()
    assert metrics.checkpoint_problems.total(unsealable) == before + 1


async def test_exported_heads_are_named_missing_or_differing_and_the_rest_pass(
    anchored: Service,
) -> None:
    merchant, _, shard = await books(anchored)
    async with shard.pool.acquire() as conn:
        stored = {
            (r["account_id"], r["sequence"]): r["entry_hash"]
            for r in await conn.fetch(
                "SELECT account_id, sequence, entry_hash FROM entries WHERE merchant_id = $1",
                merchant,
            )
        }
    exported = [
        (merchant, "cash", 1, stored[("cash", 1)]),
        (merchant, "cash", 2, b"\x02" * 32),
        (merchant, "wallet", TRANSFERS, stored[("wallet", TRANSFERS)]),
        (merchant, "wallet", TRANSFERS + 1, b"\x03" * 32),
    ]
    assert await ChainStore(shard).heads_differing(exported) == [
        (merchant, "cash", 2, False),
        (merchant, "wallet", TRANSFERS + 1, True),
    ]
    assert await ChainStore(shard).heads_differing(exported, violations_max=1) == [
        (merchant, "cash", 2, False)
    ]


async def test_verify_names_a_balance_edited_in_the_account_row_alone(anchored: Service) -> None:
    merchant, _, shard = await books(anchored)
    async with shard.pool.acquire() as conn:
        await conn.execute(
            "UPDATE accounts SET credits_posted = credits_posted + 1000"
            " WHERE merchant_id = $1 AND account_id = 'wallet'",
            merchant,
        )
    found = [v.render() for v in (await ChainStore(shard).verify()).violations]
    assert found == [
        f"{merchant}/wallet entry {TRANSFERS}: the account row's balances are not those of its "
        "last entry (the account row was edited)"
    ]


async def test_a_cli_checkpoint_is_exported_with_its_mac(anchored: Service) -> None:
    await books(anchored)
    directory = export_of(anchored).directory
    env = child_env(
        {"LEDGER_CHECKPOINT_KEY": KEY.decode(), "LEDGER_CHECKPOINT_EXPORT_DIR": str(directory)}
    )
    result = await run_cli(
        ["verify", "--config", str(anchored.config_path), "--checkpoint", "--against",
         str(directory)],
        env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = export_of(anchored).read("shard-a")
    assert line.checkpoint.mac == checkpoint_mac(
        KEY, shard="shard-a", checkpoint_id=1, digest=line.checkpoint.digest
    )


def test_a_short_checkpoint_key_is_refused() -> None:
    with pytest.raises(SettingsError, match="at least 16 bytes"):
        checkpoint_keys_from_env({"LEDGER_CHECKPOINT_KEY": "short"})
    assert checkpoint_keys_from_env({}) is None


# Key rotation: NEW signs from the rotation on; KEY, retired, still vouches for
# the checkpoints it signed before.
NEW_KEY = b"the-rotated-checkpoint-key-32-b!"
ROTATED = CheckpointKeys(NEW_KEY, (KEY,))


async def transfer_once(service: Service, merchant: str) -> None:
    answer = await transfers(
        service.stub, transfer(uid("t"), ref(merchant, "cash"), ref(merchant, "wallet"), 1)
    )
    assert result_names(answer) == ["TRANSFER_RESULT_OK"]


async def rotated_round(service: Service, merchant: str) -> int:
    """A transfer, then a checkpoint of shard-a by a replica holding the rotated keys
    and the export; the checkpoint's id."""
    await transfer_once(service, merchant)
    rotated = ChainCheckpointer(
        service.cluster, interval_s=60.0, keys=ROTATED, export=export_of(service)
    )
    made = (await rotated.checkpoint_once())["shard-a"]
    assert made.mac == checkpoint_mac(
        NEW_KEY, shard="shard-a", checkpoint_id=made.checkpoint_id, digest=made.digest
    )
    return made.checkpoint_id


async def test_after_a_rotation_checkpoints_verify_under_the_new_key_and_the_retired_one(
    anchored: Service,
) -> None:
    merchant, _, shard = await books(anchored)
    await anchored.server.checkpointer.checkpoint_once()  # checkpoint 1, signed by KEY
    assert await rotated_round(anchored, merchant) == 2
    assert [r.checkpoint.checkpoint_id for r in export_of(anchored).read("shard-a")] == [1, 2]

    assert (await ChainStore(shard).verify(keys=ROTATED)).violations == []
    checks = await verify_against_export(anchored.cluster, export_of(anchored), keys=ROTATED)
    assert [v.render() for c in checks for v in c.violations] == []
    assert (await reconcile(anchored.cluster, checkpoint_keys=ROTATED)).ok
    # Without the retired key the old checkpoint is named, and without the new one the new.
    only_new = await ChainStore(shard).verify(keys=CheckpointKeys(NEW_KEY))
    assert [v.problem[:60] for v in only_new.violations] == [
        "checkpoint 1 has a MAC that matches none of the keys held (t"
    ]
    only_old = await ChainStore(shard).verify(keys=KEYS)
    assert [v.problem[:60] for v in only_old.violations] == [
        "checkpoint 2 has a MAC that matches none of the keys held (t"
    ]

    args = ["verify", "--config", str(anchored.config_path), "--against"]
    env = child_env(
        {"LEDGER_CHECKPOINT_KEY": NEW_KEY.decode(), "LEDGER_CHECKPOINT_KEYS_RETIRED": KEY.decode()}
    )
    rotated = await run_cli([*args, str(export_of(anchored).directory)], env)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "ok   shard-a export: 0 violation(s); matches exported checkpoints through 2" in (
        rotated.stdout
    )
    env["LEDGER_CHECKPOINT_KEYS_RETIRED"] = "another-retired-key-of-32-bytes!"
    wrong = await run_cli([*args, str(export_of(anchored).directory)], env)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "FAIL shard-a checkpoint 1 has a MAC that matches none of the keys held (the " in (
        wrong.stdout
    )


async def test_a_replica_without_the_new_key_makes_and_exports_no_checkpoint_after_it(
    anchored: Service,
) -> None:
    """A rolling rotation: a replica still on the old key meets a checkpoint it cannot
    vouch for, and waits for its keys instead of signing after it with an older one."""
    merchant, _, shard = await books(anchored)
    await anchored.server.checkpointer.checkpoint_once()
    assert await rotated_round(anchored, merchant) == 2
    await transfer_once(anchored, merchant)
    old_replica = anchored.server.checkpointer
    assert old_replica.keys == KEYS
    unknown = {"shard": "shard-a", "kind": "unknown_key"}
    before = metrics.checkpoint_problems.total(unknown)
    assert "shard-a" not in await old_replica.checkpoint_once()
    assert metrics.checkpoint_problems.total(unknown) == before + 1  # LedgerCheckpointKeyUnknown
    done = await ChainStore(shard).checkpoint_round(keys=KEYS)
    assert (done.checkpoint, done.unknown_key_at) == (None, 2)
    assert [r.checkpoint.checkpoint_id for r in export_of(anchored).read("shard-a")] == [1, 2]
    # The replica given the rotated keys goes on where it stopped.
    assert await rotated_round(anchored, merchant) == 3
    assert (await ChainStore(shard).verify(keys=ROTATED)).violations == []


async def test_a_retired_key_signing_after_the_rotation_is_named_and_not_exported(
    anchored: Service,
) -> None:
    """A retired key may have leaked: a checkpoint it signs after one signed by the new
    key is a forgery, in the database and in the export."""
    merchant, _, shard = await books(anchored)
    await anchored.server.checkpointer.checkpoint_once()
    assert await rotated_round(anchored, merchant) == 2
    await transfer_once(anchored, merchant)
    # The leaked key signs (a key set naming the new key passes the replicas' wait).
    leaked = await ChainStore(shard).checkpoint_round(keys=CheckpointKeys(KEY, (NEW_KEY,)))
    assert leaked.checkpoint is not None and leaked.checkpoint.checkpoint_id == 3
    found = [v.problem for v in (await ChainStore(shard).verify(keys=ROTATED)).violations]
    assert found == [
        "checkpoint 3 is signed by retired key 1 after checkpoint 2 signed by a newer one "
        "(the current key): a retired key signed it after the rotation (leaked?)"
    ]
    # The rotated replica's next round seals on top, but exports neither.
    refused = {"shard": "shard-a", "kind": "export_refused"}
    before = metrics.checkpoint_problems.total(refused)
    assert await rotated_round(anchored, merchant) == 4
    assert metrics.checkpoint_problems.total(refused) == before + 1  # LedgerHistoryTampered
    assert [r.checkpoint.checkpoint_id for r in export_of(anchored).read("shard-a")] == [1, 2]
    # An export that took it anyway (an old exporter) is named line by line.
    export_of(anchored).append("shard-a", [leaked.checkpoint])
    checks = {
        c.shard: c
        for c in await verify_against_export(anchored.cluster, export_of(anchored), keys=ROTATED)
    }
    assert [v.problem for v in checks["shard-a"].violations] == [
        "exported checkpoint 3 is signed by retired key 1 after checkpoint 2 signed by a "
        "newer one (the current key): a retired key signed it after the rotation (leaked?)"
    ]


async def test_export_lines_out_of_order_are_held_to_the_key_order_by_checkpoint(
    anchored: Service,
) -> None:
    """Replicas sharing an export each append what they have not written themselves, so
    an older checkpoint's line can follow a newer one's: that is no retired key's doing."""
    merchant, _, _ = await books(anchored)
    await anchored.server.checkpointer.checkpoint_once()
    assert await rotated_round(anchored, merchant) == 2
    export = export_of(anchored)
    lines = export.read("shard-a")
    export.append("shard-a", [lines[0].checkpoint])  # 1 (old key) again, after 2 (new key)
    checks = await verify_against_export(anchored.cluster, export_of(anchored), keys=ROTATED)
    assert [v.render() for c in checks for v in c.violations] == []


def test_retired_checkpoint_keys_are_read_in_order_and_checked() -> None:
    current, old, older = "c" * 16, "o" * 16, "p" * 16
    keys = checkpoint_keys_from_env(
        {"LEDGER_CHECKPOINT_KEY": current, "LEDGER_CHECKPOINT_KEYS_RETIRED": f" {old}\n{older} "}
    )
    assert keys == CheckpointKeys(current.encode(), (old.encode(), older.encode()))
    assert current not in repr(keys) and old not in repr(keys)
    retired = "LEDGER_CHECKPOINT_KEYS_RETIRED"
    refused = {
        "without the key that signs now": {retired: old},
        "at least 16 bytes": {"LEDGER_CHECKPOINT_KEY": current, retired: "short"},
        "lists a key twice": {"LEDGER_CHECKPOINT_KEY": current, retired: f"{old} {old}"},
        "the current key as retired": {"LEDGER_CHECKPOINT_KEY": current, retired: current},
        "more than 16": {
            "LEDGER_CHECKPOINT_KEY": current,
            retired: " ".join(f"{n:016d}" for n in range(17)),
        },
    }
    for reason, env in refused.items():
        with pytest.raises(SettingsError, match=reason):
            checkpoint_keys_from_env(env)
