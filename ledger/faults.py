"""Fault injection for crash tests: kill this process at a named point.

Set LEDGER_CRASH_POINT to a point's name (for example
"saga.step2.after_commit") and the process SIGKILLs itself when it gets
there, as a power cut would. Unset, a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_POINT_ENV = "LEDGER_CRASH_POINT"

POINTS = (
    "saga.step1.before_commit",
    "saga.step1.after_commit",
    "saga.step2.before_commit",
    "saga.step2.after_commit",
    "saga.step3.before_commit",
    "saga.step3.after_commit",
    "rebalance.after_plan",
    "move.after_first_copy",
    "move.after_fence",
    "move.after_verify",
    "move.after_activate",
    "move.after_hand_over",
    # The AMQP publisher: a batch confirmed by the broker, not yet acknowledged.
    "publish.after_confirm",
)


def crash_point(name: str) -> None:
    assert name in POINTS, name
    if os.environ.get(CRASH_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
