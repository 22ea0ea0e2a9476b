"""`benchmarks/device_check.py --small`: the accelerator check runs end to end on tiny models (CPU), every part
reports finite figures, and the JSON written with --out is the one printed."""

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_mode_runs_every_part(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=880)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    assert done.stdout.splitlines()[-1] == "JSON " + json.dumps(summary)
    results = summary["results"]
    assert set(results) == {"matmul", "ddpm", "sd15", "dit"} and summary["small"] is True
    assert results["matmul"]["matmul_peak_tflops"] is None  # no MFU on a CPU
    rows = list(results["ddpm"]["rows"].values()) + [results["dit"]]
    assert [row["batch_size"] for row in rows] == [4, 4, 2]
    for row in rows:
        assert row["train_images_per_s"] > 0 and row["tflops_per_s"] > 0 and row["mfu"] is None
    for row in results["ddpm"]["rows"].values():
        expected = 50_000 * 1000 / row["sample_images_per_s_per_eval"] / 60
        assert math.isclose(row["ddpm_50k_minutes"], expected, rel_tol=1e-9)
    assert results["sd15"]["seconds_per_image"] > 0 and results["sd15"]["steps"] == 2
    assert all(results[name]["peak_memory_mib"] > 0 for name in ("ddpm", "sd15", "dit"))


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, message in ((["--budget", "0"], "--budget=0.0 must be > 0"),
                          (["--out", str(tmp_path / "missing" / "x.json")], "does not exist")):  # fmt: skip
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr.splitlines()[-1]
