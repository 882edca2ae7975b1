"""tools/measure_rss.py: the memory curve of a command that holds 300 MiB, its exit status passed
on, and the plot of two curves."""

import json
import signal
import subprocess
import sys
import time

import cv2

HOLD_300_MIB = "import sys, time; b = bytearray(300 << 20); time.sleep(1.5); sys.exit(3)"


def test_curve_of_a_command_and_its_plot(repo_root, tmp_path):
    tool = [sys.executable, f"{repo_root}/tools/measure_rss.py"]
    out = tmp_path / "hold.json"
    cmd = [*tool, "--out", str(out), "--interval", "0.2", "--", sys.executable, "-c", HOLD_300_MIB]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    summary = json.loads(out.read_text())
    assert summary["returncode"] == 3 and summary["command"][-1] == HOLD_300_MIB
    times = [s["t_s"] for s in summary["curve"]]
    assert len(times) >= 3 and times == sorted(times)
    assert 300 <= summary["peak_rss_mib"] < 400
    assert summary["curve"][0]["rss_mib"] < summary["peak_rss_mib"]

    png = tmp_path / "curves.png"
    subprocess.run([*tool, "--plot", str(png), str(out), str(out)], check=True)
    assert cv2.imread(str(png)).shape == (400, 700, 3)
    assert subprocess.run([*tool, "--interval", "1"], capture_output=True).returncode == 2


def test_terminating_the_sampler_stops_the_command_and_keeps_the_curve(repo_root, tmp_path):
    out = tmp_path / "sleep.json"
    cmd = [sys.executable, f"{repo_root}/tools/measure_rss.py", "--out", str(out)]
    sampler = subprocess.Popen([*cmd, "--interval", "0.1", "--", "sleep", "60"])
    time.sleep(1.0)
    sampler.terminate()
    assert sampler.wait(timeout=10) == 128 + signal.SIGTERM  # the command's status, as a shell
    summary = json.loads(out.read_text())
    assert summary["returncode"] == -signal.SIGTERM and summary["curve"]
