"""The gRPC server: LedgerService, health, reflection, a concurrency limit, graceful stop."""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ledger import limits
from ledger.api import connections
from ledger.api.admin_servicer import LedgerAdminServicer
from ledger.api.admission import AdmissionInterceptor
from ledger.api.auth import Authenticator, TokenTable
from ledger.api.cert_expiry import CertificateExpiryWatch
from ledger.api.decode import PageTokens
from ledger.api.events import EventStreams
from ledger.api.servicer import LedgerServicer
from ledger.api.tls import ServerTls
from ledger.api.token_watch import TokenFileWatcher, warn_expiring
from ledger.core.checkpoints import ChainCheckpointer
from ledger.core.event_feed import EventFeed
from ledger.core.event_sequencer import EventSequencer
from ledger.core.expiry import ExpirySweeper
from ledger.core.ledger import Ledger
from ledger.domain.checkpoint_keys import CheckpointKeys
from ledger.domain.sagas import SagaKind, SagaState
from ledger.routing.cluster import Cluster
from ledger.routing.config_watch import ConfigWatcher
from ledger.sagas.recovery import RecoveryWorker
from ledger.sagas.runner import SagaRunner, SagaSettings
from ledger.storage.checkpoint_export import CheckpointExport
from ledger.storage.due_probe import DueProbes
from ledger.storage.shard import SHARD_ERROR_KINDS
from ledger.telemetry import metrics
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
ADMIN_SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerAdminService"].full_name


