"""llama.cpp's thread counts follow what other processes use of the cores."""

import os
import subprocess
import sys
import time

import pytest

import cpu_share
from cpu_share import CpuShare


@pytest.mark.skipif(not os.path.exists("/proc/stat") or (os.cpu_count() or 1) < 2, reason="Linux, 2+ cores")
def test_a_busy_process_takes_a_thread_away_and_leaving_gives_it_back(monkeypatch):
    monkeypatch.setattr(cpu_share, "SAMPLE_SECONDS", 0.3)
    cores = os.cpu_count()
    share = CpuShare(cores, cores)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10  # a loaded machine may need more than one reading
        while share.threads() == (cores, cores) and time.monotonic() < deadline:
            time.sleep(0.35)
        assert share.threads() < (cores, cores)
    finally:
        busy.kill()
        busy.wait()
    deadline = time.monotonic() + 10
    while share.threads() != (cores, cores) and time.monotonic() < deadline:
        time.sleep(0.35)
    assert share.threads() == (cores, cores) or share.others() >= cpu_share.TAKEN_CORE  # others still busy


def test_counts_the_operator_fixed_are_kept():
    share = CpuShare(3, 5, adaptive=(False, False))
    assert share.threads() == (3, 5)
