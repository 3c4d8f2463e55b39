"""Bearer-token authentication with scopes and optional merchant restriction.

Tokens live in a TOML file as SHA-256 hashes only (`ledger auth token` makes
one): a leaked config file gives no usable token. Tokens are long random
strings, so a plain hash is as strong as a slow KDF would be, and cheap enough
to check on every call. A presented token is compared against every stored hash
with a constant-time comparison, so timing does not tell how close a guess was.

Every method of the ledger's services needs a scope (read, write, admin); a
method not listed here is refused (fail closed) unless its service is one of
the open ones (health, reflection). A token restricted to merchants may only
name those merchants in a request; the servicers check that after decoding,
through `require_merchants`, which reads the caller from a context variable the
interceptor sets.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import json
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from ledger.api.status import AbortError, with_reason
from ledger.v1 import ledger_pb2

TOKEN_PREFIX = "lt_"
# 32 random bytes: guessing is out of reach, so one SHA-256 is enough.
TOKEN_RANDOM_BYTES = 32
# A token file with more entries than this is a mistake, and every call checks them all.
TOKENS_MAX = 1000
# Longer presented tokens are refused before hashing.
TOKEN_CHARS_MAX = 256


class Scope(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


def _method_scopes() -> dict[str, Scope]:
    reads = {
        "LookupAccounts", "ListAccounts", "LookupTransfers", "GetBalance", "ListEntries",
        "SubscribeEvents", "SubscribeEventBatches", "AckEvents",
    }  # fmt: skip
    writes = {"CreateAccounts", "SetAccountsClosed", "CreateTransfers", "PostJournal"}
    scopes: dict[str, Scope] = {}
    for service in ledger_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if service.name == "LedgerAdminService":
                scopes[path] = Scope.ADMIN
            elif method.name in reads:
                scopes[path] = Scope.READ
            elif method.name in writes:
                scopes[path] = Scope.WRITE
    return scopes


# Full method path -> the scope it needs. Built from the proto so a new method
# without a scope is caught by the check below, not left open.
METHOD_SCOPES = _method_scopes()
assert all(
    f"/{s.full_name}/{m.name}" in METHOD_SCOPES
    for s in ledger_pb2.DESCRIPTOR.services_by_name.values()
    for m in s.methods
), "every ledger method needs a scope"


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[Scope]
    # None: any merchant.
    merchants: frozenset[str] | None


@dataclass(frozen=True)
class _StoredToken:
    principal: Principal
    sha256: bytes
    # From this moment on the token is refused; None: it does not expire.
    expires_at: datetime | None = None


class TokenFileError(ValueError):
    pass


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)


class TokenTable:
    """The tokens of one file; authenticate() is constant-time in the presented token."""

    def __init__(self, tokens: Iterable[_StoredToken], *, path: Path | None = None) -> None:
        # The file the table was read from, so the server can reload it.
        self.path = path
        self._tokens = tuple(tokens)
        if not self._tokens:
            raise TokenFileError("the token file holds no token")
        if len(self._tokens) > TOKENS_MAX:
            raise TokenFileError(f"more than {TOKENS_MAX} tokens")

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise TokenFileError(f"{path}: {error}") from None
        entries = document.get("token")
        if not isinstance(entries, list):
            raise TokenFileError(f"{path}: expected [[token]] tables")
        return cls((_stored_token(path, i, entry) for i, entry in enumerate(entries)), path=path)

    def authenticate(self, token: str, *, now: datetime | None = None) -> Principal | None:
        """The token's principal; None for an unknown token or one past its expiry."""
        presented = hashlib.sha256(token.encode(errors="replace")).digest()
        found: _StoredToken | None = None
        # No early exit: every stored hash is compared, whatever matches.
        for stored in self._tokens:
            if hmac.compare_digest(presented, stored.sha256):
                found = stored
        if found is None:
            return None
        if found.expires_at is not None and (now or datetime.now(UTC)) >= found.expires_at:
            return None
        return found.principal

    @property
    def count(self) -> int:
        return len(self._tokens)

    def expiring(self) -> list[tuple[str, datetime]]:
        """Names and expiry times of the tokens that expire, soonest first."""
        return sorted(
            ((t.principal.name, t.expires_at) for t in self._tokens if t.expires_at is not None),
            key=lambda item: item[1],
        )


