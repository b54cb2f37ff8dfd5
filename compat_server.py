"""llama-compat: Anthropic's Messages API over HTTP, served by one local llama.cpp model.

Contract: this module owns the socket, HTTP/1.1 framing (keep-alive, chunked bodies both ways), auth,
routing, the access log, and writing JSON and SSE; it turns every failure into an Anthropic-shaped
error with the right status, and nothing internal (paths, tracebacks) ever reaches a client. It never
imports llama_cpp: the protocol rules live in `protocol.py`, the model in `engine.py` (one entry,
`Engine.submit`), the settings in `config.py`.

Run `python compat_server.py --help` for the flags.
"""

import contextlib
import hmac
import json
import logging
import re
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import launch_claude
import protocol
from config import parse_config
from engine import ClientGone, Engine, EngineClosed, ModelLoadError, cpu_features, thread_settings
from protocol import ApiError, Finish, MessageAssembler, new_id

log = logging.getLogger("llama-compat")

# Seconds a connection may sit silent (idle keep-alive included) before it is dropped.
SOCKET_TIMEOUT = 60
# Seconds from a request line to the end of its body: a client that trickles headers or a body a
# byte at a time cannot hold a thread for longer than this.
REQUEST_READ_DEADLINE = 30
# Seconds of silence after which a stream gets a `ping` (Anthropic sends them; proxies time out on
# silence, and the SDKs skip them).
PING_INTERVAL = 5.0
# Open connections served at once; past it a connection is answered 529 and closed.
MAX_CONNECTIONS = 64
# After an answer sent before the request's body was read (a 413, a GET with a body), the connection
# closes; first what the client still sends is read and dropped, for at most this long and this much,
# so that it can finish sending and read the answer instead of meeting a reset (a lingering close).
LINGER_SECONDS = 5.0
LINGER_BYTES = 2 * protocol.MAX_BODY_BYTES
# Seconds without a content delta after which a stream gets an empty one: Claude Code aborts a stream
# with no content delta for 300 s, pings or not (CLAUDE_CODE_TRAFFIC.md §5).
CONTENT_KEEPALIVE = 20.0
# Epoch creation date: the API allows it when a model's release date is unknown.
MODEL_CREATED_AT = "1970-01-01T00:00:00Z"


# ---------------------------------------------------------------------------------------------------
# Pure helpers: auth, models, chunked bodies
# ---------------------------------------------------------------------------------------------------

def check_auth(headers, api_key):
    """Either x-api-key or a Bearer token may carry the key (Claude Code can send both)."""
    if not api_key:
        return
    offered = [headers.get("x-api-key") or ""]
    bearer = headers.get("authorization") or ""
    if bearer[:7].lower() == "bearer ":
        offered.append(bearer[7:].strip())
    expected = api_key.encode()
    # compare_digest on every candidate: the time taken does not depend on where a key differs
    if not any([hmac.compare_digest(o.encode(), expected) for o in offered]):
        raise ApiError(401, "authentication_error", "invalid x-api-key")


def model_info(engine):
    return {"type": "model", "id": engine.model_name, "display_name": engine.display_name,
            "created_at": MODEL_CREATED_AT, "max_input_tokens": engine.n_ctx, "max_tokens": engine.n_ctx,
            # not the API's: how this server reads the model (its chat template, calls and reasoning)
            "llama_compat": engine.template.facts,
            # OpenAI's names alongside, so OpenAI-style clients can list the model too
            "object": "model", "created": 0, "owned_by": "llama-compat"}


def list_models(engine, query):
    params = parse_qs(query)
    limit = params.get("limit", ["20"])[-1]
    if not re.fullmatch(r"[0-9]{1,4}", limit) or not 1 <= int(limit) <= 1000:
        raise protocol.invalid("limit: Input should be between 1 and 1000")
    info = model_info(engine)
    after, before = params.get("after_id", [None])[-1], params.get("before_id", [None])[-1]
    data = [] if engine.model_name in (after, before) else [info]
    first = data[0]["id"] if data else None
    return {"data": data, "has_more": False, "first_id": first, "last_id": first, "object": "list"}


def read_chunked(rfile, limit):
    """A chunked request body (RFC 9112 §7.1), refusing it once it grows past `limit`."""
    body = bytearray()
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise protocol.invalid("malformed chunked request body") from None
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers are ignored
            return bytes(body)
        if len(body) + size > limit:
            raise ApiError(413, "request_too_large", "Request exceeds the maximum allowed number of bytes")
        chunk = rfile.read(size)
        if len(chunk) != size or rfile.readline(3) not in (b"\r\n", b"\n"):
            raise protocol.invalid("malformed chunked request body")
        body += chunk


