"""Service settings from the environment (LEDGER_*), with command-line overrides in the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ledger import limits
from ledger.domain.chain import CHECKPOINT_KEY_BYTES_MIN
from ledger.domain.checkpoint_keys import RETIRED_KEYS_MAX, CheckpointKeys


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable."""


def checkpoint_keys_from_env(env: dict[str, str] | None = None) -> CheckpointKeys | None:
    """LEDGER_CHECKPOINT_KEY (signs) and LEDGER_CHECKPOINT_KEYS_RETIRED (still vouch for
    what they signed: keys separated by white space, most recently retired first) as
    UTF-8 bytes; None when no key is set. Refuses short, repeated or orphaned keys."""
    values = env if env is not None else dict(os.environ)
    current = values.get("LEDGER_CHECKPOINT_KEY", "")
    retired = values.get("LEDGER_CHECKPOINT_KEYS_RETIRED", "").split()
    if not current:
        if retired:
            raise SettingsError(
                "LEDGER_CHECKPOINT_KEYS_RETIRED is set without LEDGER_CHECKPOINT_KEY, "
                "without the key that signs now"
            )
        return None
    for name, key in [("LEDGER_CHECKPOINT_KEY", current)] + [
        ("LEDGER_CHECKPOINT_KEYS_RETIRED", k) for k in retired
    ]:
        if len(key.encode()) < CHECKPOINT_KEY_BYTES_MIN:
            raise SettingsError(
                f"{name}: every key must be at least {CHECKPOINT_KEY_BYTES_MIN} bytes "
                "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
    if len(set(retired) | {current}) != len(retired) + 1:
        raise SettingsError(
            "LEDGER_CHECKPOINT_KEYS_RETIRED lists a key twice, or the current key as retired"
        )
    if len(retired) > RETIRED_KEYS_MAX:
        raise SettingsError(
            f"LEDGER_CHECKPOINT_KEYS_RETIRED lists {len(retired)} keys, more than "
            f"{RETIRED_KEYS_MAX}: drop the oldest once every checkpoint they signed is exported"
        )
    return CheckpointKeys(current.encode(), tuple(k.encode() for k in retired))


CARD_METADATA_CHOICES = ("refuse", "mask")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """value (lower-cased), or the first choice when unset; anything else stops start-up."""
    value = value.strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


# A page token key shorter than this is refused at start-up (HMAC-SHA256 keys).
PAGE_TOKEN_KEY_BYTES_MIN = 16


def _page_token_key(value: str) -> bytes | None:
    if not value:
        return None
    key = value.encode()
    if len(key) < PAGE_TOKEN_KEY_BYTES_MIN:
        raise ValueError(f"LEDGER_PAGE_TOKEN_KEY must be at least {PAGE_TOKEN_KEY_BYTES_MIN} bytes")
    return key


@dataclass(frozen=True)
class Settings:
    # host:port the gRPC server listens on.
    listen: str = "127.0.0.1:50051"
    # A shard config file; None means the embedded development cluster.
    config_path: Path | None = None
    # Where the embedded cluster keeps its PostgreSQL data.
    data_dir: Path = Path(".ledger-data")
    concurrent_rpcs_max: int = limits.concurrent_rpcs_max
    # Callers' connections held at once (at most half the file limit, which
    # `ledger serve` raises to its hard value).
    incoming_connections_max: int = limits.incoming_connections_max
    # Saga retries: attempts before the dead-letter list, and the back-off cap.
    saga_attempts_max: int = limits.saga_attempts_max
    saga_retry_delay_s_max: float = limits.saga_retry_delay_s_max
    # Where Prometheus scrapes /metrics ("off" to disable; port 0 picks one).
    metrics_listen: str = "127.0.0.1:9464"
    # How long a replica's claim on a saga lasts before another may resume it.
    saga_lease_s: float = limits.saga_lease_s
    # Bearer tokens (hashes, scopes, merchants); None serves without authentication,
    # which is allowed on a loopback address only, unless allow_unauthenticated.
    auth_file: Path | None = None
    allow_unauthenticated: bool = False
    # Server TLS from PEM files; with a client CA, clients must present certificates.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # How often each shard's hash-chain heads are checkpointed.
    checkpoint_interval_s: float = limits.chain_checkpoint_interval_s
    # The HMAC keys of checkpoints, secrets the shard databases never see: the one that
    # signs and retired ones; None makes checkpoints without a MAC (and the service
    # warns at start-up).
    checkpoint_keys: CheckpointKeys | None = field(default=None, repr=False)
    # Where checkpoints are exported as they are made (one JSON-lines file per shard).
    checkpoint_export_dir: Path | None = None
    # LEDGER_CARD_METADATA: "refuse" (default) refuses metadata values holding a card
    # number with INVALID_ARGUMENT; "mask" stores them cut to the first six and last
    # four digits. Ids and metadata keys holding one are refused either way.
    card_metadata: str = "refuse"
    # LEDGER_PAGE_TOKEN_KEY: signs page tokens; every replica needs the same one (unset:
    # a random key per process, so a token works only on the replica that issued it).
    page_token_key: bytes | None = None

    @property
    def mask_card_metadata(self) -> bool:
        return self.card_metadata == "mask"

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ

        def path(name: str) -> Path | None:
            value = env.get(name)
            return Path(value) if value else None

        return cls(
            listen=env.get("LEDGER_LISTEN", cls.listen),
            config_path=path("LEDGER_CONFIG"),
            data_dir=Path(env.get("LEDGER_DATA_DIR", str(cls.data_dir))),
            concurrent_rpcs_max=int(
                env.get("LEDGER_CONCURRENT_RPCS_MAX", str(limits.concurrent_rpcs_max))
            ),
            incoming_connections_max=int(
                env.get("LEDGER_INCOMING_CONNECTIONS_MAX", str(limits.incoming_connections_max))
            ),
            saga_attempts_max=int(
                env.get("LEDGER_SAGA_ATTEMPTS_MAX", str(limits.saga_attempts_max))
            ),
            saga_retry_delay_s_max=float(
                env.get("LEDGER_SAGA_RETRY_DELAY_S_MAX", str(limits.saga_retry_delay_s_max))
            ),
            metrics_listen=env.get("LEDGER_METRICS_LISTEN", cls.metrics_listen),
            saga_lease_s=float(env.get("LEDGER_SAGA_LEASE_S", str(limits.saga_lease_s))),
            auth_file=path("LEDGER_AUTH_FILE"),
            allow_unauthenticated=env.get("LEDGER_ALLOW_UNAUTHENTICATED", "").lower()
            in ("1", "true", "yes"),
            tls_cert_file=path("LEDGER_TLS_CERT_FILE"),
            tls_key_file=path("LEDGER_TLS_KEY_FILE"),
            tls_client_ca_file=path("LEDGER_TLS_CLIENT_CA_FILE"),
            checkpoint_interval_s=float(
                env.get("LEDGER_CHECKPOINT_INTERVAL_S", str(limits.chain_checkpoint_interval_s))
            ),
            checkpoint_keys=checkpoint_keys_from_env(dict(env)),
            checkpoint_export_dir=path("LEDGER_CHECKPOINT_EXPORT_DIR"),
            page_token_key=_page_token_key(env.get("LEDGER_PAGE_TOKEN_KEY", "")),
            card_metadata=_choice(
                "LEDGER_CARD_METADATA", env.get("LEDGER_CARD_METADATA", ""), CARD_METADATA_CHOICES
            ),
        )