def _stored_token(path: Path, index: int, entry: Any) -> _StoredToken:
    where = f"{path}: token[{index}]"
    if not isinstance(entry, dict):
        raise TokenFileError(f"{where}: must be a table")
    name, digest, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
    if not isinstance(name, str) or not name:
        raise TokenFileError(f"{where}: name must be a non-empty string")
    if not isinstance(digest, str) or len(digest) != 64:
        raise TokenFileError(f"{where}: sha256 must be 64 hex digits")
    try:
        digest_bytes = bytes.fromhex(digest)
    except ValueError:
        raise TokenFileError(f"{where}: sha256 must be 64 hex digits") from None
    if not isinstance(scopes, list) or not scopes:
        raise TokenFileError(f"{where}: scopes must be a non-empty list")
    try:
        scope_set = frozenset(Scope(s) for s in scopes)
    except ValueError:
        raise TokenFileError(f"{where}: scopes must be among read, write, admin") from None
    merchants = entry.get("merchants")
    if merchants is not None and (
        not isinstance(merchants, list)
        or not merchants
        or not all(isinstance(m, str) and m for m in merchants)
    ):
        raise TokenFileError(f"{where}: merchants must be a non-empty list of merchant ids")
    expires_at = entry.get("expires_at")
    if expires_at is not None and (
        not isinstance(expires_at, datetime) or expires_at.tzinfo is None
    ):
        raise TokenFileError(
            f"{where}: expires_at must be a TOML date-time with an offset, "
            "e.g. 2027-01-31T00:00:00Z"
        )
    return _StoredToken(
        Principal(name, scope_set, frozenset(merchants) if merchants is not None else None),
        digest_bytes,
        expires_at,
    )


def token_entry(
    name: str,
    token: str,
    scopes: Iterable[Scope],
    merchants: Iterable[str],
    *,
    expires_at: datetime | None = None,
) -> str:
    """The TOML block to add to a token file for this token (holds only its hash)."""
    lines = [
        "[[token]]",
        f"name = {_toml_string(name)}",
        f"sha256 = {_toml_string(hash_token(token))}",
        "scopes = [" + ", ".join(_toml_string(s.value) for s in scopes) + "]",
    ]
    merchant_list = list(merchants)
    if merchant_list:
        lines.append("merchants = [" + ", ".join(_toml_string(m) for m in merchant_list) + "]")
    if expires_at is not None:
        assert expires_at.tzinfo is not None, "an expiry is an absolute time"
        moment = expires_at.astimezone(UTC).replace(microsecond=0)
        lines.append(f"expires_at = {moment.isoformat().replace('+00:00', 'Z')}")
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    # A JSON string without ASCII escaping is a valid TOML basic string: quotes,
    # backslashes and control characters are escaped the same way in both,
    # except DEL, which JSON leaves bare and TOML refuses.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


# The authenticated caller of the current call; None when auth is off.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "ledger_principal", default=None
)


def require_merchants(fields: Iterable[tuple[str, str]]) -> None:
    """Refuses the call if the caller's token does not cover a merchant it names.

    fields are (field path, merchant id) pairs from the decoded request.
    """
    principal = current_principal.get()
    if principal is None or principal.merchants is None:
        return
    for field, merchant_id in fields:
        if merchant_id not in principal.merchants:
            raise with_reason(
                grpc.StatusCode.PERMISSION_DENIED,
                "MERCHANT_NOT_PERMITTED",
                f"the token does not cover the merchant in {field}",
                field=field,
            )


def require_unrestricted() -> None:
    """For cluster-wide listings, which a merchant-restricted token may not see."""
    principal = current_principal.get()
    if principal is not None and principal.merchants is not None:
        raise with_reason(
            grpc.StatusCode.PERMISSION_DENIED,
            "MERCHANT_RESTRICTED_TOKEN",
            "this call lists every merchant; it needs a token not restricted to merchants",
        )


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and 0 < len(token) <= TOKEN_CHARS_MAX:
                return token.strip()
            return None
    return None


class Authenticator:
    """Decides from a call's headers: UNAUTHENTICATED without a valid token,
    PERMISSION_DENIED without the method's scope (ledger/api/admission.py asks)."""

    def __init__(self, tokens: TokenTable) -> None:
        # Replaced whole by a reload (one assignment: a call sees the old or the new table).
        self.tokens = tokens

    def admit(
        self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> tuple[Principal | None, AbortError | None]:
        """The caller the headers name and why they do not admit the call (None: they do);
        reads no body. method: the full path, "/package.Service/Method"."""
        scope = METHOD_SCOPES.get(method)
        token = _bearer(metadata)
        principal = self.tokens.authenticate(token) if token is not None else None
        return principal, _refusal(principal, token is not None, scope)


def _refusal(
    principal: Principal | None, presented: bool, scope: Scope | None
) -> AbortError | None:
    if principal is None:
        message = (
            "invalid, revoked or expired bearer token"
            if presented
            else "a bearer token is required"
        )
        return with_reason(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", message)
    if scope is None:
        return with_reason(grpc.StatusCode.PERMISSION_DENIED, "UNKNOWN_METHOD", "unknown method")
    if scope not in principal.scopes:
        return with_reason(
            grpc.StatusCode.PERMISSION_DENIED,
            "SCOPE_MISSING",
            f"this call needs the {scope.value} scope",
            scope=scope.value,
        )
    return None
