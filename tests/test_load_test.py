"""inference/load_test.py: a bounded headless Locust run against a live server completes with zero failures; a bad
value of its own options stops Locust before any request."""
from __future__ import annotations

import csv
import shutil
import subprocess

import pytest

from tests.conftest import ROOT
from tests.test_api_service import LONG, LiveServer, checkpoint, one_thread, settings_for  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_headless_locust_run_has_no_failures(checkpoint, tmp_path):
    locust = shutil.which("locust") or pytest.skip("locust is not installed")
    with LiveServer(settings_for(checkpoint, max_batch_size=8, max_new_tokens=LONG, api_key="k")) as live:
        run = subprocess.run([locust, "-f", str(ROOT / "inference" / "load_test.py"), "--headless", "-u", "6",
                              "-r", "6", "-t", "5s", "--host", live.url, "--csv", str(tmp_path / "run"),
                              "--only-summary", "--max-new-tokens", "24", "--api-key", "k", "--stop-timeout", "10"],
                             capture_output=True, text=True, timeout=90, cwd=ROOT)
        generated = live.metric("gpt_generated_tokens_total")
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "run_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert int(rows["generate"]["Request Count"]) > 0
    assert generated > 0


@pytest.mark.parametrize("value", ["4", "ten"])
def test_a_bad_max_new_tokens_stops_locust_before_any_request(value, tmp_path):
    locust = shutil.which("locust") or pytest.skip("locust is not installed")
    run = subprocess.run([locust, "-f", str(ROOT / "inference" / "load_test.py"), "--headless", "-u", "1", "-r", "1",
                          "-t", "1s", "--host", "http://127.0.0.1:9", "--max-new-tokens", value,
                          "--csv", str(tmp_path / "run")], capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "argument --max-new-tokens" in run.stderr and "Traceback" not in run.stderr
    assert not list(tmp_path.iterdir())