def _replica_id() -> str:
    """Names this process in saga leases, so a claim shows who holds it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _random_page_token_key() -> bytes:
    log.warning(
        "LEDGER_PAGE_TOKEN_KEY is not set: page tokens are signed with a key of this "
        "process and work only on this replica, until it restarts"
    )
    return secrets.token_bytes(32)


class LedgerServer:
    """Serves one cluster. start() returns the bound port (useful with port 0)."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        listen: str,
        concurrent_rpcs_max: int = limits.concurrent_rpcs_max,
        saga_settings: SagaSettings | None = None,
        tokens: TokenTable | None = None,
        tls: ServerTls | None = None,
        checkpoint_interval_s: float = limits.chain_checkpoint_interval_s,
        checkpoint_keys: CheckpointKeys | None = None,
        checkpoint_export_dir: Path | None = None,
        request_receive_timeout_s: float = limits.request_receive_timeout_s,
        mask_card_metadata: bool = False,
        page_token_key: bytes | None = None,
        reuse_port: bool = False,
        polls_for_others: bool = True,
        incoming_connections_max: int = limits.incoming_connections_max,
    ) -> None:
        """polls_for_others: this process looks for work other processes left
        (holds due, sagas due, outboxes) and refreshes the shard gauges; a
        replica's other workers (ledger/workers.py) only react to their own."""
        self.cluster = cluster
        self.listen = listen
        self.tls = tls
        self.cert_watch: CertificateExpiryWatch | None = None
        # A worker that leaves others' work to worker 0 waits for its own.
        background_idle_s = limits.background_idle_poll_s_max if polls_for_others else math.inf
        events_idle_s = limits.event_idle_poll_s if polls_for_others else math.inf
        # The idle workers' looks at the shards, one read per shard and tick.
        due_probes = DueProbes()
        self.sweeper = ExpirySweeper(cluster, idle_poll_s=background_idle_s, due_probes=due_probes)
        self.checkpointer = ChainCheckpointer(
            cluster,
            interval_s=checkpoint_interval_s,
            keys=checkpoint_keys,
            export=CheckpointExport(checkpoint_export_dir) if checkpoint_export_dir else None,
        )
        if checkpoint_keys is None:
            log.warning(
                "LEDGER_CHECKPOINT_KEY is not set: checkpoints carry no MAC, so someone who "
                "can write a shard database can rewrite history and its checkpoints unseen "
                "by `ledger verify` alone"
            )
        if checkpoint_export_dir is None:
            log.warning(
                "LEDGER_CHECKPOINT_EXPORT_DIR is not set: checkpoints are not exported outside "
                "the shard databases, so `ledger verify --against` has nothing to hold them to"
            )
        self.config_watch = ConfigWatcher(cluster)
        self.sagas = SagaRunner(cluster, owner=_replica_id(), settings=saga_settings)
        self.recovery = RecoveryWorker(
            self.sagas,
            idle_poll_s=background_idle_s,
            refreshes_gauges=polls_for_others,
            due_probes=due_probes,
        )
        self.sequencer = EventSequencer(cluster, idle_poll_s=events_idle_s, due_probes=due_probes)
        self.feed = EventFeed(cluster)
        self.sequencer.on_sequenced = self.feed.wake
        # The workers sleep until work is due; work this replica makes wakes them.
        self.sweeper.on_sagas_started = self.recovery.schedule.wake_within
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        # Admission decides from the headers alone (a refused call's body is
        # never read; an admitted one must arrive within the receive deadline);
        # then every admitted call is traced and counted, held under the
        # concurrency limit, authorized, and only then parsed.
        self.token_watch: TokenFileWatcher | None = None
        auth: Authenticator | None = None
        if tokens is not None:
            auth = Authenticator(tokens)
            warn_expiring(tokens)
            if tokens.path is not None:
                self.token_watch = TokenFileWatcher(auth, tokens.path)
        self.admission = AdmissionInterceptor(
            auth=auth,
            receive_timeout_s=request_receive_timeout_s,
            caller_calls_max=limits.caller_calls_max(concurrent_rpcs_max),
            concurrent_rpcs_max=concurrent_rpcs_max,
        )
        self.server = grpc.aio.server(
            # One interceptor, not a chain (see ledger/api/admission.py).
            interceptors=[self.admission],
            # No maximum_concurrent_rpcs: gRPC counts a call from its headers,
            # so silent callers could exhaust it and starve health checks. The
            # bounds instead: streams per connection, the receive deadline, the
            # concurrency limit on calls whose request arrived (see limits.py).
            options=[
                ("grpc.max_concurrent_streams", limits.streams_per_connection_max),
                ("grpc.max_receive_message_length", limits.request_bytes_max),
                ("grpc.max_send_message_length", limits.response_bytes_max),
                # gRPC refuses headers between the soft and the hard limit at
                # random; one value for both makes the limit exact.
                ("grpc.max_metadata_size", limits.request_metadata_bytes_max),
                ("grpc.absolute_max_metadata_size", limits.request_metadata_bytes_max),
                # Callers' connections within their share of the file limit, and
                # none silent for long (ledger/api/connections.py).
                (
                    "grpc.max_allowed_incoming_connections",
                    connections.incoming_connections_max(incoming_connections_max),
                ),
                ("grpc.server_handshake_timeout_ms", limits.connection_handshake_timeout_ms),
            ]
            # Several service processes listen on one port (ledger/workers.py); the
            # kernel spreads incoming connections, not calls, over them.
            + ([("grpc.so_reuseport", 1)] if reuse_port else []),
        )
        self.ledger = ledger = Ledger(cluster, self.sagas)
        ledger.on_hold_timeout = self.sweeper.wake_within
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
            LedgerServicer(
                ledger,
                page_tokens=PageTokens(page_token_key or _random_page_token_key()),
                events=EventStreams(self.feed),
                mask_card_metadata=mask_card_metadata,
            ),
            self.server,
        )
        ledger_pb2_grpc.add_LedgerAdminServiceServicer_to_server(
            LedgerAdminServicer(self.sagas, ledger), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = 0

    async def start(self) -> int:
        if self.tls is None:
            self.port = self.server.add_insecure_port(self.listen)
        else:
            credentials = self.tls.credentials()
            # Read before listening: a certificate that does not parse stops the server.
            self.cert_watch = CertificateExpiryWatch(self.tls.cert_file)
            self.port = self.server.add_secure_port(self.listen, credentials)
        if self.port == 0:
            raise RuntimeError(f"could not listen on {self.listen}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.sweeper.start()
        self.checkpointer.start()
        self.recovery.start()
        self.sequencer.start()
        self.config_watch.start()
        if self.token_watch is not None:
            self.token_watch.start()
        if self.cert_watch is not None:
            self.cert_watch.start()
        metrics.register_gauge_source("pool", self._pool_gauge)
        self._export_counters_at_zero()
        log.info("serving ledger.v1 on port %d (epoch %d)", self.port, self.cluster.epoch)
        return self.port

    async def stop(self, grace_s: float = limits.shutdown_grace_s) -> None:
        """Stops taking calls, lets in-flight ones finish within grace_s, stops workers."""
        await self.health.enter_graceful_shutdown()
        # Event subscriptions end at once (their clients resume by cursor elsewhere)
        # instead of holding the shutdown for its whole grace.
        await self.feed.close()
        await self.server.stop(grace_s)
        await self.sequencer.stop()
        await self.config_watch.stop()
        if self.token_watch is not None:
            await self.token_watch.stop()
        if self.cert_watch is not None:
            await self.cert_watch.stop()
        await self.recovery.stop()
        await self.sagas.close()
        await self.sweeper.stop()
        await self.checkpointer.stop()

    def reload_tokens(self) -> bool:
        """Rereads the token file now (SIGHUP); False if there is none or it did not parse."""
        return self.token_watch is not None and self.token_watch.reload()

    def _export_counters_at_zero(self) -> None:
        """Failure counters read 0 on a healthy replica instead of being absent."""
        for kind in SagaKind:
            metrics.saga_attempts_failed.exported_at_zero({"kind": kind.name})
            for state in (SagaState.COMPLETED, SagaState.COMPENSATED):
                metrics.sagas_finished.exported_at_zero({"kind": kind.name, "state": state.name})
        for name in self.cluster.shards:
            for error_kind in SHARD_ERROR_KINDS:
                metrics.shard_errors.exported_at_zero({"shard": name, "kind": error_kind})

    def _pool_gauge(self) -> list[tuple[float, dict[str, str]]]:
        values: list[tuple[float, dict[str, str]]] = []
        for name, shard in self.cluster.shards.items():
            try:
                in_use, size = shard.pool_stats()
            except Exception:
                continue
            values += [
                (in_use, {"shard": name, "state": "in_use"}),
                (size, {"shard": name, "state": "open"}),
            ]
        return values

    async def wait(self) -> None:
        await self.server.wait_for_termination()
