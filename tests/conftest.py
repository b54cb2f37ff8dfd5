"""Shared fixtures: the real server on port 0, in-process, with the real default model."""

import os
import socket
import threading
import time

import pytest

import compat_server
from config import Config
from engine import Engine


def make_config(**overrides):
    """The tests' settings: any free port, a small context, no disk cache (never the user's folder)."""
    return Config(**{"port": 0, "ctx": 2048, "cache_ram": 256, "cache_dir": "", "cache_disk": 0, **overrides})


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
    engine = Engine(make_config())
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
        from chat_template import ChatTemplate
        from engine import Turns
        self.events, self.delay, self.after = events, delay, after  # after(): work after the last event
        self.template = ChatTemplate(None, "", "")
        self._turns = Turns(max_queue)
        self.holding = threading.Event()  # a job holds the model now

    @property
    def waiting(self):
        return self._turns.waiting

    def submit(self, request, cancelled):
        from engine import Job
        self.count_tokens(request)
        ticket = self._turns.reserve()
        return Job(ticket, 3, self._events(ticket, cancelled))

    def count_tokens(self, request):
        # rendered and encoded as the real engine does before its tokenizer, so that text no UTF-8
        # can hold fails here as it would there
        self.template.render(request).encode("utf-8")
        "".join(request.stop_sequences).encode("utf-8")
        return 3

    def _events(self, ticket, cancelled):
        from engine import ClientGone
        self._turns.acquire(ticket, cancelled)
        self.holding.set()
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
            self.holding.clear()
            ticket.close()


def wait_until(condition, timeout=60):
    """Poll until `condition()` holds: ordering by events, not by sleeping a guessed time. The
    timeout only keeps a broken server from hanging the suite."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the awaited state never came"
        time.sleep(0.01)


@pytest.fixture(scope="session")
def model_cache():
    """Test models built once per machine (each build checks what it finds there)."""
    import tempfile
    return os.path.join(tempfile.gettempdir(), "llama-compat-test-models")
