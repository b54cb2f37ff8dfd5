"""`compat_server.py claude …`: one command starts the server if needed and runs the user's `claude`
with the environment it needs, passing arguments and exit code through. A stand-in `claude` on PATH
records what it was given."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from conftest import Running
from e2e_claude_code import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN = """#!{python}
import json, os, sys, urllib.request
base = os.environ["ANTHROPIC_BASE_URL"]
served = urllib.request.urlopen(base + "/").status  # the server answers while claude runs
json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "served": served}}, open({record!r}, "w"))
sys.exit(7)
"""


@pytest.fixture
def stand_in(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record.json"
    bin_dir.mkdir()
    script = bin_dir / "claude"
    script.write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir, record


def launch(tmp_path, path, port, *claude_args, extra_env=None):
    # the developer's own Claude Code settings would win over the launcher's: not in this test
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_CODE_", "ANTHROPIC_"))}
    env.update(PATH=path, ANTHROPIC_API_KEY="sk-ant-real-key", **(extra_env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "compat_server.py"), "--port", str(port),
                           "--ctx", "4096", "--cache-dir", str(tmp_path / "cache"), "claude", *claude_args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_claude_runs_against_a_server_it_starts_and_stops_with_its_arguments_and_exit_code(tmp_path, stand_in):
    bin_dir, record = stand_in
    port = free_port()
    done = launch(tmp_path, f"{bin_dir}{os.pathsep}{os.environ['PATH']}", port, "-p", "hello there", "--bare")
    assert done.returncode == 7, done.stderr
    assert "--ctx 8192 or more is better" in done.stderr  # this server runs at 4096
    seen = json.loads(record.read_text())
    assert seen["argv"] == ["-p", "hello there", "--bare"] and seen["served"] == 200
    env = seen["env"]
    assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"
    assert env["ANTHROPIC_AUTH_TOKEN"] == "local" and "ANTHROPIC_API_KEY" not in env
    assert not env["ANTHROPIC_MODEL"].startswith("claude-")
    assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "256"
    # it compacts at the window - 256 - 13,000: the context less 1,450 for its instruction and five answers
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == str(4096 + 11_550 - 4 * 256)
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    with pytest.raises(OSError):  # the server it started is gone with claude
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_server_already_answering_is_used_and_left_running(tmp_path, stand_in, engine):
    bin_dir, record = stand_in
    running = Running(engine)
    try:
        done = launch(tmp_path, f"{bin_dir}{os.pathsep}{os.environ['PATH']}", running.port, "--continue",
                      extra_env={"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "300"})
        assert done.returncode == 7, done.stderr
        env = json.loads(record.read_text())["env"]
        assert env["ANTHROPIC_BASE_URL"] == running.url
        assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "300"  # the user's own setting wins
        # the window follows the running server's context (2048 here), not the flags
        assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == str(2048 + 11_550 - 4 * 300)
        socket.create_connection(("127.0.0.1", running.port), timeout=2).close()
    finally:
        running.stop()


def test_without_claude_installed_it_refuses_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = launch(tmp_path, str(empty), free_port(), "-p", "hi")
    assert done.returncode == 127
    assert "Claude Code is not installed" in done.stderr and "npm install" in done.stderr
