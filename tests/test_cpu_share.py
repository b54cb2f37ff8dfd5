"""llama.cpp's thread counts follow what other processes use of the cores."""

import itertools

import pytest

import cpu_share
from conftest import wait_until
from cpu_share import CpuShare


@pytest.fixture
def machine(monkeypatch):
    """A 2-core machine whose readings the test writes: wall time, machine busy time, own CPU time."""
    state = {"wall": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(cpu_share, "SAMPLE_SECONDS", 3600)  # the daemon stays asleep; the test samples
    monkeypatch.setattr(cpu_share, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu_share, "_read_busy_seconds", lambda: state["busy"])
    monkeypatch.setattr(cpu_share, "_own_seconds", lambda: state["own"])
    monkeypatch.setattr(cpu_share, "_clock", lambda: state["wall"])

    def run(seconds, own_cores, other_cores):
        state["wall"] += seconds
        state["own"] += own_cores * seconds
        state["busy"] += (own_cores + other_cores) * seconds
    return run


def test_a_busy_process_takes_a_thread_away_and_leaving_gives_it_back(machine):
    share = CpuShare(2, 2)
    machine(0.5, own_cores=2.0, other_cores=0.0)
    share.sample()
    assert share.threads() == (2, 2)
    machine(0.5, own_cores=1.2, other_cores=0.8)  # a busy loop gets its share of the cores
    share.sample()
    assert share.threads() == (1, 1)
    machine(0.5, own_cores=1.0, other_cores=0.1)  # it ended: an editor's background work is left
    share.sample()
    assert share.threads() == (2, 2)


def test_counts_the_operator_fixed_are_kept(machine):
    share = CpuShare(2, 2, adaptive=(False, True))
    machine(0.5, own_cores=1.0, other_cores=1.0)
    share.sample()
    assert share.threads() == (2, 1)


def test_a_real_reading_is_between_none_and_all_of_the_cores():
    share = CpuShare(1, 1)
    for _ in itertools.repeat(None, 2):
        assert 0.0 <= share.sample() <= (cpu_share.usable_cores() + 1)


def test_a_request_after_a_burst_that_ended_gets_the_cores_back_at_once(machine, monkeypatch):
    share = CpuShare(2, 2)
    machine(0.5, own_cores=0.0, other_cores=1.9)  # another process's answer, finished just now
    share.sample()
    assert share.threads() == (1, 1)
    monkeypatch.setattr(cpu_share, "_runnable_elsewhere", lambda: 0)
    share.recheck()
    assert share.threads() == (2, 2)


def test_a_load_that_goes_on_keeps_its_core_at_a_recheck(machine, monkeypatch):
    share = CpuShare(2, 2)
    machine(0.5, own_cores=1.0, other_cores=1.0)  # a busy loop, still runnable
    share.sample()
    monkeypatch.setattr(cpu_share, "_runnable_elsewhere", lambda: 1)
    share.recheck()
    assert share.threads() == (1, 1)


def test_a_real_runnable_count_is_a_count():
    assert cpu_share._runnable_elsewhere() >= 0


def test_cores_given_back_at_a_recheck_are_taken_again_soon_when_the_load_was_only_pausing(machine, monkeypatch):
    share = CpuShare(2, 2)
    machine(0.5, own_cores=1.0, other_cores=1.0)  # a second server, answering
    share.sample()
    monkeypatch.setattr(cpu_share, "_runnable_elsewhere", lambda: 0)  # between two of its requests
    share.recheck()
    assert share.threads() == (2, 2)
    machine(0.5, own_cores=1.0, other_cores=1.0)  # its next request
    wait_until(lambda: share.threads() == (1, 1), timeout=10)  # the daemon's next reading, not in an hour
    share.stop()
