"""The real Claude Code CLI against the real server and default model (tests/e2e_claude_code.py does the work).

Skipped unless `make e2e` has installed Claude Code into .e2e/. `--bare` keeps its prompt near 1,100
tokens, so each run takes seconds; the full tool list (~20,000 tokens, minutes) is `make e2e-full`.
"""

import tempfile

import pytest

import e2e_claude_code as e2e

CLAUDE = e2e.claude_binary()
pytestmark = pytest.mark.skipif(CLAUDE is None, reason=f"Claude Code is not installed at {e2e.CLAUDE_BIN} "
                                                       "(`make e2e` installs it)")
FLAGS, CTX = e2e.PROFILES["bare"]
RUN_TIMEOUT = 120


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="llama-compat-claude-code-") as path:
        yield path


@pytest.fixture(scope="module")
def server_port(workdir):
    proc, port = e2e.start_server(CTX, workdir)
    yield port
    e2e.stop_server(proc)


def run_bare(server_port, workdir, output_format):
    run, _ = e2e.run_until_it_ends(CLAUDE, f"http://127.0.0.1:{server_port}", e2e.PROMPT, FLAGS, workdir,
                                   output_format, RUN_TIMEOUT, home=e2e.make_home(f"{workdir}/home"))
    return run


def test_claude_code_prints_the_reply_of_a_bare_print_mode_run(server_port, workdir):
    run = run_bare(server_port, workdir, "text")
    assert e2e.reply_of(run, "text")


def test_claude_code_stream_json_ends_with_a_successful_result(server_port, workdir):
    run = run_bare(server_port, workdir, "stream-json")
    events = e2e.stream_events(run)
    assert events[0]["type"] == "system" and events[0]["model"] == e2e.MODEL
    assert any(e["type"] == "assistant" for e in events)
    assert e2e.reply_of(run, "stream-json")


def test_claude_code_reads_a_file_with_its_read_tool_and_gets_the_content_back(server_port):
    run, calls, results = e2e.read_round_trip(CLAUDE, server_port, RUN_TIMEOUT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert calls and calls[0][0] == "Read", calls
    assert any(e2e.SECRET in r for r in results), (calls, results)
