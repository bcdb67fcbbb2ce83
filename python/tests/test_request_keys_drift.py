"""examples/request_keys_drift.py on a tiny layer: every forward after the
first hands moved centers over as either a drift update or a new gather of
the keys; a learning rate far below the keys' rounding error never
re-gathers, one far above it re-gathers at every step."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py.MPI")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "request_keys_drift.py")


def test_counts_add_up_and_follow_the_learning_rate(tmp_path):
    out = tmp_path / "drift.json"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--experts", "256", "--dim", "16", "--codewords", "16",
         "--probes", "2", "--k", "4", "--tokens", "64", "--steps", "6", "--lrs", "1e-7,1e-1",
         "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [r["lr"] for r in runs] == [1e-7, 1e-1]
    assert [r["bits"] for r in runs] == [8, 8]
    for r in runs:
        assert r["center_updates"] == 5
        assert r["regathers"] + r["drift_updates"] == 5
        assert len(r["gathers_by_step"]) == 6
        # One rank: nothing leaves it.
        assert r["bytes_per_step_per_rank"]["scoring"] == 0
    assert runs[0]["regathers"] == 0
    assert runs[1]["regathers"] == 5
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, SCRIPT, "--steps", "1", "--json", str(out)],
                       check=True, capture_output=True)
