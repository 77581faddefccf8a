"""scripts/bench_network.py runs end to end on a tiny pair (a smoke test: no timing is asserted;
the script itself byte-compares every rebuilt model with the target and exits non-zero otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_network_measures_streamed_apply_against_the_download(tmp_path):
    out = tmp_path / "net.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ORCA_DIFF_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_network.py"), "--layers", "1", "--hidden", "128",
                        "--mbps", "100", "--stalls", "1", "--stall-timeout", "1", "--runs", "download,streamed",
                        "--workdir", str(tmp_path / "w"), "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"download", "streamed apply", "download +stalls", "streamed apply +stalls"}
    assert res["streamed apply"]["exact"] and res["streamed apply +stalls"]["exact"]
    assert res["streamed apply"]["cache_bytes"] < 1_000_000  # no copy of the diff: the manifest only
    assert res["download"]["cache_bytes"] >= json.loads(out.read_text())["payload_bytes"]
    assert "ratios" in r.stdout
