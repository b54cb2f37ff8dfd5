"""Byte-level tests over raw sockets: framing, keep-alive, limits, disconnects and error shapes."""

import json
import logging
import re
import socket
import threading

import pytest

import chat_template
import compat_server
from conftest import Running, ScriptedEngine, wait_until
from chat_template import ChatTemplate
from protocol import Finish, TextDelta
from sse_grammar import sse_events

BODY = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}


def post(path, body, extra_headers=b""):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n" + extra_headers
            + b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


class Reader:
    """Reads HTTP/1.1 responses (content-length or chunked) off one socket."""

    def __init__(self, sock):
        self.file = sock.makefile("rb")

    def response(self, head=False):
        status_line = self.file.readline()
        assert status_line, "connection closed without a response"
        status = int(status_line.split()[1])
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if head:
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while (size := int(self.file.readline().strip(), 16)) != 0:
                body += self.file.read(size)
                self.file.readline()
            self.file.readline()
        else:
            body = self.file.read(int(headers.get("content-length", 0)))
        return status, headers, body


def exchange(running, raw):
    with running.raw() as sock:
        sock.sendall(raw)
        return Reader(sock).response(head=raw.startswith(b"HEAD "))


def assert_error(status_headers_body, status, error_type):
    status_code, headers, body = status_headers_body
    assert status_code == status
    assert headers["request-id"].startswith("req_")
    payload = json.loads(body)
    assert payload["type"] == "error" and payload["error"]["type"] == error_type
    assert payload["error"]["message"]
    return payload["error"]["message"]


@pytest.fixture
def scripted():
    running = Running(ScriptedEngine([TextDelta("Hel"), TextDelta("lo"), Finish("end_turn", None, 3, 0, 2)]))
    yield running
    running.stop()


def test_a_stream_is_framed_as_sse_chunks_and_the_connection_stays_usable(scripted):
    with scripted.raw() as sock:
        reader = Reader(sock)
        sock.sendall(post("/v1/messages?beta=true", {**BODY, "stream": True}))
        status, headers, body = reader.response()
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        names = [e["type"] for e in sse_events(body)]
        assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                         "content_block_stop", "message_delta", "message_stop"]
        sock.sendall(post("/v1/messages", BODY))
        status, headers, body = reader.response()
        assert status == 200 and json.loads(body)["content"] == [{"type": "text", "text": "Hello"}]


def test_an_error_before_the_body_is_read_closes_the_connection_instead_of_misreading_it(scripted):
    with scripted.raw() as sock:
        sock.sendall(post("/v1/models", {"model": "x"}))
        status, headers, _ = Reader(sock).response()
        assert status == 405 and headers["connection"] == "close"
        assert sock.recv(1) == b""


def test_a_chunked_request_body_is_decoded(scripted):
    data = json.dumps(BODY).encode()
    raw = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n"
           + b"%x\r\n%s\r\n" % (10, data[:10]) + b"%x\r\n%s\r\n" % (len(data) - 10, data[10:]) + b"0\r\n\r\n")
    status, _, body = exchange(scripted, raw)
    assert status == 200 and json.loads(body)["stop_reason"] == "end_turn"


def test_a_body_over_32_mb_is_refused_before_it_is_read(scripted):
    raw = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-length: 40000000\r\n\r\n"
    assert_error(exchange(scripted, raw), 413, "request_too_large")


def test_a_post_without_a_length_is_a_411(scripted):
    raw = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_error(exchange(scripted, raw), 411, "invalid_request_error")


def test_oversized_or_too_many_headers_are_a_431_in_anthropics_shape(scripted):
    huge = b"GET / HTTP/1.1\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n"
    assert_error(exchange(scripted, huge), 431, "invalid_request_error")
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(120)) + b"\r\n"
    assert_error(exchange(scripted, many), 431, "invalid_request_error")


def test_a_garbage_request_line_gets_json_not_html(scripted):
    assert_error(exchange(scripted, b"GARBAGE\r\n\r\n"), 400, "invalid_request_error")


