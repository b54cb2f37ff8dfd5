"""Load, faults and hostile input: nothing hangs, the model is never lost, every request is answered.

`make test` runs these short; `make soak` sets LLAMA_COMPAT_SOAK=1 for many more fuzz cases and
load rounds.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compat_server
from conftest import Running, ScriptedEngine, wait_until
from engine import PROMPT_BATCH
from protocol import Finish, TextDelta
from sse_grammar import dechunk, sse_events
from test_http import BODY, Reader, exchange, post

SOAK = os.environ.get("LLAMA_COMPAT_SOAK") == "1"
FUZZ_CASES = 10000 if SOAK else 300
LOAD_ROUNDS = 20 if SOAK else 1
LOAD_CLIENTS = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scripted():
    running = Running(ScriptedEngine([TextDelta("ok"), Finish("end_turn", None, 3, 0, 1)]))
    yield running
    running.stop()


# --- fuzzing the whole path: socket → HTTP → JSON → validation ------------------------------------------

# strings include lone surrogates (valid JSON escapes, invalid Unicode) in every position
texts = st.text(max_size=10) | st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=10)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=10)
fields = st.sampled_from(["model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "stream",
                          "tools", "tool_choice", "thinking", "metadata", "top_k", "output_config"])
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda key, value: json.dumps({**BODY, key: value}).encode(), fields, json_values),
    st.builds(lambda value: json.dumps({**BODY, "messages": [value]}).encode(), json_values),
    st.builds(lambda value: json.dumps(value).encode(), json_values),
)


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["POST", "GET", "PUT", "HEAD", "OPTIONS", "BREW"]),
       st.sampled_from(["/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/v1/models/x", "/", "/%00",
                        "/v1/messages?beta=true", "/" + "a" * 3000]),
       st.dictionaries(st.sampled_from(["x-api-key", "anthropic-version", "content-type", "anthropic-beta",
                                         "authorization", "accept"]),
                       st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)),
       bodies)
def test_any_request_is_answered_with_a_response_or_an_anthropic_error(scripted, method, path, headers, body):
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
    raw = (f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + head
           + b"content-length: %d\r\n\r\n" % len(body) + body)
    status, response_headers, payload = exchange(scripted, raw)
    assert response_headers["request-id"].startswith("req_")
    assert status < 500
    if status >= 400 and method != "HEAD":
        error = json.loads(payload)
        assert error["type"] == "error" and error["error"]["type"] and error["error"]["message"]


# --- load --------------------------------------------------------------------------------------------

def one_client(running, i, outcomes, elapsed):
    """Streams or not; every fourth client leaves after the first event it sees."""
    body = {"model": "m", "max_tokens": 12, "stream": i % 2 == 0,
            "messages": [{"role": "user", "content": f"Client {i}: name a fruit."}]}
    leaves = i % 4 == 3
    started = time.monotonic()
    try:
        with running.raw(timeout=300) as sock:
            sock.sendall(post("/v1/messages", body))
            reader = Reader(sock)
            if leaves:
                reader.file.readline()
                reader.file.close()
                outcomes.append("left")
                return
            status, _, payload = reader.response()
        if status == 529:
            outcomes.append("529")
        elif body["stream"]:
            events = sse_events(payload)
            assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
            outcomes.append("streamed")
        else:
            assert status == 200 and json.loads(payload)["type"] == "message"
            outcomes.append("message")
    except Exception as exc:  # any other outcome is a lost request
        outcomes.append(f"lost after {time.monotonic() - started:.1f}s: {exc!r}")
    finally:
        elapsed.append(time.monotonic() - started)


def test_32_concurrent_clients_each_get_an_answer_or_a_529(engine):
    running = Running(engine)
    try:
        for _ in range(LOAD_ROUNDS):
            outcomes, elapsed = [], []
            threads = [threading.Thread(target=one_client, args=(running, i, outcomes, elapsed))
                       for i in range(LOAD_CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            counts = Counter(o if not o.startswith("lost") else "lost" for o in outcomes)
            print(f"load round: {LOAD_CLIENTS} clients: {dict(counts)}, slowest {max(elapsed):.1f}s")
            assert len(outcomes) == LOAD_CLIENTS and not [o for o in outcomes if o.startswith("lost")], outcomes
            assert counts["streamed"] + counts["message"] > 0
        status, _, _ = exchange(running, post("/v1/messages", BODY))
        assert status == 200 and engine._turns.waiting == 0
    finally:
        running.stop()


# --- disconnects at each stage ---------------------------------------------------------------------------

def test_a_client_that_leaves_while_queued_gives_up_its_place():
    slow = ScriptedEngine([TextDelta("x")] * 20 + [Finish("end_turn", None, 3, 0, 20)], delay=0.1)
    running = Running(slow)
    try:
        holder = threading.Thread(target=exchange, args=(running, post("/v1/messages", BODY)))
        holder.start()
        slow.holding.wait(60)
        sock = running.raw()
        sock.sendall(post("/v1/messages", {**BODY, "stream": True}))
        Reader(sock).file.readline()  # its message_start: it is queued
        assert slow.waiting == 1
        sock.close()
        wait_until(lambda: slow.waiting == 0)  # while the holder still holds the model
        assert holder.is_alive()
        holder.join()
    finally:
        running.stop()


def test_a_client_that_leaves_during_prompt_evaluation_frees_the_model_within_a_batch(served, engine):
    long_prompt = " ".join(f"Line {i} of a long document about rivers." for i in range(100))  # 3 batches
    sock = served.raw()
    sock.sendall(post("/v1/messages", {"model": "m", "max_tokens": 5, "stream": True,
                                       "messages": [{"role": "user", "content": long_prompt}]}))
    reader = Reader(sock)
    assert reader.file.readline().startswith(b"HTTP/1.1 200")  # the prompt fits and is being evaluated
    reader.file.close()
    sock.close()
    status, _, _ = exchange(served, post("/v1/messages", {**BODY, "max_tokens": 2}))
    assert status == 200
    # had it gone on to the end, the whole prompt's state would have been kept (the next request's
    # cut saves it) and a retry would reuse all of it; it stopped at a batch boundary instead
    request = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": long_prompt}]}
    status, _, reply = exchange(served, post("/v1/messages", request))
    usage = json.loads(reply)["usage"]
    assert usage["cache_read_input_tokens"] < usage["input_tokens"] + usage["cache_read_input_tokens"] - PROMPT_BATCH


def test_a_slow_client_is_dropped_and_others_are_served_meanwhile(monkeypatch, scripted):
    monkeypatch.setattr(compat_server, "REQUEST_READ_DEADLINE", 1)
    slow = scripted.raw()
    slow.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n{")
    status, _, _ = exchange(scripted, post("/v1/messages", BODY))
    assert status == 200
    slow.settimeout(60)
    assert slow.recv(1024) == b""  # closed by the server, without an answer to a request never sent
    slow.close()


def test_past_the_connection_cap_a_connection_gets_529(monkeypatch):
    monkeypatch.setattr(compat_server, "MAX_CONNECTIONS", 2)
    running = Running(ScriptedEngine([Finish("end_turn", None, 3, 0, 0)]))
    try:
        # the accept loop takes connections in the order they came: these two hold the slots first
        idle = [running.raw() for _ in range(2)]
        status, _, _ = exchange(running, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 529
        for sock in idle:
            sock.close()
    finally:
        running.stop()


def test_cors_is_off_unless_an_origin_is_given():
    plain = Running(ScriptedEngine([]))
    cors = Running(ScriptedEngine([]), cors="https://app.example")
    try:
        preflight = b"OPTIONS /v1/messages HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n"
        status, headers, _ = exchange(plain, preflight)
        assert status == 405 and "access-control-allow-origin" not in headers
        status, headers, _ = exchange(cors, preflight)
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
    finally:
        plain.stop()
        cors.stop()


# --- the process: signals and start-up failures -------------------------------------------------------------

def start_process(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "compat_server.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_0_with_its_prompt_state_on_disk(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a grace long enough for any machine: this checks the drain, not the speed
    proc = start_process("--host", "0.0.0.0", "--port", str(port), "--ctx", "2048", "--cache-dir", str(tmp_path),
                         "--shutdown-grace", "600")
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line:
                break
        assert any("without --api-key" in line for line in lines)  # the loud warning for 0.0.0.0
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        long_enough_to_keep = " ".join(f"item {i}," for i in range(300)) + " What is the capital of France?"
        sock.sendall(post("/v1/messages", {"model": "m", "max_tokens": 20, "stream": True, "temperature": 0,
                                           "messages": [{"role": "user", "content": long_enough_to_keep}]}))
        reader = Reader(sock)
        body = reader.file.readline()
        proc.send_signal(signal.SIGTERM)
        while not body.endswith(b"0\r\n\r\n"):  # the end of the chunked body
            line = reader.file.readline()
            if not line:
                break
            body += line
        assert sse_events(dechunk(body))[-1]["type"] == "message_stop"
        assert proc.wait(timeout=30) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        assert [f for f in os.listdir(tmp_path) if f.endswith(".kv")]  # written before the exit
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("make_model, reason", [
    (lambda tmp: os.path.join(tmp, "missing.gguf"), "model file not found"),
    (lambda tmp: open(os.path.join(tmp, "x.gguf"), "w").write("not a model") and os.path.join(tmp, "x.gguf"),
     "not a GGUF file"),
])
def test_a_model_that_cannot_load_exits_non_zero_with_one_line(tmp_path, make_model, reason):
    proc = start_process("--model", make_model(str(tmp_path)), "--port", "0")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert reason in output and len(output.strip().splitlines()) == 1
