"""A bare grpc.aio health server, the floor a health call through the service stands on.

`python -m bench.grpc_floor` serves grpc.health.v1 on 127.0.0.1 (port 0: any), on
uvloop as `ledger serve` does, with no interceptor, no telemetry and no ledger,
and prints `serving on PORT` once it listens. bench.cpu_cost measures its CPU per
health call in the same run as the service's, so that the service's own share
of a call is read against gRPC's on the same machine in the same minutes: this
machine's speed moves a health call by 20% between hours.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def _serve(port: int) -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"serving on {bound}", flush=True)
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    uvloop.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