def test_invalid_utf8_and_unknown_paths_and_wrong_methods(scripted):
    message = assert_error(exchange(scripted, post("/v1/messages", b'{"model": "\xff"}')), 400, "invalid_request_error")
    assert "UTF-8" in message
    assert_error(exchange(scripted, post("/v1/complete", BODY)), 404, "not_found_error")
    status, headers, _ = exchange(scripted, b"GET /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and headers["allow"] == "POST"


def test_head_and_get_on_the_root_answer_200(scripted):
    status, headers, body = exchange(scripted, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and headers["request-id"].startswith("req_") and body == b""
    status, headers, body = exchange(scripted, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and headers["request-id"].startswith("req_") and json.loads(body) == {"status": "ok"}


def test_an_engine_failure_is_a_500_without_internals():
    running = Running(ScriptedEngine([RuntimeError("/secret/path/model.gguf exploded")]))
    try:
        result = exchange(running, post("/v1/messages", BODY))
        message = assert_error(result, 500, "api_error")
        assert "secret" not in message and result[1]["x-should-retry"] == "false"
        status, _, body = exchange(running, post("/v1/messages", {**BODY, "stream": True}))
        events = sse_events(body)
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "error"
        assert "secret" not in json.dumps(events)
    finally:
        running.stop()


def test_a_queued_stream_has_message_start_and_pings_while_it_waits(monkeypatch):
    monkeypatch.setattr(compat_server, "PING_INTERVAL", 0.2)
    slow = ScriptedEngine([TextDelta("x")] * 10 + [Finish("end_turn", None, 3, 0, 10)], delay=0.15)
    running = Running(slow)
    try:
        first = threading.Thread(target=exchange, args=(running, post("/v1/messages", BODY)))
        first.start()
        slow.holding.wait(60)
        status, _, body = exchange(running, post("/v1/messages", {**BODY, "stream": True}))
        events = sse_events(body)
        first.join()
        # a ping comes only after PING_INTERVAL of silence: it waited behind the first request
        assert status == 200 and events[0]["type"] == "message_start" and events[1]["type"] == "ping"
    finally:
        running.stop()


def test_past_the_queue_a_request_gets_529_with_retry_after():
    slow = ScriptedEngine([TextDelta("x")] * 10 + [Finish("end_turn", None, 3, 0, 10)], delay=0.1, max_queue=1)
    running = Running(slow)
    try:
        threads = [threading.Thread(target=exchange, args=(running, post("/v1/messages", BODY))) for _ in range(2)]
        threads[0].start()
        slow.holding.wait(60)
        threads[1].start()
        wait_until(lambda: slow.waiting == 1)  # one holds the model, one waits: the queue is full
        result = exchange(running, post("/v1/messages", BODY))
        for t in threads:
            t.join()
        assert_error(result, 529, "overloaded_error")
        assert result[1]["retry-after"]
    finally:
        running.stop()


def test_a_client_that_leaves_mid_stream_frees_the_model_at_once(served, caplog):
    body = {"model": "m", "max_tokens": 1500, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    sock = served.raw()
    sock.sendall(post("/v1/messages", body))
    reader = Reader(sock)
    reader.file.readline()
    while b"content_block_delta" not in reader.file.readline():
        pass
    with caplog.at_level(logging.INFO, logger="llama-compat"):
        reader.file.close()  # the makefile holds the socket open until it is closed too
        sock.close()
        status, _, reply = exchange(served, post("/v1/messages", {**BODY, "max_tokens": 2}))
        assert status == 200 and json.loads(reply)["usage"]["output_tokens"] == 2
        # cancelled at its next token, not run on to its 1,500
        wait_until(lambda: "client disconnected mid-stream; request cancelled" in caplog.text)


def test_a_client_that_leaves_a_non_streamed_request_frees_the_model(served, caplog):
    body = {"model": "m", "max_tokens": 1500, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    with caplog.at_level(logging.INFO, logger="llama-compat"):
        sock = served.raw()
        sock.sendall(post("/v1/messages", body))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        status, _, reply = exchange(served, post("/v1/messages", {**BODY, "max_tokens": 2}))
        assert status == 200
        wait_until(lambda: "client disconnected; request cancelled" in caplog.text)


def test_a_conversation_the_models_template_refuses_is_a_400_in_anthropics_shape(served, engine, monkeypatch):
    refusing = ChatTemplate("{% if messages[0].content != 'Hi' %}{{ raise_exception('No user query found in "
                            "messages.') }}{% endif %}", "", "")  # it renders the probe at start
    monkeypatch.setattr(engine, "template", refusing)
    body = {**BODY, "messages": [{"role": "user", "content": "Hello"}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        message = assert_error(exchange(served, post(path, body)), 400, "invalid_request_error")
        assert "No user query found" in message


def test_the_access_log_says_what_each_answer_was(served, caplog):
    caplog.set_level("INFO", logger="llama-compat")
    status, headers, _ = exchange(served, post("/v1/messages", BODY))
    assert status == 200
    assert_error(exchange(served, post("/v1/messages", {**BODY, "max_tokens": 0})), 400, "invalid_request_error")
    wait_until(lambda: "invalid_request_error: max_tokens" in caplog.text)
    line = next(r.getMessage() for r in caplog.records if headers["request-id"] in r.getMessage())
    assert re.search(r'"POST /v1/messages" 200 [0-9.]+s req_\w+ \(\d+ prompt tokens, \d+ reused; [1-8] out, '
                     r'(end_turn|max_tokens)\)$', line), line


def test_a_template_stuck_in_a_loop_is_a_400_in_anthropics_shape_and_the_server_goes_on(served, engine, monkeypatch):
    looping = ChatTemplate("{% if messages[0].content != 'Hi' %}{% for i in range(100000) %}{% for j in range(100000) %}"
                           "{% endfor %}{% endfor %}{% endif %}{{ messages[0].content }}", "", "")
    monkeypatch.setattr(engine, "template", looping)
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    body = {**BODY, "messages": [{"role": "user", "content": "Hello"}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        message = assert_error(exchange(served, post(path, body)), 400, "invalid_request_error")
        assert "did not finish rendering" in message
    assert exchange(served, post("/v1/messages/count_tokens", BODY))[0] == 200
