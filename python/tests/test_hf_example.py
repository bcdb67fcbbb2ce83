"""examples/hf/train_gcide.py end to end on a tiny shape: both routers
train from the same weights, and the JSON, table and chart are written."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "hf", "train_gcide.py")
TINY = ["--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--experts", "32",
        "--codewords", "8", "--probes", "2", "--k", "2", "--dim", "32", "--layers", "1",
        "--seq", "16", "--batch", "2"]


def test_stock_and_air_side_by_side(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, *TINY, "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"wrote {tmp_path}/hf_results.json" in run.stdout
    with open(tmp_path / "hf_results.json") as f:
        report = json.load(f)
    stock, air = report["results"]
    assert (stock["router"], air["router"]) == ("stock", "air")
    assert stock["curve"][0]["val_loss"] > 0 and air["curve"][0]["val_loss"] > 0
    assert [p["step"] for p in air["curve"]] == [2, 4]
    # stock: 2 E d per token; AIR: 2 C d + 2 d * shortlist, shortlist < E
    assert stock["routing_flops_per_token"] == 2 * 32 * 32
    assert 2 * 8 * 32 < air["routing_flops_per_token"] < 2 * 8 * 32 + 2 * 32 * 32
    assert 0 < air["recall_at_k"] <= 1 and stock["recall_at_k"] is None
    assert stock["tokens_per_s"] > 0 and air["tokens_per_s"] > 0
    assert report["machine"]["cpu"]
    assert (tmp_path / "hf_loss.png").stat().st_size > 0
    assert "| AIR C=8 m=2 |" in (tmp_path / "hf_table.md").read_text()


def test_bad_options_name_the_flag(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, "--codewords", "4", "--probes", "5",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "need 1 <= --probes <= --codewords <= --experts" in run.stderr
