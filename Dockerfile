# The ledger gRPC service, as run by docker-compose.yml.
#
# The image holds the service only: the PostgreSQL shards and Jaeger are separate
# containers, and the shard map comes from /app/shard_config (mounted read-only by
# docker-compose.yml; a copy of the repository's shard_config/ is baked in so that
# `docker run` on its own still finds a config).
FROM python:3.11-slim

# No .pyc files in the image layers (they would be stale copies), unbuffered logs so
# `docker logs` shows lines as they happen, and no pip self-update chatter at build time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged uid so that volume permissions are predictable across rebuilds.
# The service never writes to /app: the code stays root-owned and read-only to it.
RUN groupadd --system --gid 10001 ledger \
 && useradd --system --uid 10001 --gid ledger --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin ledger

WORKDIR /app

# Dependencies and the package are installed in one step: every runtime dependency
# ships manylinux wheels for CPython 3.11, so no compiler is needed in the image.
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY ledger ./ledger
COPY scripts ./scripts
RUN pip install --no-cache-dir . \
 && rm -rf build ./*.egg-info

COPY shard_config ./shard_config

USER ledger

# Inside a container the service must listen on every interface, or the published
# port reaches nothing; outside a container the safer default (127.0.0.1) applies.
# Off loopback the service refuses to start without a token file: mount one and
# set LEDGER_AUTH_FILE (see `ledger auth token`), or set
# LEDGER_ALLOW_UNAUTHENTICATED=true on a trusted network (docker-compose.yml does).
ENV LEDGER_LISTEN=0.0.0.0:50051
EXPOSE 50051

# Healthy means the standard grpc.health.v1 service answers SERVING for the whole server
# (service ""). The 2 s deadline keeps a hung server from blocking the probe; any error,
# including a refused connection or a missed deadline, exits non-zero.
# The same command is used by docker-compose.yml; tests/test_deployment_files.py runs both.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2, health_pb2_grpc; channel = grpc.insecure_channel('127.0.0.1:50051'); reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=''), timeout=2); sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)"]

CMD ["ledger", "serve", "--config", "/app/shard_config/docker.toml"]
