"""The one SSE grammar checker, for raw-socket streams and for every stream the SDK reads in tests.

`check_grammar(events)` holds a stream's events (dicts, as decoded from `data:`) to the order the
SDKs rely on; `sse_events(body)` decodes a raw body frame by frame and checks it (`dechunk` gives the
body of a response read raw off a socket); `sdk_client(url)`
is an `anthropic.Anthropic` (or, with `asynchronous=True`, `AsyncAnthropic`) whose transport checks
every event stream it reads to the end, so an SDK test cannot pass on a stream the grammar refuses.
"""

import json

import anthropic
import httpx2 as httpx  # the HTTP client this SDK is built on (a successor of httpx)

# which delta types each content block may carry
DELTAS = {"text": {"text_delta"}, "thinking": {"thinking_delta", "signature_delta"},
          "tool_use": {"input_json_delta"}}


def check_grammar(events):
    """message_start first, then blocks opened, given deltas of their own kind and closed one at a
    time with consecutive indexes, then one message_delta and message_stop; or, at any point after
    message_start, an `error` event that ends the stream. Pings may come anywhere after the start."""
    assert events and events[0]["type"] == "message_start", [e["type"] for e in events[:3]]
    names = [e["type"] for e in events if e["type"] != "ping"]
    failed = names[-1] == "error"
    assert failed or names[-2:] == ["message_delta", "message_stop"], names[-3:]
    open_block, next_index, delta_seen = None, 0, False
    for e in (e for e in events[1:] if e["type"] not in ("ping", "error", "message_stop")):
        assert not delta_seen, f"{e['type']} after message_delta"
        if e["type"] == "content_block_start":
            assert open_block is None and e["index"] == next_index, e
            open_block = e["content_block"]["type"]
        elif e["type"] == "content_block_delta":
            assert open_block is not None and e["index"] == next_index, e
            assert e["delta"]["type"] in DELTAS.get(open_block, {e["delta"]["type"]}), (open_block, e)
        elif e["type"] == "content_block_stop":
            assert open_block is not None and e["index"] == next_index, e
            open_block, next_index = None, next_index + 1
        elif e["type"] == "message_delta":
            assert open_block is None, "message_delta inside a block"
            delta_seen = True
        else:
            raise AssertionError(f"unknown event {e['type']}")
    assert failed or delta_seen
    assert names.count("message_start") == 1 and names.count("error") + names.count("message_stop") == 1


def sse_events(body):
    """A raw event-stream body as its events, each frame checked (`event:` names the data's type),
    the whole checked against the grammar."""
    events = []
    for frame in body.decode().split("\n\n"):
        if not frame:
            continue
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        events.append(data)
    check_grammar(events)
    return events


def dechunk(raw):
    """The body of a chunked HTTP/1.1 response read raw from a socket (status line and headers included)."""
    rest, body = raw.split(b"\r\n\r\n", 1)[1], b""
    while rest:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2:]
    return body


def _check_read_whole(body):
    sse_events(body)  # an empty event stream fails too: it has no message_start


class _CheckedStream(httpx.SyncByteStream):
    def __init__(self, inner):
        self._inner, self._body = inner, b""

    def __iter__(self):
        for chunk in self._inner:
            self._body += chunk
            yield chunk
        _check_read_whole(self._body)  # only a stream read to its end: a test may leave one early

    def close(self):
        self._inner.close()


class _CheckedAsyncStream(httpx.AsyncByteStream):
    def __init__(self, inner):
        self._inner, self._body = inner, b""

    async def __aiter__(self):
        async for chunk in self._inner:
            self._body += chunk
            yield chunk
        _check_read_whole(self._body)

    async def aclose(self):
        await self._inner.aclose()


def _is_stream(response):
    return response.headers.get("content-type", "").startswith("text/event-stream")


class _CheckedTransport(httpx.HTTPTransport):
    def handle_request(self, request):
        response = super().handle_request(request)
        if _is_stream(response):
            response.stream = _CheckedStream(response.stream)
        return response


class _CheckedAsyncTransport(httpx.AsyncHTTPTransport):
    async def handle_async_request(self, request):
        response = await super().handle_async_request(request)
        if _is_stream(response):
            response.stream = _CheckedAsyncStream(response.stream)
        return response


def sdk_client(url, asynchronous=False, **kwargs):
    kwargs = {"api_key": "unused", "max_retries": 0, **kwargs}
    if asynchronous:
        return anthropic.AsyncAnthropic(base_url=url, http_client=httpx.AsyncClient(transport=_CheckedAsyncTransport()),
                                        **kwargs)
    return anthropic.Anthropic(base_url=url, http_client=httpx.Client(transport=_CheckedTransport()), **kwargs)
