"""A bare grpc.aio server, the floor a call through the service stands on.

`python -m bench.grpc_floor` serves, on 127.0.0.1 (port 0: any) and on uvloop as
`ledger serve` does, with no interceptor, no telemetry and no ledger:

- grpc.health.v1, whose CPU per call bench.cpu_cost measures in the same run as
  the service's, so that the service's own share of a health call is read
  against gRPC's in the same minutes (this machine's speed moves a health call
  by 20% between hours);
- ledger.v1.LedgerService's CreateTransfers, answering OK for every item with
  no work at all: the bench's floor modes (`floor_single`, `floor_batch`)
  drive it with the benchmark's callers to measure what gRPC and the callers
  cost per transfer under load, the part of a call no change to the ledger can
  remove (bench/budget.py).

It prints `serving on PORT` once it listens.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

import grpc
import uvloop
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.cluster import ROOT
from ledger.v1 import ledger_pb2 as pb

# The server says it listens within this long.
START_TIMEOUT_S = 30.0


async def _create_transfers_with_no_work(
    request: pb.CreateTransfersRequest, context: Any
) -> pb.CreateTransfersResponse:
    """CreateTransfers answered as the service answers new transfers, with no work."""
    created_at = Timestamp()
    created_at.GetCurrentTime()
    return pb.CreateTransfersResponse(
        results=[
            pb.CreateTransferResult(
                index=index, id=t.id, result=pb.TRANSFER_RESULT_OK, created_at=created_at
            )
            for index, t in enumerate(request.transfers)
        ]
    )


# Only CreateTransfers: the one method the benchmark's callers use.
_NO_WORK_LEDGER = grpc.method_handlers_generic_handler(
    pb.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    {
        "CreateTransfers": grpc.unary_unary_rpc_method_handler(
            _create_transfers_with_no_work,
            request_deserializer=pb.CreateTransfersRequest.FromString,
            response_serializer=pb.CreateTransfersResponse.SerializeToString,
        )
    },
)


async def _serve(port: int) -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_NO_WORK_LEDGER,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"serving on {bound}", flush=True)
    await server.wait_for_termination()


@contextlib.contextmanager
def started() -> Iterator[tuple[str, int]]:
    """(target, pid) of a bare server in a process of its own, stopped on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = _line_within(process.stdout, START_TIMEOUT_S)
        if not line.startswith("serving on "):
            raise RuntimeError(f"bench.grpc_floor did not start: {line!r}")
        yield f"127.0.0.1:{int(line.split()[-1])}", process.pid
    finally:
        process.kill()
        process.wait()


def _line_within(stream: IO[str], timeout_s: float) -> str:
    """The stream's next line, or "" if it had nothing to read within timeout_s (the
    server writes its one line whole)."""
    readable, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if readable else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