def peer_closed(sock):
    """True when the client has closed its end: readable with nothing to read (or reset)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except (OSError, ValueError):
        return True


# ---------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------

class SseStream:
    """Writes a message's SSE frames as HTTP chunks, from engine events fed to its assembler.

    While nothing is written, a heartbeat thread sends a `ping` every PING_INTERVAL seconds and, past
    CONTENT_KEEPALIVE seconds without a content delta (a long prompt evaluation), an empty delta in
    a block it opens (thinking when the request asked for it, else text). The lock keeps the
    heartbeat's frames from interleaving with event frames and the assembler consistent. A write
    that fails marks the stream broken: the client has left and the request is cancelled.
    """

    def __init__(self, wfile, assembler, keepalive_kind):
        self._wfile = wfile
        self._assembler = assembler
        self._keepalive_kind = keepalive_kind
        self._lock = threading.Lock()
        self._last_write = self._last_content = time.monotonic()
        self._done = threading.Event()
        self.broken = self.closed = False
        with self._lock:
            self._send(assembler.start())
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def feed(self, event):
        with self._lock:
            frames = self._assembler.feed(event)
            if frames:
                self._last_content = time.monotonic()
            self._send(frames)

    def fail(self, error_type="api_error", message="Internal server error"):
        """A failure after the headers: the SDKs raise on an in-band error event."""
        with self._lock:
            self._send([{"type": "error", "error": {"type": error_type, "message": message}}])

    def _send(self, events):
        if self.broken or self.closed or not events:
            return  # nothing may follow the chunked body's end
        data = b"".join(protocol.sse_frame(e) for e in events)
        try:
            self._wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:
            self.broken = True
        self._last_write = time.monotonic()

    def _heartbeat(self):
        while not self._done.wait(0.5):
            with self._lock:
                now = time.monotonic()
                if now - self._last_content >= CONTENT_KEEPALIVE:
                    self._last_content = now
                    self._send(self._assembler.keepalive(self._keepalive_kind))
                elif now - self._last_write >= PING_INTERVAL:
                    self._send([{"type": "ping"}])

    def close(self):
        """Stop the heartbeat and end the chunked body (once; later calls do nothing)."""
        self._done.set()
        self._thread.join()
        with self._lock:
            if not self.broken and not self.closed:
                try:
                    self._wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.broken = True
            self.closed = True


# ---------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------

# Every route, by method and path; `{model_id}` matches one path segment. A known path asked with
# another method is a 405 listing these; an unknown path is a 404.
ROUTES = {
    ("GET", "/"): "_health",
    ("HEAD", "/"): "_health",
    ("GET", "/v1/models"): "_list_models",
    ("GET", "/v1/models/{model_id}"): "_retrieve_model",
    ("POST", "/v1/messages"): "_create_message",
    ("POST", "/v1/messages/count_tokens"): "_count_tokens",
}
MODEL_PREFIX = "/v1/models/"


def match_route(path):
    """(route path, model id or None) for a request path; trailing slashes do not count.

    >>> match_route("/v1/models/local/"), match_route("/v1/messages")
    (('/v1/models/{model_id}', 'local'), ('/v1/messages', None))
    """
    path = path.rstrip("/") or "/"
    if path.startswith(MODEL_PREFIX) and "/" not in path[len(MODEL_PREFIX):]:
        return MODEL_PREFIX + "{model_id}", path[len(MODEL_PREFIX):]
    return path, None


class Handler(BaseHTTPRequestHandler):
    """One connection. Each request on it ends one of these ways, all decided in `_dispatch`:
    an answer (JSON, or a stream that ends with `message_stop`); an Anthropic-shaped error before any
    byte; an in-band `error` event in a stream that already started; or no answer because the client
    left. A failure because the server is stopping is answered as such (529 or an `overloaded_error`
    event), never as a client leaving. The end-of-request rule is in `_end_request`."""

    protocol_version = "HTTP/1.1"
    server_version = "llama-compat"
    # every SSE frame is a small write that must leave at once, not wait for the previous one's ACK
    disable_nagle_algorithm = True
    timeout = SOCKET_TIMEOUT

    # --- dispatch: every request, whatever happens, ends in exactly one response -------------------

    def handle_one_request(self):
        self.request_id = new_id("req_")
        self.started = time.monotonic()
        self.status = None
        self.outcome = ""  # for the access log: what the answer was (tokens, stop reason) or the error
        self._sse = None  # the stream of this request, once it has one
        self._body_read = False
        self._answered_early = False  # an error answered before the request was read whole
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self.connection)
            self._end_request()

    def parse_request(self):
        # the request line has arrived: headers and body must follow within the deadline
        self.server.watch(self.connection, REQUEST_READ_DEADLINE)
        return super().parse_request()

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = do_GET

    def _dispatch(self):
        self.server.count_request(+1)
        try:
            self._route()
        except ApiError as exc:
            self._send_api_error(exc)
        except (ClientGone, ConnectionError) as exc:
            self.close_connection = True
            if self._for_shutdown(exc):
                self._answer_shutdown()
            else:
                log.info("%s: client disconnected%s", self.request_id,
                         "; request cancelled" if isinstance(exc, ClientGone) else "")
        except Exception:
            log.exception("%s: unexpected error", self.request_id)
            self._send_api_error(ApiError(500, "api_error", "Internal server error",
                                          headers=[("x-should-retry", "false")]))
        finally:
            self.server.count_request(-1)
            self._log_access()

    def _input_left(self):
        """Whether bytes of this request may still be unread: its body, or the rest of a request an
        early error cut short."""
        return self._answered_early or self._body_unread()

    def _closes(self):
        """The end-of-request rule: the connection closes when input was left unread (its bytes must
        never be read as the next request) or once the server is stopping (it waits for no more)."""
        return self._input_left() or self.server.stopping.is_set()

    def _end_request(self):
        """Applies the rule; an answer sent with input left unread lingers first, so that it reaches
        a client still sending."""
        if self.status is not None and self._input_left():
            self._linger()
        if self._closes():
            self.close_connection = True

    def _linger(self):
        sock = self.connection
        try:
            self.wfile.flush()
            sock.shutdown(socket.SHUT_WR)  # the answer is complete: the client reads it, then EOF
            deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
            while dropped < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    def _for_shutdown(self, exc):
        """Whether a request ended because the server is stopping (its grace period over, or the
        engine closed), not because its client left."""
        return self.server.cancel_all.is_set() or isinstance(exc, EngineClosed)

    def _answer_shutdown(self):
        log.info("%s: cancelled: the server is shutting down", self.request_id)
        if self.status is None:
            with contextlib.suppress(OSError):  # the client may have left as well
                self._send_api_error(ApiError(529, "overloaded_error", "The server is shutting down; retry shortly",
                                              headers=[("retry-after", "5")]))

    def _route(self):
        url = urlsplit(self.path)
        route, model_id = match_route(url.path)
        allowed = [method for method, path in ROUTES if path == route]
        if not allowed:
            raise ApiError(404, "not_found_error", f"Not found: {self.command} {url.path}")
        if self.command == "OPTIONS" and self.server.config.cors:
            return self._send_json(204, None)
        if self.command not in allowed:
            raise ApiError(405, "invalid_request_error", f"Method {self.command} not allowed for {route}",
                           headers=[("allow", ", ".join(allowed))])
        if route != "/":
            check_auth(self.headers, self.server.config.api_key)
        getattr(self, ROUTES[(self.command, route)])(url.query, model_id)

    def _health(self, query, model_id):
        self._send_json(200, {"status": "ok"})

    def _list_models(self, query, model_id):
        self._send_json(200, list_models(self.server.engine, query))

    def _retrieve_model(self, query, model_id):
        if model_id != self.server.engine.model_name:
            raise ApiError(404, "not_found_error", f"model: {model_id}")
        self._send_json(200, model_info(self.server.engine))

    def _count_tokens(self, query, model_id):
        request = protocol.parse_messages_request(self._read_json(), count_only=True)
        self._send_json(200, {"input_tokens": self.server.engine.count_tokens(request)})

    def _read_json(self):
        raw = self._read_body()
        self.server.unwatch(self.connection)
        return protocol.decode_json_body(raw)

    # --- /v1/messages -----------------------------------------------------------------------------

    def _create_message(self, query, model_id):
        request = protocol.parse_messages_request(self._read_json())
        # a 400 for a prompt that does not fit, a 529 for a full queue: both before any byte
        with self.server.engine.submit(request, self._client_gone) as job:
            assembler = MessageAssembler(new_id("msg_"), request.model, job.input_tokens)
            if request.stream:
                return self._stream(assembler, job, "thinking" if request.thinking else "text")
            for event in job:
                assembler.feed(event)
                if isinstance(event, Finish):
                    self._answered(event)
                    # answered now: what the engine does after the answer (keeping the prompt state)
                    # must not delay it
                    self._send_json(200, assembler.message)

    def _client_gone(self):
        return self.server.cancel_all.is_set() or (self._sse is not None and self._sse.broken) or peer_closed(
            self.connection)

    def _stream(self, assembler, job, keepalive_kind):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self._common_headers()
        self.end_headers()
        self._sse = sse = SseStream(self.wfile, assembler, keepalive_kind)
        try:
            for event in job:
                sse.feed(event)
                if isinstance(event, Finish):
                    self._answered(event)
                    sse.close()  # the stream ends here; keeping the prompt state comes after
        except ClientGone as exc:
            self.close_connection = True
            if self._for_shutdown(exc):
                log.info("%s: stream cancelled: the server is shutting down", self.request_id)
                sse.fail("overloaded_error", "The server is shutting down; retry shortly")
            else:
                log.info("%s: client disconnected mid-stream; request cancelled", self.request_id)
        except Exception:
            self.close_connection = True
            log.exception("%s: failed mid-stream", self.request_id)
            sse.fail()
        else:
            if sse.broken:  # it left after the answer was complete, while the state was being kept
                log.info("%s: client disconnected after the answer", self.request_id)
        finally:
            job.close()
            sse.close()
            if sse.broken:
                self.close_connection = True

    # --- bodies and responses ---------------------------------------------------------------------

    def _body_unread(self):
        """Whether the request has a body (or may have one) that was not read whole."""
        headers = getattr(self, "headers", None)
        if headers is None or self._body_read:
            return False
        return headers.get("transfer-encoding") is not None or headers.get("content-length", "0") != "0"

    def _read_body(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = read_chunked(self.rfile, protocol.MAX_BODY_BYTES)
        else:
            length = self.headers.get("content-length")
            if length is None:
                raise ApiError(411, "invalid_request_error", "Content-Length or chunked Transfer-Encoding required")
            if not re.fullmatch(r"[0-9]+", length):
                raise protocol.invalid("Content-Length is not a number")
            if int(length) > protocol.MAX_BODY_BYTES:
                raise ApiError(413, "request_too_large", "Request exceeds the maximum allowed number of bytes")
            body = self.rfile.read(int(length))
            if len(body) != int(length):
                raise protocol.invalid("request body ended before Content-Length bytes")
        self._body_read = True
        return body

    def _common_headers(self):
        self.send_header("request-id", self.request_id)
        cors = self.server.config.cors
        if cors:
            self.send_header("access-control-allow-origin", cors)
            self.send_header("access-control-allow-headers", "*")
            self.send_header("access-control-allow-methods", "GET, POST, OPTIONS")
        if self._closes():
            self.close_connection = True
        if self.close_connection:
            self.send_header("connection", "close")

    def _send_json(self, status, payload, headers=()):
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_api_error(self, exc):
        if self.status is not None:
            return  # headers already went out; a stream reports its failure in-band
        self.outcome = f"{exc.error_type}: {exc.message}"
        self._send_json(exc.status, protocol.error_body(exc.error_type, exc.message, self.request_id),
                        exc.headers)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (bad request line, oversized headers, 501) in Anthropic's shape."""
        if not hasattr(self, "request_id"):
            self.request_id, self.started, self.status, self.outcome = new_id("req_"), time.monotonic(), None, ""
        if code == 501:  # an unknown method: the API's answer is "not allowed", not a server fault
            code, message = 405, f"Method {self.command} not allowed"
        kinds = {404: "not_found_error", 413: "request_too_large", 500: "api_error"}
        self.close_connection = self._answered_early = True
        # an unparseable request line leaves the stdlib assuming HTTP/0.9, which has no status line
        self.request_version = "HTTP/1.1"
        self._send_api_error(ApiError(code, kinds.get(code, "invalid_request_error"),
                                      message or self.responses.get(code, ("Error",))[0]))
        self._log_access()

    def version_string(self):
        return self.server_version

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _log_access, with timing and the request id

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    def _log_access(self):
        status = self.status if self.status is not None else "-"  # "-": the client left unanswered
        log.info('%s "%s %s" %s %.3fs %s%s', self.client_address[0], self.command, self.path, status,
                 time.monotonic() - self.started, self.request_id, self.outcome and f" ({self.outcome})")

    def _answered(self, finish):
        self.outcome = (f"{finish.input_tokens + finish.cache_read_input_tokens} prompt tokens, "
                        f"{finish.cache_read_input_tokens} reused; {finish.output_tokens} out, {finish.stop_reason}")


