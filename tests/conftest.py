"""Shared fixtures: the real server on port 0, in-process, with the real default model."""

import os
import socket
import threading

import pytest

import compat_server
from engine import Engine


def make_config(**overrides):
    values = dict(model="", host="127.0.0.1", port=0, ctx=2048, threads=0, api_key="", model_name="",
                  max_queue=16, cors="", cache_ram=256, yarn=True, cache_dir="",
                  cache_disk=0)
    values.update(overrides)
    return compat_server.Config(**values)


class Running:
    """A server serving on a thread; `url` for the SDK, `raw()` for socket-level tests."""

    def __init__(self, engine, **overrides):
        self.server = compat_server.Server(make_config(**overrides), engine)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def raw(self, timeout=30):
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def engine():
    engine = Engine(n_ctx=2048, max_queue=16)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def served(engine):
    running = Running(engine)
    yield running
    running.stop()


class ScriptedEngine:
    """Stands in for the model where a protocol edge case cannot be produced on demand: it yields the
    events it is given (an Exception instance is raised instead), `delay` seconds apart."""

    model_name, display_name, n_ctx = "scripted", "Scripted", 4096

    def __init__(self, events, delay=0.0, max_queue=16, after=None):
        from engine import Turns
        self.events, self.delay, self.after = events, delay, after  # after(): work after the last event
        self._turns = Turns(max_queue)

    def prepare(self, request):
        from engine import Prompt
        self.count_tokens(request)
        return Prompt((1, 2, 3), request.stop_sequences, ())

    def count_tokens(self, request):
        # rendered and encoded as the real engine does before its tokenizer, so that text no UTF-8
        # can hold fails here as it would there
        from engine import ChatTemplate
        ChatTemplate(None, "", "").render(request).encode("utf-8")
        "".join(request.stop_sequences).encode("utf-8")
        return 3

    def reserve(self):
        return self._turns.reserve()

    def generate(self, ticket, prompt, sampling, cancelled):
        import time
        from engine import ClientGone
        self._turns.acquire(ticket, cancelled)
        try:
            for event in self.events:
                time.sleep(self.delay)
                if cancelled():
                    raise ClientGone()
                if isinstance(event, Exception):
                    raise event
                yield event
            if self.after:
                self.after()
        finally:
            ticket.close()


@pytest.fixture(scope="session")
def model_cache():
    """Test models built once per machine (each build checks what it finds there)."""
    import tempfile
    return os.path.join(tempfile.gettempdir(), "llama-compat-test-models")
