"""LedgerService: decode, call the core, encode; map every failure to a clear status."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ledger import limits
from ledger.api import decode, encode
from ledger.api.auth import require_merchants
from ledger.api.events import EventStreams
from ledger.api.status import (
    AbortError,
    failed_precondition,
    send_abort,
    unavailable,
    with_reason,
)
from ledger.core.errors import JournalSpansShards, LinkedChainSpansShards
from ledger.core.ledger import Ledger
from ledger.domain.accounts import AccountKey
from ledger.domain.transfers import TransferRequest, TransferResult
from ledger.invariant import InvariantViolation
from ledger.routing.errors import ClusterUnavailable
from ledger.storage.errors import ShardBusy, ShardUnavailable
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

log = logging.getLogger(__name__)
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]

_ACCOUNT_UNAVAILABLE = pb.ACCOUNT_RESULT_SHARD_UNAVAILABLE


def statuses(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Turns exceptions into statuses with details; only true bugs become INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        try:
            return await handler(self, request, context)
        except AbortError as error:
            await send_abort(context, error)
        except LinkedChainSpansShards as error:
            await send_abort(
                context,
                failed_precondition(
                    "LINKED_CHAIN_SPANS_SHARDS",
                    "all transfers of a linked chain must live on one shard",
                    subjects=[f"transfers[{i}]" for i in error.indexes],
                ),
            )
        except JournalSpansShards as error:
            await send_abort(
                context,
                failed_precondition(
                    "JOURNAL_SPANS_SHARDS",
                    "all postings of a journal must live on the journal merchant's shard",
                    subjects=[f"postings[{i}]" for i in error.posting_indexes],
                ),
            )
        except ShardBusy as error:
            await send_abort(
                context,
                AbortError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{error}; retry shortly"),
            )
        except (ClusterUnavailable, ShardUnavailable) as error:
            await send_abort(context, unavailable(str(error)))
        except InvariantViolation:
            log.exception("invariant violated in %s", handler.__name__)
            await send_abort(
                context, AbortError(grpc.StatusCode.INTERNAL, "internal invariant violated")
            )
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _require_account_refs(keys: list[AccountKey]) -> None:
    require_merchants((f"refs[{i}].merchant_id", k.merchant_id) for i, k in enumerate(keys))


def _transfer_merchants(transfers: list[TransferRequest]) -> list[tuple[str, str]]:
    fields = []
    for i, t in enumerate(transfers):
        fields.append((f"transfers[{i}].debit_account.merchant_id", t.debit.merchant_id))
        if t.credit is not None:
            fields.append((f"transfers[{i}].credit_account.merchant_id", t.credit.merchant_id))
    return fields


def _saga_wait_s(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    """How long a call may wait for its sagas: within its deadline, and bounded."""
    remaining_s = context.time_remaining()
    if remaining_s is None:
        return limits.saga_inline_wait_s_max
    return max(0.0, min(limits.saga_inline_wait_s_max, remaining_s - limits.saga_deadline_margin_s))


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(
        self,
        ledger: Ledger,
        *,
        page_tokens: decode.PageTokens,
        events: EventStreams,
        mask_card_metadata: bool = False,
    ) -> None:
        self.ledger = ledger
        self.events = events
        self.page_tokens = page_tokens
        # LEDGER_CARD_METADATA=mask: metadata values holding a card number are stored
        # truncated (first six, last four digits) instead of being refused.
        self.mask_card_metadata = mask_card_metadata

    @statuses
    async def CreateAccounts(
        self, request: pb.CreateAccountsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateAccountsResponse:
        specs = decode.create_accounts(request, mask_card_metadata=self.mask_card_metadata)
        require_merchants(
            (f"accounts[{i}].ref.merchant_id", s.key.merchant_id) for i, s in enumerate(specs)
        )
        outcomes = await self.ledger.create_accounts(specs)
        if all(o.shard_unavailable for o in outcomes):
            raise unavailable("the shards holding these merchants are unavailable")
        results = []
        for index, outcome in enumerate(outcomes):
            if outcome.shard_unavailable:
                code = _ACCOUNT_UNAVAILABLE
            elif outcome.created:
                code = pb.ACCOUNT_RESULT_OK
            elif outcome.differing_field:
                code = pb.ACCOUNT_RESULT_EXISTS_WITH_DIFFERENT_FIELDS
            else:
                code = pb.ACCOUNT_RESULT_EXISTS
            results.append(
                pb.CreateAccountResult(
                    index=index, result=code, differing_field=outcome.differing_field or ""
                )
            )
        return pb.CreateAccountsResponse(results=results)

    @statuses
    async def LookupAccounts(
        self, request: pb.LookupAccountsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LookupAccountsResponse:
        keys = decode.account_refs("refs", request.refs)
        _require_account_refs(keys)
        accounts = await self.ledger.lookup_accounts(keys)
        return pb.LookupAccountsResponse(accounts=[encode.account(a) for a in accounts])

    @statuses
    async def ListAccounts(
        self, request: pb.ListAccountsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAccountsResponse:
        v = decode.Violations()
        v.merchant_id("merchant_id", request.merchant_id)
        page_size = v.page_size("page_size", request.page_size)
        after = decode.account_cursor(
            v,
            "page_token",
            request.page_token,
            tokens=self.page_tokens,
            merchant_id=request.merchant_id,
        )
        v.raise_if_any()
        require_merchants([("merchant_id", request.merchant_id)])
        accounts = await self.ledger.list_accounts(
            request.merchant_id, after=after, limit=page_size + 1
        )
        token = ""
        if len(accounts) > page_size:
            accounts = accounts[:page_size]
            token = self.page_tokens.issue(
                kind="accounts", listing=request.merchant_id, cursor=accounts[-1].key.account_id
            )
        return pb.ListAccountsResponse(
            accounts=[encode.account(a) for a in accounts], next_page_token=token
        )

    @statuses
    async def SetAccountsClosed(
        self, request: pb.SetAccountsClosedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetAccountsClosedResponse:
        keys = decode.account_refs("refs", request.refs)
        _require_account_refs(keys)
        found = await self.ledger.set_accounts_closed(keys, closed=request.closed)
        return pb.SetAccountsClosedResponse(found=found)

    @statuses
    async def CreateTransfers(
        self, request: pb.CreateTransfersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateTransfersResponse:
        transfers = decode.create_transfers(request, mask_card_metadata=self.mask_card_metadata)
        require_merchants(_transfer_merchants(transfers))
        outcomes = await self.ledger.create_transfers(transfers, wait_s=_saga_wait_s(context))
        if all(o.result is TransferResult.SHARD_UNAVAILABLE for o in outcomes):
            raise unavailable("the shards holding these transfers are unavailable")
        # A batch's items share one time: encoded once (the message copies it in).
        stamps = {t: encode.timestamp(t) for t in {o.created_at for o in outcomes}}
        return pb.CreateTransfersResponse(
            results=[
                pb.CreateTransferResult(
                    index=o.index,
                    id=o.id,
                    result=int(o.result),  # type: ignore[arg-type]
                    replayed=o.replayed,
                    differing_field=o.differing_field,
                    created_at=stamps[o.created_at],
                    refused_by_rule=o.refused_by_rule,
                )
                for o in outcomes
            ]
        )

    @statuses
    async def LookupTransfers(
        self, request: pb.LookupTransfersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LookupTransfersResponse:
        keys = decode.transfer_refs(request)
        require_merchants((f"refs[{i}].merchant_id", k.merchant_id) for i, k in enumerate(keys))
        remaining_s = context.time_remaining()
        wait_s = request.wait_timeout_ms / 1000
        if remaining_s is not None:
            wait_s = min(wait_s, remaining_s - limits.saga_deadline_margin_s)
        views = await self.ledger.lookup_transfers(keys, wait_s=max(0.0, wait_s))
        return pb.LookupTransfersResponse(transfers=[encode.transfer_view(v) for v in views])

    @statuses
    async def PostJournal(
        self, request: pb.PostJournalRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PostJournalResponse:
        journal = decode.post_journal(request, mask_card_metadata=self.mask_card_metadata)
        require_merchants(
            [("merchant_id", journal.merchant_id)]
            + [
                (f"postings[{i}].account.merchant_id", p.account.merchant_id)
                for i, p in enumerate(journal.postings)
            ]
        )
        outcome = await self.ledger.post_journal(journal)
        if outcome.result is TransferResult.EXISTS_WITH_DIFFERENT_FIELDS:
            raise with_reason(
                grpc.StatusCode.ALREADY_EXISTS,
                outcome.result.name,
                f"journal {journal.id!r} exists with a different {outcome.differing_field}",
                field=outcome.differing_field or "",
            )
        if outcome.result is not TransferResult.OK:
            subjects = (
                [f"postings[{outcome.failed_posting_index}]"]
                if outcome.failed_posting_index >= 0
                else []
            )
            raise failed_precondition(
                outcome.result.name,
                f"journal refused: {outcome.result.name}",
                subjects=subjects,
                metadata={
                    "posting_index": str(outcome.failed_posting_index),
                    "replayed": str(outcome.replayed).lower(),
                    **({"rule_id": outcome.refused_by_rule} if outcome.refused_by_rule else {}),
                },
            )
        return pb.PostJournalResponse(
            result=pb.TRANSFER_RESULT_OK,
            replayed=outcome.replayed,
            created_at=encode.timestamp(outcome.created_at),
        )

    @statuses
    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetBalanceResponse:
        v = decode.Violations()
        key = decode.account_ref(v, "account", request.account)
        as_of = decode.timestamp(v, "as_of", request.as_of) if request.HasField("as_of") else None
        v.raise_if_any()
        assert key is not None
        require_merchants([("account.merchant_id", key.merchant_id)])
        found = await self.ledger.balance(key, as_of=as_of)
        if found is None:
            raise with_reason(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "no such account")
        account, balances = found
        return pb.GetBalanceResponse(
            currency=account.spec.currency,
            debits_posted=balances.debits_posted,
            credits_posted=balances.credits_posted,
            debits_pending=balances.debits_pending,
            credits_pending=balances.credits_pending,
        )

    @statuses
    async def ListEntries(
        self, request: pb.ListEntriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListEntriesResponse:
        v = decode.Violations()
        key = decode.account_ref(v, "account", request.account)
        page_size = v.page_size("page_size", request.page_size)
        if int(request.order) not in (0, 1, 2):
            v.add("order", "must be NEWEST_FIRST or OLDEST_FIRST")
        newest_first = request.order != pb.ORDER_OLDEST_FIRST
        kind = "entries-newest" if newest_first else "entries-oldest"
        listing = decode.entries_listing(key) if key is not None else ""
        after = decode.sequence_cursor(
            v, "page_token", request.page_token, kind, tokens=self.page_tokens, listing=listing
        )
        v.raise_if_any()
        assert key is not None
        require_merchants([("account.merchant_id", key.merchant_id)])
        entries = await self.ledger.list_entries(
            key, after_sequence=after, newest_first=newest_first, limit=page_size + 1
        )
        if entries is None:
            raise with_reason(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "no such account")
        token = ""
        if len(entries) > page_size:
            entries = entries[:page_size]
            token = self.page_tokens.issue(
                kind=kind, listing=listing, cursor=str(entries[-1].sequence)
            )
        return pb.ListEntriesResponse(
            entries=[encode.entry(e) for e in entries], next_page_token=token
        )

    async def SubscribeEvents(
        self, request: pb.SubscribeEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Event]:
        try:
            async for event in self.events.subscribe(request):
                yield event
        except AbortError as error:
            await send_abort(context, error)

    async def SubscribeEventBatches(
        self, request: pb.SubscribeEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.EventBatch]:
        try:
            async for batch in self.events.subscribe_batches(request):
                yield batch
        except AbortError as error:
            await send_abort(context, error)

    @statuses
    async def AckEvents(
        self, request: pb.AckEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AckEventsResponse:
        return await self.events.acknowledge(request)
