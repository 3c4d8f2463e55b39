"""What storage reports upward, matched from database errors by SQLSTATE, never text."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import asyncpg

# What a shard answers before its migrations ran (Cluster.migrate): a shard just
# added to the config and not set up yet, to be waited for, never written around.
NOT_SET_UP_ERRORS = (
    asyncpg.exceptions.UndefinedFunctionError,
    asyncpg.exceptions.UndefinedTableError,
)


class ShardUnavailable(Exception):
    """The shard could not be reached or stopped answering; retrying later is safe."""

    def __init__(self, shard_name: str, cause: BaseException | None = None) -> None:
        super().__init__(f"shard {shard_name} is unavailable: {type(cause).__name__}")
        self.shard_name = shard_name


class NotSetUp(Exception):
    """The shard answers but has not been set up yet (migrations, its name and epoch):
    it was down when the replica started, and set-up is being retried."""


class ShardBusy(ShardUnavailable):
    """Every pool connection stayed busy past the acquire timeout: overload, not an outage."""


class StaleEpoch(Exception):
    """The shard has seen a newer config epoch than the caller's; reload and retry."""

    def __init__(self, shard_name: str, shard_epoch: int, caller_epoch: int) -> None:
        super().__init__(f"shard {shard_name} is at epoch {shard_epoch}, caller at {caller_epoch}")
        self.shard_epoch = shard_epoch


class MerchantsNotOwned(Exception):
    """The shard does not own these merchants; values name the new owner if known."""

    def __init__(self, shard_name: str, owners: Mapping[str, str | None]) -> None:
        super().__init__(f"shard {shard_name} does not own {len(owners)} merchant(s)")
        self.shard_name = shard_name
        self.owners = dict(owners)


class MerchantsMoving(Exception):
    """The merchants are being handed to another shard; retry shortly.

    unknown: those this shard has never seen while a rebalance decides who moves
    (claims paused): they are still wherever the previous config placed them."""

    def __init__(
        self, shard_name: str, merchant_ids: list[str], *, unknown: list[str] | None = None
    ) -> None:
        super().__init__(f"shard {shard_name}: {len(merchant_ids)} merchant(s) moving")
        self.merchant_ids = merchant_ids
        self.unknown = unknown or []


class MerchantsUnknown(Exception):
    """A read named merchants this shard has no record of: never created, or not
    handed over yet (the config changed; the rebalance has not marked them here).
    The caller looks where the previous config placed them, else finds nothing."""

    def __init__(self, shard_name: str, merchant_ids: Collection[str]) -> None:
        super().__init__(f"shard {shard_name} does not know {len(merchant_ids)} merchant(s)")
        self.shard_name = shard_name
        self.merchant_ids = frozenset(merchant_ids)


class RunsLocally(Exception):
    """An item reached the saga path but needs no saga: it runs as a local transfer
    instead (nothing was written)."""


class SettleIsLocal(RunsLocally):
    """A settle reached the saga path, but no saga carries its pending transfer: it is
    a local hold and settles in one local transaction (nothing was written)."""


class PartiesShareShard(RunsLocally):
    """A transfer routed across shards whose two parties are on one shard now (a move
    put them together since the ring was read): one local transaction moves it, where
    a saga would reserve and credit through that shard's settlement account for
    itself, and its hold would have to be made local before either party could move."""


class HoldInFlight(Exception):
    """A settle's pending transfer is still being made by its own saga: nothing to
    settle yet, and nothing was written; the same settle succeeds once it is made."""


class RetryTransaction(Exception):
    """A concurrent writer raced this transaction; run it again from the start."""


# SQLSTATEs that mean "the server is gone or refusing work", not "your SQL is wrong".
# 25006 (read-only transaction): the DSN now reaches a standby (a failover, or the
# database set read-only for maintenance); the shard cannot take writes now.
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "53300", "58000", "58030", "25006"})
# (55000 is not here: the append-only trigger raises it for an UPDATE of history. It
# means "unavailable" only while connecting, which Shard handles.)
# Retrying in a fresh transaction is correct for these.
RETRYABLE_STATES = frozenset({"40001", "40P01"})


def cannot_connect_now(error: BaseException) -> bool:
    """The server answered but takes no connections yet (57P03): it is starting up
    or replaying WAL after a crash, and will take them without anyone acting. (A
    server shutting down answers the same; a wait on this must be bounded.)"""
    cause = error.__cause__ if isinstance(error, ShardUnavailable) else error
    return getattr(cause, "sqlstate", None) == "57P03"


def is_unavailable(error: BaseException) -> bool:
    if isinstance(error, OSError | TimeoutError | asyncpg.exceptions.InterfaceError):
        return True
    if isinstance(error, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    state = getattr(error, "sqlstate", None)
    return isinstance(state, str) and (state.startswith("08") or state in _UNAVAILABLE_STATES)