class Server(ThreadingHTTPServer):
    """Process state: config, the engine, the connection cap and the shutdown switch."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config, engine):
        super().__init__((config.host, config.port), Handler)
        self.config = config
        self.engine = engine
        self.stopping = threading.Event()  # a signal came: finish what is in flight, take nothing new
        self.cancel_all = threading.Event()  # the grace period is over: cancel what is in flight
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._in_flight = 0
        self._count_lock = threading.Lock()  # guards _in_flight and _deadlines
        self._deadlines = {}  # socket -> monotonic time by which its request must have been read
        self._closed = threading.Event()
        threading.Thread(target=self._reap_slow_readers, daemon=True).start()

    def server_close(self):
        self._closed.set()
        super().server_close()

    def watch(self, sock, seconds):
        with self._count_lock:
            self._deadlines[sock] = time.monotonic() + seconds

    def unwatch(self, sock):
        with self._count_lock:
            self._deadlines.pop(sock, None)

    def _reap_slow_readers(self):
        """Shut the socket of a request still being read past its deadline; the blocked read in its
        handler thread then ends, and the thread with it."""
        while not self._closed.wait(0.5):
            now = time.monotonic()
            with self._count_lock:
                late = [sock for sock, deadline in self._deadlines.items() if deadline < now]
                for sock in late:
                    del self._deadlines[sock]
            for sock in late:
                log.info("dropping a client that did not send its request in time")
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def count_request(self, delta):
        with self._count_lock:
            self._in_flight += delta

    def busy(self):
        with self._count_lock:
            return self._in_flight > 0

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            _refuse_connection(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


def _refuse_connection(sock):
    body = json.dumps(protocol.error_body("overloaded_error", "Too many open connections",
                                          new_id("req_"))).encode()
    try:
        sock.sendall(b"HTTP/1.1 529 Overloaded\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------------
# Process
# ---------------------------------------------------------------------------------------------------

def _is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


def _stop_on_signal(server):
    """SIGTERM/SIGINT: stop accepting, give in-flight requests the grace period, then cancel."""
    def stop(signum, frame):
        log.info("signal %d: no longer accepting; finishing in-flight requests (up to %g s)", signum,
                 server.config.shutdown_grace)
        server.stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _drain(server):
    deadline = time.monotonic() + server.config.shutdown_grace
    while server.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.busy():
        log.info("grace period over: cancelling the requests still in flight")
    server.cancel_all.set()
    while server.busy() and time.monotonic() < deadline + 2:
        time.sleep(0.05)


def main(argv=None):
    server_argv, claude_argv = launch_claude.split_argv(sys.argv[1:] if argv is None else argv)
    config = parse_config(server_argv)
    if claude_argv is not None:
        return launch_claude.run(config, server_argv, claude_argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not _is_loopback(config.host) and not config.api_key:
        log.warning("!!! binding %s without --api-key: anyone who can reach this port can use the model !!!",
                    config.host)
    try:
        engine = Engine(config)
    except ModelLoadError as exc:
        print(f"llama-compat: {exc}", file=sys.stderr)
        return 1
    features = cpu_features()
    log.info("llama.cpp build: %s", features)
    log.info("threads: %d generating, %d evaluating prompts; OpenMP: %s", engine.n_threads,
             engine.n_threads_batch, thread_settings())
    if re.search(r"AMX\w* = 1", features):
        log.warning("this llama.cpp build has AMX kernels, which crash on some CPUs (llama.cpp issue 20824); "
                    "`make run` builds one without them")
    try:
        server = Server(config, engine)
    except OSError as exc:
        print(f"llama-compat: cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr)
        return 1
    _stop_on_signal(server)
    host, port = server.server_address[:2]
    log.info("chat template: %s", engine.template.summary)
    log.info("serving %s (context %d) at http://%s:%d", engine.model_name, engine.n_ctx, host, port)
    server.serve_forever()
    server.server_close()
    _drain(server)
    engine.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
