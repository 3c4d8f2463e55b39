"""Merchant ids appear in telemetry only as keyed hashes (HMAC-SHA256).

The key comes from LEDGER_PSEUDONYM_KEY, shared by every replica so that one
merchant has one pseudonym everywhere. Without it a random key is made per
process: telemetry stays safe, but pseudonyms then differ between replicas.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets

PSEUDONYM_KEY_ENV = "LEDGER_PSEUDONYM_KEY"
# 16 hex digits (64 bits) tell merchants apart in any realistic cluster.
_PSEUDONYM_HEX_DIGITS = 16

_key: bytes | None = None


def _load_key() -> bytes:
    global _key
    if _key is None:
        configured = os.environ.get(PSEUDONYM_KEY_ENV)
        if configured:
            _key = configured.encode()
        else:
            logging.getLogger(__name__).warning(
                "%s is not set: merchant pseudonyms are random for this process", PSEUDONYM_KEY_ENV
            )
            _key = secrets.token_bytes(32)
    return _key


def pseudonymise(merchant_id: str) -> str:
    digest = hmac.new(_load_key(), merchant_id.encode(), hashlib.sha256).hexdigest()
    return "m_" + digest[:_PSEUDONYM_HEX_DIGITS]
