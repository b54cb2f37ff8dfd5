"""Prompt states on disk: a restarted server restores a long prompt instead of evaluating it, answers
exactly as the server that kept the state live would have, and survives every kind of bad file or
folder (then it answers as a fresh evaluation)."""

import logging
import os
import shutil
import threading
import time

import pytest

from conftest import make_config
from engine import Engine
from prompt_cache import DiskStates
from test_cache import STORY, run

LONG = STORY + " " + STORY  # well past DISK_MIN_EVALUATED tokens


def restart(folder):
    return Engine(make_config(ctx=4096, cache_dir=str(folder), cache_disk=512))


def kv_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".kv"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder holding the one state an engine wrote for LONG, and that engine's answer to the next
    turn, given while it still held the state live."""
    folder = tmp_path_factory.mktemp("saved")
    first = restart(folder)
    run(first, LONG)
    kept_live = run(first, LONG + " Who is Tom?")[0]
    first.close()
    return folder, kept_live


def copy_of(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "cache")
    return tmp_path / "cache"


def test_a_restarted_server_restores_a_long_prompt_from_disk_and_answers_the_same(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    assert len(kv_files(folder)) == 1
    second = restart(folder)
    text, finish = run(second, LONG + " Who is Tom?")
    assert finish.cache_read_input_tokens > 1000
    # the same state, cut at the same place, the same tokens evaluated: the same answer, bit for bit
    assert text == saved[1]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_or_truncated_file_is_removed_with_a_warning_and_never_used(saved, tmp_path, damage, caplog):
    folder = copy_of(saved, tmp_path)
    (name,) = kv_files(folder)
    path = folder / name
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "truncate":
        raw = raw[:len(raw) // 3]
    else:
        raw = bytearray(b"not a state at all")
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="llama-compat"):
        second = restart(folder)
        # the first half of the saved prompt: long enough to be worth a restore, cheaper to evaluate
        _, finish = run(second, STORY, max_tokens=1)
    assert finish.cache_read_input_tokens < 100  # evaluated afresh, not restored from the bad file
    assert "removing prompt-state file" in caplog.text and not path.exists()


def test_an_unwritable_folder_means_a_warning_and_no_disk_cache(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="llama-compat"):
        states = DiskStates(str(blocker / "cache"), 10**9, b"x" * 32)
    assert not states.enabled and "running without the disk cache" in caplog.text


def test_files_beyond_the_budget_go_least_recently_used_first(tmp_path):
    states = DiskStates(str(tmp_path), 3000, b"m" * 32)
    for i in range(3):
        states.put((i, i, i), bytearray(1000))
        states.flush()
    assert 1 <= len(kv_files(tmp_path)) <= 2
    assert states.longest_prefix((2, 2, 2))[1] == 3  # the newest survives


def test_another_models_files_are_left_alone(tmp_path):
    mine = DiskStates(str(tmp_path), 10**6, b"a" * 32)
    mine.put((1, 2, 3), bytearray(10))
    mine.flush()
    other = DiskStates(str(tmp_path), 10**6, b"b" * 32)
    assert other.longest_prefix((1, 2, 3)) == (None, 0) and len(kv_files(tmp_path)) == 1


def test_a_state_replaced_while_waiting_does_not_hold_up_flush(tmp_path, monkeypatch):
    """Saves faster than the disk: the waiting one is replaced, and flush (at shutdown) still returns."""
    states = DiskStates(str(tmp_path), 10**6, b"a" * 32)
    write = states._write
    monkeypatch.setattr(states, "_write", lambda tokens, data: (time.sleep(0.3), write(tokens, data)))
    for i in range(3):
        states.put((i,), bytearray(10))
    flushed = threading.Thread(target=states.flush, daemon=True)
    flushed.start()
    flushed.join(5)
    assert not flushed.is_alive()
    assert states.longest_prefix((2,))[1] == 1  # the newest was written


def test_the_writer_waits_while_a_request_holds_the_model(tmp_path):
    idle = threading.Event()  # a request holds the model
    states = DiskStates(str(tmp_path), 10**8, b"a" * 32, idle=idle)
    states.put((1, 2, 3), bytearray(10**7))
    flushed = threading.Thread(target=states.flush, daemon=True)
    flushed.start()
    flushed.join(timeout=0.5)
    assert flushed.is_alive() and not kv_files(tmp_path)  # not one byte of the state while it works
    idle.set()
    flushed.join(timeout=30)
    assert not flushed.is_alive() and len(kv_files(tmp_path)) == 1
