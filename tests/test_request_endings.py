"""Every request ends one known way: what happens to an unread body, how a client still sending learns
its answer, how a stopping server says so, and that an answer never waits for work after it."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import compat_server
from conftest import Running, ScriptedEngine, make_config
from engine import ClientGone, Engine, EngineClosed, Turns
from protocol import ApiError, Finish, TextDelta
from test_cache import run
from sse_grammar import dechunk, sse_events
from test_http import BODY, Reader, assert_error, exchange, post

FINISH = Finish("end_turn", None, 3, 0, 1)


def scripted_server(events, **kwargs):
    return Running(ScriptedEngine(events, **kwargs))


# --- unread bodies --------------------------------------------------------------------------------

def test_a_body_too_large_is_answered_413_to_a_client_that_sends_it_all_before_reading(monkeypatch):
    monkeypatch.setattr(compat_server, "LINGER_SECONDS", 120)  # however slow the machine is today
    running = scripted_server([TextDelta("ok"), FINISH])
    try:
        with running.raw() as sock:
            size = 60_000_000
            head = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n" % size)
            sock.sendall(head + b" " * size)  # a reset here is what the lingering close prevents
            status, headers, body = Reader(sock).response()
            assert_error((status, headers, body), 413, "request_too_large")
            assert headers["connection"] == "close"
    finally:
        running.stop()


def test_a_body_on_a_get_is_never_read_as_the_next_request():
    running = scripted_server([TextDelta("ok"), FINISH])
    try:
        with running.raw() as sock:
            smuggled = post("/v1/messages", BODY)
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(smuggled), smuggled))
            reader = Reader(sock)
            status, headers, body = reader.response()
            assert status == 200 and json.loads(body)["data"]
            assert headers["connection"] == "close"
            assert reader.file.read() == b""  # no second answer: the body was not a request
    finally:
        running.stop()


# --- answers never wait for the work after them ---------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_the_answer_is_complete_before_the_engine_finishes_its_work_after_it(stream):
    release = threading.Event()
    running = scripted_server([TextDelta("ok"), FINISH], after=lambda: release.wait(30))
    try:
        with running.raw(timeout=5) as sock:
            sock.sendall(post("/v1/messages", {**BODY, "stream": stream}))
            status, headers, body = Reader(sock).response()  # times out if the answer waits
            assert status == 200
            if stream:
                assert sse_events(body)[-1]["type"] == "message_stop"
            else:
                assert json.loads(body)["content"] == [{"type": "text", "text": "ok"}]
    finally:
        release.set()
        running.stop()


# --- a stopping server is not a client leaving ----------------------------------------------------

def stop_now(running):
    """What SIGTERM does, with no grace left: stop accepting, then cancel what is in flight."""
    running.server.stopping.set()
    threading.Thread(target=running.server.shutdown, daemon=True).start()
    compat_server._drain(running.server)


def test_a_stream_cut_by_shutdown_ends_with_an_overloaded_error_event():
    running = Running(ScriptedEngine([TextDelta("x")] * 200 + [FINISH], delay=0.05), shutdown_grace=0)
    with running.raw() as sock:
        sock.sendall(post("/v1/messages", {**BODY, "stream": True}))
        reader = Reader(sock)
        lines = [reader.file.readline()]
        assert lines[0].startswith(b"HTTP/1.1 200")
        while b"content_block_delta" not in lines[-1]:
            lines.append(reader.file.readline())
        stop_now(running)
        rest = reader.file.read()
    assert rest.endswith(b"0\r\n\r\n")  # the chunked body still ends properly
    events = sse_events(dechunk(b"".join(lines) + rest))
    assert events[-1] == {"type": "error", "error": {"type": "overloaded_error", "message": events[-1]["error"]["message"]}}
    running.server.server_close()


def test_a_request_waiting_for_its_answer_at_shutdown_gets_529_with_retry_after():
    running = Running(ScriptedEngine([TextDelta("x")] * 200 + [FINISH], delay=0.05), shutdown_grace=0)
    with running.raw() as sock:
        sock.sendall(post("/v1/messages", BODY))
        while not running.server.busy():  # the request has been accepted
            time.sleep(0.01)
        stop_now(running)
        status, headers, body = Reader(sock).response()
    assert_error((status, headers, body), 529, "overloaded_error")
    assert headers["retry-after"] and headers["connection"] == "close"
    running.server.server_close()


# --- admission ------------------------------------------------------------------------------------

def test_waiting_for_the_model_asks_whether_the_client_left_without_holding_the_queue_lock():
    turns = Turns(4)
    holder, waiter = turns.reserve(), turns.reserve()
    turns.acquire(holder, lambda: False)
    others_served = []

    def cancelled():
        # another request asking the queue for its length must not wait on this check
        probe = threading.Thread(target=lambda: others_served.append(turns.waiting))
        probe.start()
        probe.join(timeout=2)
        return True

    with pytest.raises(ClientGone):
        turns.acquire(waiter, cancelled)
    assert others_served
    holder.close()


# --- text no UTF-8 can hold -------------------------------------------------------------------------

LONE = "\ud800"
TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}
CALL = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}]}


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("body", [
    {**BODY, "messages": [{"role": "user", "content": LONE}]},
    {**BODY, "system": "be brief " + LONE},
    {**BODY, "system": [{"type": "text", "text": LONE}]},
    {**BODY, "tools": [{**TOOL, "description": LONE}]},
    {**BODY, "tools": [{**TOOL, "input_schema": {"type": "object", "properties": {LONE: {"type": "string"}}}}]},
    {**BODY, "stop_sequences": [LONE]},
    {**BODY, "tools": [TOOL], "messages": [BODY["messages"][0], CALL, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "rain " + LONE}]}]},
    {**BODY, "messages": [{"role": "user", "content": "\udc00 low half alone"}]},
], ids=["content", "system", "system-block", "tool-description", "schema-key", "stop", "tool-result", "low-half"])
def test_a_lone_surrogate_anywhere_is_a_400_that_says_where(served, path, body):
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a \u escape
    with served.raw() as sock:
        sock.sendall(post(path, raw))
        message = assert_error(Reader(sock).response(), 400, "invalid_request_error")
    assert message.startswith("The request body is not valid JSON: no ") and "surrogate in string" in message
    column = int(message.split("column ")[1].split()[0])
    assert raw.decode()[column - 1:column + 1] == "\\u"


# --- faults inside the engine ---------------------------------------------------------------------

def test_a_failing_disk_writer_turns_the_disk_tier_off_and_flush_never_hangs(tmp_path, caplog):
    from prompt_cache import DiskStates
    disk = DiskStates(str(tmp_path), 1 << 20, b"model")
    disk.put((2 ** 40,), bytearray(16))  # no int32 token id: the writer fails with struct.error
    disk.flush()
    assert not disk.enabled and "prompt state writer failed" in caplog.text
    disk.put((1, 2, 3), bytearray(16))  # dropped: the tier is off
    flushed = threading.Thread(target=disk.flush, daemon=True)
    flushed.start()
    flushed.join(timeout=5)
    assert not flushed.is_alive()


def test_a_forced_call_whose_grammar_llama_cpp_refuses_still_comes_back_as_a_call(engine, caplog):
    from dataclasses import replace

    from engine import sampling_for
    from protocol import ToolUseStart, parse_messages_request
    request = parse_messages_request({**BODY, "max_tokens": 60, "temperature": 0, "tools": [TOOL],
                                      "tool_choice": {"type": "tool", "name": "get_weather"}})
    # below the request level: no request makes a grammar llama.cpp refuses, so one is put in its plan
    prompt = engine._prepare(request)
    prompt = replace(prompt, reply=replace(prompt.reply, grammar="root ::= ( unbalanced"))
    events = list(engine._run(engine._turns.reserve(), prompt, sampling_for(request), lambda: False))
    assert [e.name for e in events if isinstance(e, ToolUseStart)] == ["get_weather"]
    assert events[-1].stop_reason == "tool_use"
    assert "trying a looser one" in caplog.text


# --- the engine's own end -------------------------------------------------------------------------

EXIT_MID_EVALUATION = """
import atexit, sys, threading, time
import engine as engine_module, protocol
from conftest import make_config
answered = threading.Event()
def evaluate_prompts():
    try:
        for i in range(100):  # each a new prompt: the thread spends its time inside llama_decode
            request = protocol.parse_messages_request({"model": "m", "max_tokens": 1, "messages": [
                {"role": "user", "content": f"{i} " + "Tell me about cats and dogs. " * 60}]})
            with engine.submit(request, lambda: False) as job:
                list(job)
            answered.set()
    except (engine_module.EngineClosed, protocol.ApiError):  # cancelled, or refused a place: closing
        print("ended by close()")
