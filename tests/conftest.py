"""Shared fixtures: the real server on port 0, in-process, with the real default model."""

import socket
import threading

import pytest

import compat_server
from engine import Engine


def make_config(**overrides):
    values = dict(model="", host="127.0.0.1", port=0, ctx=2048, threads=0, api_key="", model_name="",
                  max_queue=16, cors="")
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
    return Engine(n_ctx=2048, max_queue=16)


@pytest.fixture(scope="session")
def served(engine):
    running = Running(engine)
    yield running
    running.stop()
