"""The generated gRPC code in ledger/v1/ must be what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date_with_protos() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_generated_files_are_marked_do_not_edit() -> None:
    generated = sorted((ROOT / "ledger" / "v1").glob("*.py*"))
    assert {p.name for p in generated} >= {
        "ledger_pb2.py",
        "ledger_pb2.pyi",
        "ledger_pb2_grpc.py",
        "ledger_pb2_grpc.pyi",
    }
    for path in generated:
        assert "DO NOT EDIT" in path.read_text().splitlines()[0], path
