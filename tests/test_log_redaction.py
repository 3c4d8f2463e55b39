"""Logs are JSON, and card numbers, secrets and merchant ids never reach them in clear.

redact() is tested directly; setup_logging() in a child process (it rewires every
logger of the process, which must not happen to pytest's own); and the service as
a real process (ProcessCluster), whose whole log file is read back after calls
that carry a card number in metadata, in an error and in a logged transfer id,
and after a saga that only the recovery worker could finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from ledger.routing.config import ShardConfig, ShardSpec
from ledger.telemetry.card_numbers import (
    _CANDIDATE,
    PAN_DIGITS_MIN,
    _card_ranges_in_run,
    card_number_ranges,
    contains_card_number,
    mask_card_numbers,
)
from ledger.telemetry.logs import JsonFormatter
from ledger.telemetry.redaction import CARD_MASK, SECRET_MASK, luhn_valid, redact
from ledger.v1 import ledger_pb2 as pb
from ledger.v1 import ledger_pb2_grpc
from tests.process_cluster import ROOT, ProcessCluster
from tests.support import (
    RPC_TIMEOUT_S,
    account,
    create_accounts,
    field_violations,
    ref,
    transfer,
    uid,
    wait_until,
    write_config,
)
from tests.test_otlp_export import EXPORTED_METRICS, SCRAPE_TIMEOUT_S

CARD = "4111 1111 1111 1111"
CARD_DIGITS = CARD.replace(" ", "")
# The shards trust local connections, so a password in their DSNs is accepted and unused:
# it exists only to prove that it never reaches the log.
DSN_PASSWORD = "Sup3rS3cretPw"
# A child Python process (imports plus a few log lines) finishes within this long.
CHILD_TIMEOUT_S = 60
# Quick saga recovery: leases run out after 1 s, back-off is capped at 0.5 s.
SERVICE_ENV = {
    "LEDGER_SAGA_LEASE_S": "1",
    "LEDGER_SAGA_RETRY_DELAY_S_MAX": "0.5",
    "LEDGER_METRICS_LISTEN": "127.0.0.1:0",
}
# A cross-shard call made while a shard is down answers (IN_PROGRESS or
# SHARD_UNAVAILABLE) well within this: one connect attempt times out after 2 s.
OUTAGE_CALL_TIMEOUT_S = 8.0


def with_check_digit(body: str) -> str:
    """body plus the Luhn check digit that makes the whole number valid."""
    for digit in "0123456789":
        if luhn_valid(body + digit):
            return body + digit
    raise AssertionError("unreachable: one check digit always fits")


def spaced(digits: str, separator: str) -> str:
    return separator.join(digits[i : i + 4] for i in range(0, len(digits), 4))


# --- redact() ----------------------------------------------------------------------------


@pytest.mark.parametrize("length", range(13, 20))
@pytest.mark.parametrize("separator", ["", " ", "  ", "-", ".", "\t", " - ", "\u00a0"])
def test_luhn_valid_numbers_of_13_to_19_digits_are_masked(length: int, separator: str) -> None:
    card = spaced(with_check_digit("4" + "7" * (length - 2)), separator)
    masked = redact(f"paid with {card}, thanks")
    assert masked == f"paid with {CARD_MASK}, thanks"


@pytest.mark.parametrize(
    "card",
    [CARD, "4111-1111-1111-1111", CARD_DIGITS, "378282246310005", "5555 5555 5555 4444"],
)
def test_well_known_test_card_numbers_are_masked_anywhere_in_a_line(card: str) -> None:
    assert redact(f"card={card}") == f"card={CARD_MASK}"
    assert redact(f'{{"pan": "{card}"}}') == f'{{"pan": "{CARD_MASK}"}}'
    assert redact(f"x{card}y") == f"x{CARD_MASK}y"


def test_a_tab_separated_card_number_is_masked_in_a_json_log_line() -> None:
    """JSON writes a tab as the two characters \\t; the message is redacted before that."""
    record = logging.LogRecord(
        "ledger.test", logging.INFO, __file__, 1, "card %s", ("4111\t1111\t1111\t1111",), None
    )
    line = JsonFormatter().format(record)
    assert json.loads(line)["message"] == f"card {CARD_MASK}"
    assert "1111" not in line


@pytest.mark.parametrize(
    "card", ["4111  1111  1111  1111", "4111.1111.1111.1111", "4111\t1111\t1111\t1111"]
)
def test_the_log_and_the_api_use_one_detector(card: str) -> None:
    """What the API refuses as a card number is exactly what the log masks."""
    assert contains_card_number(card)
    assert redact(card) == CARD_MASK
    assert mask_card_numbers(card) == "411111******1111"


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # fails the Luhn check
        "4111111111111112",
        with_check_digit("4" * 11),  # 12 digits: too short, even though Luhn-valid
        with_check_digit("4" * 19),  # 20 digits: too long, even though Luhn-valid
        "transfer t-1 amount_minor=1500 at 2024-05-01T10:00:00.123Z",
        "trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7",
    ],
)
def test_other_digit_runs_are_left_alone(text: str) -> None:
    assert redact(text) == text


@settings(max_examples=2000, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from("0123456789 \t.-\u00a0a\u0664"),
        min_size=PAN_DIGITS_MIN,
        max_size=40,
    )
)
def test_the_ascii_pre_check_never_hides_a_card_number_the_full_search_finds(text: str) -> None:
    """The detector's pre-check (bytes for ASCII text, issue 18) only skips texts in which
    the candidate pattern and the Luhn windows find nothing either."""
    full: list[tuple[int, int]] = []
    for match in _CANDIDATE.finditer(text):
        full += _card_ranges_in_run(match.group(0), match.start())
    assert card_number_ranges(text) == full


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        ("postgresql://ledger:hunter2@shard-a:5432/ledger", "hunter2", "postgresql://ledger:"),
        ("dsn=postgres://app:p4ss:w0rd@db/x?sslmode=require", "p4ss:w0rd", "@db/x"),
        ("connecting with password=hunter2 to shard-a", "hunter2", "password="),
        ("PASSWORD: hunter2", "hunter2", "PASSWORD"),
        ("token: eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9", "token: "),
        ("api_key=AKIA1234567890", "AKIA1234567890", "api_key="),
        ("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl", "Authorization: "),
        ("sent header bearer abcdefgh12345678", "abcdefgh12345678", "bearer "),
    ],
)
def test_dsn_passwords_and_tokens_are_masked(text: str, secret: str, kept: str) -> None:
    masked = redact(text)
    assert secret not in masked
    assert SECRET_MASK in masked
    assert kept in masked


def test_card_number_next_to_other_digit_groups_is_masked() -> None:
    """A card number followed by its expiry, or after a quantity, is still a card number."""
    for text in (f"card {CARD} 12/26", f"card {CARD} 123", f"qty 2 {CARD}", f"{CARD}-7"):
        masked = redact(text)
        assert CARD not in masked, f"{text!r} -> {masked!r}"


def test_secrets_under_compound_or_quoted_keys_are_masked() -> None:
    """Keys as configs and dict reprs spell them: access_token, db_password, 'password': ..."""
    for text in (
        "access_token=tok_live_abcdef",
        "client_secret=cs_abcdef123",
        "PGPASSWORD=hunter2pw",
        "{'password': 'hunter2pw'}",
        '{"token": "tok_live_abcdef"}',
    ):
        masked = redact(text)
        for secret in ("tok_live_abcdef", "cs_abcdef123", "hunter2pw"):
            assert secret not in masked, f"{text!r} -> {masked!r}"


# --- setup_logging() ----------------------------------------------------------------------

_LOGGING_CHILD = textwrap.dedent(
    """
    import logging, sys
    from opentelemetry.sdk.trace import TracerProvider

    # A library logger with a handler of its own that bypasses the root logger,
    # created before set-up, as third-party libraries do at import.
    library = logging.getLogger("some.library")
    library.addHandler(logging.StreamHandler(sys.stderr))
    library.propagate = False

    from ledger.telemetry.logs import setup_logging
    setup_logging()
    log = logging.getLogger("ledger.test")
    library.warning("connect %s failed", "postgresql://ledger:{password}@db:5432/ledger")
    log.info("card %s in metadata", "{card}")
    try:
        raise ValueError("bad key {card}")
    except ValueError:
        log.exception("refused with password={password}")
    tracer = TracerProvider().get_tracer("child")
    with tracer.start_as_current_span("work") as span:
        log.info("inside a span")
        print(format(span.get_span_context().trace_id, "032x"), flush=True)
    """
)


def test_setup_logging_writes_redacted_json_for_every_logger() -> None:
    script = _LOGGING_CHILD.format(password=DSN_PASSWORD, card=CARD)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(e, dict) for e in entries)
    assert [e["logger"] for e in entries] == [
        "some.library",
        "ledger.test",
        "ledger.test",
        "ledger.test",
    ]
    for secret in (DSN_PASSWORD, CARD, CARD_DIGITS):
        assert secret not in done.stderr
    assert CARD_MASK in entries[1]["message"]
    assert CARD_MASK in entries[2]["exception"]
    assert entries[2]["level"] == "ERROR"
    assert "trace_id" not in entries[1]
    assert entries[3]["trace_id"] == done.stdout.strip()
    assert len(entries[3]["span_id"]) == 16


_NATIVE_CHILD = textwrap.dedent(
    """
    import logging, os
    from ledger.telemetry.logs import setup_logging
    setup_logging(route_native_stderr=True)
    # Native code writing to file descriptor 2 directly, as gRPC's C core does.
    os.write(2, b"E1204 13:28:03.382493   12990 fake.cc:7] peer sent {card}\\n")
    os.write(2, b"plain native text {dotted}\\n")
    import grpc
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        grpc.channel_ready_future(channel).result(timeout=0.2)
    except grpc.FutureTimeoutError:
        pass
    channel.close()
    logging.getLogger("ledger.test").info("done")
    """
)


def test_lines_native_code_writes_to_stderr_become_redacted_json_records() -> None:
    """gRPC's C core logs to stderr itself (here made talkative with GRPC_TRACE=api):
    the service routes file descriptor 2 through the same JSON formatter and redaction."""
    script = _NATIVE_CHILD.format(card=CARD, dotted="4111.1111.1111.1111")
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env={**os.environ, "GRPC_VERBOSITY": "debug", "GRPC_TRACE": "api"},
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    # Up to the last record the program logged; gRPC's own shutdown, after the
    # interpreter's exit handlers, may still write plain lines.
    last = max(i for i, line in enumerate(lines) if '"done"' in line)
    entries = [json.loads(line) for line in lines[: last + 1]]
    loggers = [e["logger"] for e in entries]
    assert loggers.count("grpc.core") >= 2, loggers  # the fake line and real C-core lines
    assert "stderr" in loggers
    native = [e for e in entries if "fake.cc" in e["message"] or "plain native" in e["message"]]
    assert [e["level"] for e in native] == ["ERROR", "WARNING"]
    assert all(CARD_MASK in e["message"] for e in native), native
    for secret in (CARD, CARD_DIGITS, "4111.1111.1111.1111"):
        assert secret not in done.stderr


# --- the service's own log -----------------------------------------------------------------


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessCluster]:
    cluster = ProcessCluster(tmp_path_factory.mktemp("redaction"))
    try:
        await asyncio.to_thread(cluster.start_shards)
        plain = cluster.shards.config()
        with_password = ShardConfig(
            epoch=plain.epoch,
            shards=tuple(
                ShardSpec(
                    name=s.name,
                    dsn=s.dsn.replace("@", f":{DSN_PASSWORD}@", 1),
                    weight=s.weight,
                )
                for s in plain.shards
            ),
        )
        assert all(DSN_PASSWORD in s.dsn for s in with_password.shards)
        write_config(cluster.config_path, with_password)
        cluster.service.env = dict(SERVICE_ENV)
        await cluster.service.start()
        yield cluster
    finally:
        await cluster.close()


def stub_of(cluster: ProcessCluster) -> ledger_pb2_grpc.LedgerServiceStub:
    assert cluster.service.stub is not None
    return cluster.service.stub


async def post(
    cluster: ProcessCluster, item: pb.Transfer, *, timeout_s: float = RPC_TIMEOUT_S
) -> pb.CreateTransferResult:
    response = await stub_of(cluster).CreateTransfers(
        pb.CreateTransfersRequest(transfers=[item]), timeout=timeout_s
    )
    return response.results[0]


def assert_json_lines(log: str) -> list[dict[str, object]]:
    entries = []
    for number, line in enumerate(log.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"service log line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), f"service log line {number} is not an object: {line!r}"
        entries.append(entry)
    return entries


def assert_clean(log: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in log, f"{secret!r} in the service log"


async def test_card_numbers_and_dsn_passwords_never_reach_the_service_log(
    cluster: ProcessCluster,
) -> None:
    stub = stub_of(cluster)
    payer = cluster.merchant_on("shard-a", "payer")
    local = cluster.merchant_on("shard-a", "local")
    payee = cluster.merchant_on("shard-b", "payee")
    await create_accounts(stub, account(payer, "cash"), account(local, "sales"))
    await create_accounts(stub, account(payee, "sales"))

    # Metadata value and key holding a card number: refused, never stored.
    tagged = transfer(
        uid("t"), ref(payer, "cash"), ref(local, "sales"), 10, metadata={"pan": CARD, CARD: "x"}
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused_card:
        await post(cluster, tagged)
    assert refused_card.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # A key too long, refused with an error that names it, its card number truncated.
    too_long = transfer(
        uid("t"), ref(payer, "cash"), ref(local, "sales"), 10, metadata={CARD + "x" * 60: "v"}
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await post(cluster, too_long)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    fields = list(field_violations(refused.value))
    assert any("411111******1111" in field for field in fields), fields
    assert not any(CARD in field or CARD_DIGITS in field for field in fields), fields

    # A transfer logged when its saga cannot start ("saga for <id> not started")
    # because the debit shard is down: the log line is JSON and clean.
    card_id = uid("order")
    await asyncio.to_thread(cluster.shards.stop, "shard-a")
    try:
        # The only shard the call needs is down: the whole call is UNAVAILABLE.
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await post(
                cluster,
                transfer(card_id, ref(payer, "cash"), ref(payee, "sales"), 10),
                timeout_s=OUTAGE_CALL_TIMEOUT_S,
            )
        assert unavailable.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await asyncio.to_thread(cluster.shards.start_one, "shard-a")

    async def logged() -> bool:
        return "not started" in cluster.service.log()

    await wait_until(logged, what="the service to log the saga that did not start")
    log = cluster.service.log()
    assert_clean(log, CARD, CARD_DIGITS, DSN_PASSWORD)
    entries = assert_json_lines(log)
    assert any("metrics on http://" in str(e.get("message")) for e in entries)


async def test_merchant_ids_stay_out_of_the_log_when_recovery_finishes_a_saga(
    cluster: ProcessCluster,
) -> None:
    stub = stub_of(cluster)
    payer = cluster.merchant_on("shard-a", "payer")
    payee = cluster.merchant_on("shard-b", "payee")
    await create_accounts(stub, account(payer, "cash"))
    await create_accounts(stub, account(payee, "sales"))
    transfer_id = uid("t")

    await asyncio.to_thread(cluster.shards.stop, "shard-b")
    try:
        result = await post(
            cluster,
            transfer(transfer_id, ref(payer, "cash"), ref(payee, "sales"), 77),
            timeout_s=OUTAGE_CALL_TIMEOUT_S,
        )
        assert result.result == pb.TRANSFER_RESULT_IN_PROGRESS
    finally:
        await asyncio.to_thread(cluster.shards.start_one, "shard-b")

    async def completed() -> bool:
        response = await stub.LookupTransfers(
            pb.LookupTransfersRequest(
                refs=[pb.TransferRef(merchant_id=payer, transfer_id=transfer_id)]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        return [t.result for t in response.transfers] == [pb.TRANSFER_RESULT_OK]

    await wait_until(completed, what="the recovery worker to finish the saga")
    log = cluster.service.log()
    assert "unavailable" in log, "the outage left no trace in the log"
    assert_clean(log, payer, payee, DSN_PASSWORD)
    assert_json_lines(log)
    # The failure-only metrics of EXPORTED_METRICS (tests/test_otlp_export.py) exist too.
    exported = await asyncio.to_thread(scrape_metric_names, log)
    assert {"ledger_shard_errors_total", "ledger_saga_attempts_failed_total"} <= exported
    assert exported <= set(EXPORTED_METRICS), exported - set(EXPORTED_METRICS)


def scrape_metric_names(log: str) -> set[str]:
    """The ledger_* sample names on the /metrics endpoint the service logged."""
    match = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", log)
    assert match, "the service did not log its metrics address"
    with urllib.request.urlopen(match.group(1), timeout=SCRAPE_TIMEOUT_S) as response:
        text = bytes(response.read()).decode()
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ledger_")
    }
