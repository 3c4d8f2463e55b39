"""The README's grpcurl line for the event stream, done as grpcurl does it.

grpcurl is not packaged for this machine, so the test plays its part with real
parts: it reads the line from the README, learns the method's messages from the
server's reflection service (not from the generated code), turns the line's
JSON into the request with them, calls the method by its path over a real
channel, and reads the first event it streams back as JSON. So the README's
line breaks this test if the method, a field name or reflection changes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import RPC_TIMEOUT_S, Service, account, create_accounts, uid, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
GRPCURL_LINE = re.compile(
    r"grpcurl -plaintext -d '(?P<body>[^']*)' (?P<address>\S+) "
    r"(?P<service>[\w.]+)/(?P<method>\w+)`"
)


def _readme_example() -> re.Match[str]:
    found = [
        m for m in GRPCURL_LINE.finditer(README.read_text()) if m["method"] == "SubscribeEvents"
    ]
    assert len(found) == 1, "the README shows one grpcurl line for SubscribeEvents"
    return found[0]


async def _reflected_pool(service: Service, symbol: str) -> descriptor_pool.DescriptorPool:
    """A descriptor pool built only from what the server's reflection gives for symbol."""
    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)

    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    async for response in stub.ServerReflectionInfo(requests(), timeout=RPC_TIMEOUT_S):
        for raw in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    # Reflection sends the file and its dependencies in no promised order.
    while len(added) < len(files):
        ready = [p for n, p in files.items() if n not in added and set(p.dependency) <= added]
        assert ready, f"reflection left dependencies out: {sorted(set(files) - added)}"
        for proto in ready:
            pool.Add(proto)
            added.add(proto.name)
    return pool


async def test_the_readme_grpcurl_line_streams_events_through_reflection(
    service: Service,
) -> None:
    example = _readme_example()
    pool = await _reflected_pool(service, example["service"])
    method = pool.FindServiceByName(example["service"]).FindMethodByName(example["method"])
    assert method.server_streaming and not method.client_streaming
    request_class: Any = message_factory.GetMessageClass(method.input_type)
    event_class: Any = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(example["body"], request_class())

    feed = service.server.feed

    async def idle() -> bool:
        return feed.subscriptions == 0

    async def following() -> bool:
        return feed.subscriptions > 0

    # "From now" is when the service starts the subscription: the write must follow it.
    await wait_until(idle, what="earlier subscriptions to end")
    call = service.channel.unary_stream(
        f"/{example['service']}/{example['method']}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=event_class.FromString,
    )(request, timeout=RPC_TIMEOUT_S)
    try:
        await wait_until(following, what="the subscription to start")
        merchant = uid("grpcurl")
        await create_accounts(service.stub, account(merchant, "cash"))
        async for event in call:
            shown = json_format.MessageToDict(event)
            if shown.get("merchantId") == merchant:
                break
    finally:
        call.cancel()
    # What grpcurl prints for it: the event as proto3 JSON.
    assert shown["kind"] == "EVENT_KIND_ACCOUNT_CREATED"
    assert shown["account"]["ref"] == {"merchantId": merchant, "accountId": "cash"}
    assert int(shown["position"]) >= 1 and shown["eventId"]
