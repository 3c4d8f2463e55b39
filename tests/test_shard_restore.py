"""A shard's PostgreSQL lost and restored from an older backup (docs/runbook.md).

The procedure the runbook describes, run for real: three shard servers and the
service as a process; a cold backup of shard-a; more transfers (a local one on
shard-a, a cross-shard one from shard-a to shard-b); shard-a lost and restored
from the backup while the service keeps running. Then what the admin sees:

- `ledger reconcile` fails, naming the settlement pair between the restored shard
  and its peer (shard-b credited a transfer whose debit side the restore undid),
  while the restored shard, alone, still balances;
- `ledger verify` finds every chain intact (the restored shard is an older but
  consistent history) and prints an older checkpoint than the one recorded
  before the loss: comparing it with the digest kept outside the database is
  what shows the rollback.

And the remedy: the callers resubmit what they sent since the backup, with the
same ids. The lost local transfer applies again; the lost cross-shard one runs a
new saga whose step 2 finds the credit shard's recorded outcome and does not
credit twice. Reconcile passes again and every balance is what the callers were
told.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from ledger.client import ClientOptions, LedgerClient
from ledger.v1 import ledger_pb2 as pb
from tests.process_cluster import ProcessCluster
from tests.support import account, ref, transfer, uid

ROOT = Path(__file__).resolve().parent.parent
# The CLI child process: imports the package and reads three small shards.
CLI_TIMEOUT_S = 90.0
# Calls right after the shard came back may meet the service's broken pool
# connections once: the client retries UNAVAILABLE with back-off.
CLIENT = ClientOptions(timeout_s=10.0, attempts_max=8)
_CHECKPOINT = re.compile(r"^ok\s+shard-a: 0 violation\(s\); (.*)$", re.MULTILINE)


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # LEDGER_* settings from the outer environment would point the CLI elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env |= {"PYTHONPATH": str(ROOT), "LEDGER_CONFIG": str(config_path)}
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _copy_data_dir(source: Path, target: Path) -> None:
    # cp -a keeps the owner (the server runs as its own user) and permissions.
    subprocess.run(["cp", "-a", str(source), str(target)], check=True, timeout=CLI_TIMEOUT_S)


async def _post(client: LedgerClient, item: pb.Transfer) -> pb.CreateTransferResult:
    response = await client.create_transfers([item])
    return response.results[0]


async def test_shard_restored_from_an_older_backup_is_found_and_healed_by_resubmitting(
    tmp_path: Path,
) -> None:
    cluster = ProcessCluster(tmp_path / "cluster")
    try:
        await asyncio.to_thread(cluster.start_shards)
        await cluster.service.start()
        address = f"127.0.0.1:{cluster.service.port}"
        payer = cluster.merchant_on("shard-a")
        payee = cluster.merchant_on("shard-b")
        async with LedgerClient(address, options=CLIENT) as client:
            await client.create_accounts(
                [account(payer, "cash"), account(payer, "till"), account(payee, "sales")]
            )
            before = [
                transfer(uid("t"), ref(payer, "cash"), ref(payer, "till"), 100),
                transfer(uid("x"), ref(payer, "cash"), ref(payee, "sales"), 40),
            ]
            after = [
                transfer(uid("t"), ref(payer, "cash"), ref(payer, "till"), 7),
                transfer(uid("x"), ref(payer, "cash"), ref(payee, "sales"), 3),
            ]
            for item in before:
                assert (await _post(client, item)).result == pb.TRANSFER_RESULT_OK

            # A cold backup of shard-a (stopped, copied, started again).
            server = cluster.shards.servers["shard-a"]
            backup = tmp_path / "shard-a-backup"
            await asyncio.to_thread(cluster.shards.stop, "shard-a", mode="fast")
            await asyncio.to_thread(_copy_data_dir, server.data_dir, backup)
            await asyncio.to_thread(cluster.shards.start_one, "shard-a")

            for item in after:
                assert (await _post(client, item)).result == pb.TRANSFER_RESULT_OK
            anchored = await asyncio.to_thread(_cli, cluster.config_path, "verify", "--checkpoint")
            assert anchored.returncode == 0, anchored.stdout + anchored.stderr
            anchor = _CHECKPOINT.search(anchored.stdout)
            assert anchor, anchored.stdout

            # shard-a lost, and restored from the backup.
            await asyncio.to_thread(cluster.shards.stop, "shard-a")
            await asyncio.to_thread(subprocess.run, ["rm", "-rf", str(server.data_dir)], check=True)
            await asyncio.to_thread(_copy_data_dir, backup, server.data_dir)
            await asyncio.to_thread(cluster.shards.start_one, "shard-a")

            metrics_file = tmp_path / "ledger_reconcile.prom"
            reconciled = await asyncio.to_thread(
                _cli, cluster.config_path, "reconcile", "--metrics-file", str(metrics_file)
            )
            assert reconciled.returncode == 1, reconciled.stdout
            failed = [line for line in reconciled.stdout.splitlines() if line.startswith("FAIL")]
            assert failed, reconciled.stdout
            assert all("shard-a" in line and "shard-b" in line for line in failed), failed
            assert re.search(r"^ok\s+balance shard-a USD", reconciled.stdout, re.MULTILINE)
            # What LedgerReconcileFailed reads (docs/alerts.md).
            exported = metrics_file.read_text()
            assert "ledger_reconcile_ok 0.0" in exported
            assert f"ledger_reconcile_discrepancies {float(len(failed))}" in exported

            verified = await asyncio.to_thread(_cli, cluster.config_path, "verify")
            assert verified.returncode == 0, verified.stdout
            restored = _CHECKPOINT.search(verified.stdout)
            assert restored, verified.stdout
            assert restored.group(1) != anchor.group(1), "the anchored checkpoint is gone"

            # The remedy: resubmit everything sent since the backup, with the same ids.
            for item in after:
                result = await _post(client, item)
                assert result.result == pb.TRANSFER_RESULT_OK
                assert not result.replayed, "the restore lost it, so it applies anew"
            healed = await asyncio.to_thread(
                _cli, cluster.config_path, "reconcile", "--metrics-file", str(metrics_file)
            )
            assert healed.returncode == 0, healed.stdout
            assert "reconcile passed" in healed.stdout
            exported = metrics_file.read_text()
            assert "ledger_reconcile_ok 1.0" in exported
            assert "ledger_reconcile_discrepancies 0.0" in exported

            sales = await client.get_balance(payee, "sales")
            till = await client.get_balance(payer, "till")
            cash = await client.get_balance(payer, "cash")
            # Credited once each, although step 2 of the lost saga ran twice.
            assert sales.credits_posted == 40 + 3
            assert till.credits_posted == 100 + 7
            assert cash.debits_posted == 100 + 40 + 7 + 3
    finally:
        await cluster.close()
