from __future__ import annotations

from ledger.v1 import ledger_pb2 as pb
from tests.process_cluster import ProcessCluster
from tests.support import account, balance, create_accounts, ref, transfer, transfers, uid


async def test_cross_shard_transfer_completes_in_the_call_and_reconcile_passes(
    process_cluster: ProcessCluster,
) -> None:
    stub = process_cluster.service.stub
    assert stub is not None
    payer = process_cluster.merchant_on("shard-a")
    payee = process_cluster.merchant_on("shard-b")
    await create_accounts(stub, account(payer, "cash"), account(payee, "sales"))
    results = await transfers(stub, transfer(uid("t"), ref(payer, "cash"), ref(payee, "sales"), 42))
    assert [r.result for r in results] == [pb.TRANSFER_RESULT_OK]
    assert (await balance(stub, payee, "sales")).credits_posted == 42
    assert (await balance(stub, payer, "cash")).debits_posted == 42
    report = await process_cluster.reconcile()
    assert report.ok, report.render()
