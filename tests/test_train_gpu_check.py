"""scripts/gpu_check.py, the check to run where a GPU is lent, must itself work: it runs on the CPU here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_checks_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--keep", str(tmp_path / "runs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = {r["check"]: r for r in lines if "check" in r}
    assert checks["resume"]["ok"] and checks["resume"]["steps_logged"] == list(range(1, 8))
    assert "skipped" in checks["fsdp"] and lines[-1]["summary"] == "1/1 checks passed"
