"""Reloads the token file when it changes and on SIGHUP, so a revoked token stops
working within seconds on every replica, without a restart.

A file that no longer parses keeps the tokens in force and logs an error: the
service stays up, and the operator sees the reload fail instead of guessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from ledger import limits
from ledger.api.auth import Authenticator, TokenFileError, TokenTable

log = logging.getLogger(__name__)


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    """Changes whenever the file is edited in place or replaced by a rename."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class TokenFileWatcher:
    def __init__(
        self,
        interceptor: Authenticator,
        path: Path,
        *,
        interval_s: float = limits.token_file_poll_interval_s,
    ) -> None:
        self.interceptor = interceptor
        self.path = path
        self.interval_s = interval_s
        self._seen = _fingerprint(path)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="token-file-watch")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def reload(self) -> bool:
        """Reads the file now (SIGHUP calls this); True if the new tokens are in force."""
        self._seen = _fingerprint(self.path)
        try:
            tokens = TokenTable.load(self.path)
        except TokenFileError as error:
            log.error("token file not reloaded, the previous tokens stay in force: %s", error)
            return False
        self.interceptor.tokens = tokens
        log.info("token file reloaded: %d token(s)", tokens.count)
        warn_expiring(tokens)
        return True

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            if self._stop.is_set():
                return
            if _fingerprint(self.path) != self._seen:
                self.reload()


def warn_expiring(tokens: TokenTable, *, now: datetime | None = None) -> None:
    """Names the tokens that expired or expire soon, so their callers can be given new ones."""
    moment = now or datetime.now(UTC)
    for name, expires_at in tokens.expiring():
        left = expires_at - moment
        if left.total_seconds() <= 0:
            log.warning("token %r expired at %s", name, expires_at.isoformat())
        elif left <= limits.token_expiry_warning:
            log.warning("token %r expires at %s", name, expires_at.isoformat())
