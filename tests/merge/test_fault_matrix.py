"""The bad-input and fault matrix (benchmarks/fault_matrix.py --quick) passes on every row.

The quick matrix runs the real CLI as subprocesses (about 17 runs, ~40 s on 2 idle cores):
broken and malicious inputs, outputs that would destroy inputs, kill -9 / SIGTERM mid-write,
two concurrent writers and, as root, a full tmpfs. The full matrix: ``python
benchmarks/fault_matrix.py`` (about 60 cases).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_fault_matrix_passes_every_row(tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "fault_matrix.py"), "--quick", "--tmp", str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script unmounts its tmpfs and cleans up on SIGTERM
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"fault matrix timed out\n{out}\n{err[-3000:]}")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case ")]
    assert proc.returncode == 0, f"{out}\n{err[-3000:]}"
    assert len(rows) >= 12, out
    failed = [row for row in rows if not row.rstrip().endswith("| PASS |")]
    assert not failed, "\n".join(failed)
    for group in ("inputs:", "outputs:", "faults:"):
        assert any(row.startswith(f"| {group}") for row in rows), f"no {group} rows\n{out}"
    assert "full-disk variant:" in out
    assert list(tmp_path.iterdir()) == []  # the matrix cleans up after itself (and unmounts)