worker = threading.Thread(target=evaluate_prompts, daemon=True)
# registered before the engine exists, so it runs after the engine's own exit handler
atexit.register(lambda: (worker.join(10), print("inside llama.cpp at exit:", worker.is_alive())))
engine = engine_module.Engine(make_config())
worker.start()
answered.wait(120)  # one request answered: the next one is in llama.cpp now
sys.exit(0)
"""


def test_a_process_that_exits_while_the_model_works_stops_it_first():
    """A thread still inside llama.cpp when the interpreter finalizes crashes it (a segfault, or
    "terminate called without an active exception" as CI saw): the engine cancels it at exit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", EXIT_MID_EVALUATION], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.path.join(root, "tests")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ended by close()" in done.stdout and "inside llama.cpp at exit: False" in done.stdout


def test_close_cancels_the_request_in_flight_then_refuses_new_ones():
    engine = Engine(make_config(ctx=1024))
    tokens_seen, asked = threading.Event(), []

    def generating():  # asked once while waiting, once per prompt batch, then once per token
        asked.append(1)
        if len(asked) > 10:
            tokens_seen.set()
        return False

    outcome = []

    def long_run():
        try:
            run(engine, "Write a very long story about a cat.", max_tokens=900, cancelled=generating)
        except EngineClosed:
            outcome.append("cancelled")

    worker = threading.Thread(target=long_run)
    worker.start()
    tokens_seen.wait(60)
    engine.close()
    worker.join(30)
    assert outcome == ["cancelled"]
    with pytest.raises(ApiError) as refused:
        run(engine, "Hello")
    assert refused.value.status == 529


def test_requests_the_engine_cancels_as_it_closes_are_answered_as_a_shutdown():
    """EngineClosed (close() while a request runs) is the server stopping, not the client leaving."""
    running = scripted_server([TextDelta("x"), EngineClosed()])
    try:
        assert_error(exchange(running, post("/v1/messages", BODY)), 529, "overloaded_error")
        _, _, body = exchange(running, post("/v1/messages", {**BODY, "stream": True}))
        assert sse_events(body)[-1]["error"]["type"] == "overloaded_error"
    finally:
        running.stop()
