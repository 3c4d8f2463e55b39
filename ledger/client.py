"""A small typed client for calling services: deadlines, and retries with the same ids.

Every write the ledger takes is idempotent by the caller's ids, so retrying a
call that failed with a retryable status (the shard or server was briefly
unavailable, or the server was over its limit) can never move money twice.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc

from ledger import limits
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc

Response = TypeVar("Response")

# CANCELLED is retried too: this client never cancels its own calls, and a
# server under a burst of new streams can cancel some before running them.
# Every call is a read or idempotent by the caller's ids, so a retry is safe.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True)
class ClientOptions:
    # Deadline of each attempt.
    timeout_s: float = 5.0
    # Attempts per call, the first included; bounded so a dead cluster fails.
    attempts_max: int = 5
    # Exponential back-off between attempts, with full jitter, capped.
    retry_delay_s_min: float = 0.05
    retry_delay_s_max: float = 1.0


@dataclass(frozen=True)
class ClientCredentials:
    """How a client proves itself: a bearer token, and TLS when the server uses it."""

    token: str | None = None
    # The CA that signed the server's certificate (None: the system's trusted CAs).
    # TLS is used when this or a client certificate is set, never silently dropped.
    tls_ca_file: Path | None = None
    # A client certificate and key, for servers that require mutual TLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @classmethod
    def from_env(cls) -> ClientCredentials:
        """LEDGER_TOKEN and LEDGER_CLIENT_TLS_{CA,CERT,KEY}_FILE."""

        def path(name: str) -> Path | None:
            value = os.environ.get(name)
            return Path(value) if value else None

        return cls(
            token=os.environ.get("LEDGER_TOKEN") or None,
            tls_ca_file=path("LEDGER_CLIENT_TLS_CA_FILE"),
            tls_cert_file=path("LEDGER_CLIENT_TLS_CERT_FILE"),
            tls_key_file=path("LEDGER_CLIENT_TLS_KEY_FILE"),
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, target: str) -> grpc.aio.Channel:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("a client certificate and its key go together")
        # The largest legal answer (1000 transfers with full metadata) is over
        # gRPC's default 4 MiB; accept what the server may send.
        options = [("grpc.max_receive_message_length", limits.response_bytes_max)]
        if self.tls_ca_file is None and self.tls_cert_file is None:
            return grpc.aio.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca_file.read_bytes() if self.tls_ca_file else None,
            private_key=self.tls_key_file.read_bytes() if self.tls_key_file else None,
            certificate_chain=self.tls_cert_file.read_bytes() if self.tls_cert_file else None,
        )
        return grpc.aio.secure_channel(target, credentials, options=options)


class LedgerClient:
    """Async client. Use `async with LedgerClient("127.0.0.1:50051") as client:`."""

    def __init__(
        self,
        target: str,
        *,
        options: ClientOptions | None = None,
        credentials: ClientCredentials | None = None,
    ) -> None:
        self.target = target
        self.options = options or ClientOptions()
        self.credentials = credentials or ClientCredentials()
        self._channel = self.credentials.channel(target)
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: Callable[..., Awaitable[Response]], request: object) -> Response:
        delay_s = self.options.retry_delay_s_min
        for attempt in range(1, self.options.attempts_max + 1):
            try:
                return await method(
                    request, timeout=self.options.timeout_s, metadata=self.credentials.metadata
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE_CODES or attempt == self.options.attempts_max:
                    raise
            await asyncio.sleep(random.uniform(0, delay_s))
            delay_s = min(delay_s * 2, self.options.retry_delay_s_max)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def create_accounts(self, accounts: Sequence[pb.Account]) -> pb.CreateAccountsResponse:
        request = pb.CreateAccountsRequest(accounts=accounts)
        return await self._call(self.stub.CreateAccounts, request)

    async def lookup_accounts(self, refs: Sequence[pb.AccountRef]) -> pb.LookupAccountsResponse:
        return await self._call(self.stub.LookupAccounts, pb.LookupAccountsRequest(refs=refs))

    async def create_transfers(
        self, transfers: Sequence[pb.Transfer]
    ) -> pb.CreateTransfersResponse:
        request = pb.CreateTransfersRequest(transfers=transfers)
        return await self._call(self.stub.CreateTransfers, request)

    async def lookup_transfers(self, refs: Sequence[pb.TransferRef]) -> pb.LookupTransfersResponse:
        return await self._call(self.stub.LookupTransfers, pb.LookupTransfersRequest(refs=refs))

    async def post_journal(self, request: pb.PostJournalRequest) -> pb.PostJournalResponse:
        return await self._call(self.stub.PostJournal, request)

    async def get_balance(self, merchant_id: str, account_id: str) -> pb.GetBalanceResponse:
        request = pb.GetBalanceRequest(
            account=pb.AccountRef(merchant_id=merchant_id, account_id=account_id)
        )
        return await self._call(self.stub.GetBalance, request)

    async def list_entries(self, request: pb.ListEntriesRequest) -> pb.ListEntriesResponse:
        return await self._call(self.stub.ListEntries, request)
