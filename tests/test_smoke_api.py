from __future__ import annotations

from tests.support import Service, account, balance, create_accounts, ref, result_names, transfer, transfers, uid


async def test_transfer_moves_money_between_two_accounts_of_one_merchant(service: Service) -> None:
    m = uid("m")
    await create_accounts(service.stub, account(m, "cash"), account(m, "wallet"))
    results = await transfers(service.stub, transfer(uid("t"), ref(m, "cash"), ref(m, "wallet"), 250))
    assert result_names(results) == ["TRANSFER_RESULT_OK"]
    wallet = await balance(service.stub, m, "wallet")
    assert wallet.credits_posted == 250
