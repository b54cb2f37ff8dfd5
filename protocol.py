"""The Anthropic Messages protocol, sans I/O.

Contract: wire JSON (already decoded into Python values) goes in, frozen dataclasses come out, and
engine events go in, response JSON and SSE frames come out. Every client mistake is raised as the one
error type, `ApiError`, whose message names the offending field the way the real API does
(`messages.0.content.1.type: ...`). This module never touches a socket, a header or the model; it is
shared by `compat_server.py` (which owns HTTP) and `engine.py` (which owns llama.cpp).
"""

import base64
import hashlib
import json
import math
import re
import secrets
from dataclasses import dataclass, field

# The real API's limit for /v1/messages; bodies above it are refused before they are read.
MAX_BODY_BYTES = 32 * 1024 * 1024
# Client-side recursion in json.loads is bounded by the interpreter; this bound keeps rendering and
# validation recursion (tool schemas, tool inputs) far below it.
MAX_JSON_DEPTH = 64
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"
ROLES = ("user", "assistant", "system")


class ApiError(Exception):
    """A failure the client sees: HTTP status, Anthropic error type and a message safe to show."""

    def __init__(self, status, error_type, message, headers=()):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = tuple(headers)


def invalid(message):
    return ApiError(400, "invalid_request_error", message)


def error_body(error_type, message, request_id):
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


def new_id(prefix):
    """Ids shaped like the real API's (`msg_01…`, `toolu_01…`, `req_01…`): 24 base62 characters."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return prefix + "01" + "".join(secrets.choice(alphabet) for _ in range(22))


# ---------------------------------------------------------------------------------------------------
# Decoding the body
# ---------------------------------------------------------------------------------------------------

def _reject_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise invalid(f"Invalid JSON: duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name):
    raise invalid(f"Invalid JSON: {name} is not a valid JSON value")


def _json_depth_ok(raw):
    """Nesting depth by bracket count, outside strings; checked before json.loads recurses."""
    depth = 0
    in_string = escaped = False
    for ch in raw:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def decode_json_body(raw: bytes):
    """Bytes of a request body to a JSON object, or ApiError(400) saying what is wrong with them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"Invalid JSON: body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise invalid("Invalid JSON: request body is empty")
    if not _json_depth_ok(text):
        raise invalid(f"Invalid JSON: nesting deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise invalid(f"Invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # e.g. integers beyond Python's digit limit
        if isinstance(exc, ApiError):
            raise
        raise invalid("Invalid JSON: a number is too large") from None
    if not isinstance(value, dict):
        raise invalid("Invalid JSON: the body must be a JSON object")
    lone = _lone_surrogate(text)
    if lone is not None:
        # json.loads accepts these, but no UTF-8 text (a prompt, a tokenizer's input) can hold one;
        # the real API refuses them in these words
        at, what = lone
        raise invalid(f"The request body is not valid JSON: {what} in string: line {text.count(chr(10), 0, at) + 1} "
                      f"column {at - text.rfind(chr(10), 0, at)} (char {at})")
    return value


# In a body json.loads accepted, every backslash is inside a string and starts one escape.
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.S)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(text):
    r"""(offset, what is wrong) of the first \uD800-\uDFFF escape in JSON text that is not half of a pair.

    >>> _lone_surrogate(r'{"a": "\\ud800 \ud83d\ude00"}') is None  # an escaped backslash, then a pair
    True
    >>> _lone_surrogate(r'{"a": "x\ud800"}'), _lone_surrogate(r'{"a": "\udc00"}')
    ((8, 'no low surrogate'), (7, 'no high surrogate'))
    """
    if not _SURROGATE_ESCAPE.search(text):
        return None
    high = None  # the match of a high surrogate waiting for its low half
    for match in _ESCAPE.finditer(text):
        code = int(match[1], 16) if match[1] else None
        is_low = code is not None and 0xDC00 <= code <= 0xDFFF
        if high is not None:
            if not (is_low and match.start() == high.end()):
                return high.start(), "no low surrogate"
            high = None
        elif code is not None and 0xD800 <= code <= 0xDBFF:
            high = match
        elif is_low:
            return match.start(), "no high surrogate"
    return None if high is None else (high.start(), "no low surrogate")


# ---------------------------------------------------------------------------------------------------
# Request model
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextBlock:
    text: str


@dataclass(frozen=True)
class ToolUseBlock:
    id: str
    name: str
    input: dict


@dataclass(frozen=True)
class ToolResultBlock:
    tool_use_id: str
    content: str
    is_error: bool


@dataclass(frozen=True)
class ThinkingBlock:
    thinking: str


@dataclass(frozen=True)
class Message:
    role: str
    content: tuple


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict


@dataclass(frozen=True)
class ToolChoice:
    type: str = "auto"
    name: str = None
    disable_parallel_tool_use: bool = False


@dataclass(frozen=True)
class MessagesRequest:
    """A validated /v1/messages (or count_tokens) request, in Anthropic's own names."""

    model: str
    messages: tuple
    max_tokens: int = 0
    system: str = ""
    stop_sequences: tuple = ()
    temperature: float = None
    top_p: float = None
    top_k: int = None
    stream: bool = False
    tools: tuple = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    thinking: bool = False
    thinking_budget: int = None
    json_schema: dict = None

    @property
    def prefill(self):
        """Text of a final assistant message, which the reply continues."""
        if self.messages and self.messages[-1].role == "assistant":
            return "".join(b.text for b in self.messages[-1].content if isinstance(b, TextBlock))
        return ""


def _type_name(value):
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _expect(value, kinds, path, what):
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    # bool is an int subclass in Python but not a number in JSON
    if isinstance(value, bool) and bool not in kinds:
        raise invalid(f"{path}: Input should be {what}")
    if not isinstance(value, kinds):
        raise invalid(f"{path}: Input should be {what}, got {_type_name(value)}")
    return value


def _number(body, key, low, high):
    if body.get(key) is None:
        return None
    value = _expect(body[key], (int, float), key, "a valid number")
    if not math.isfinite(value) or value < low or value > high:
        raise invalid(f"{key}: Input should be between {low} and {high}")
    return float(value)


def _texts_of_blocks(value, path, media=False):
    """A system prompt or tool_result content: a string or a list of text blocks, as strings.
    `media`: images, documents and search results are allowed too (tool results), as their text."""
    if isinstance(value, str):
        return [value]
    _expect(value, list, path, "a valid string or list of blocks")
    texts = []
    for i, block in enumerate(value):
        where = f"{path}.{i}"
        _expect(block, dict, where, "a valid dictionary")
        kind = block.get("type")
        if media and isinstance(kind, str) and kind in MEDIA_BLOCKS:
            texts.append(MEDIA_BLOCKS[kind](block, where))
        elif kind != "text":
            raise invalid(f"{where}.type: Input should be 'text'" + (
                ", 'image', 'document' or 'search_result'" if media else ""))
        else:
            texts.append(_expect(block.get("text"), str, f"{where}.text", "a valid string"))
    return texts


def _text_of_blocks(value, path):
    return "\n\n".join(_texts_of_blocks(value, path))


def _parse_system(value):
    """Claude Code's billing line differs per conversation and would defeat prefix reuse; it is
    addressed to Anthropic's billing, not to the model, so it is dropped."""
    if value is None:
        return ""
    texts = _texts_of_blocks(value, "system")
    return "\n\n".join(t for t in texts if not t.startswith(BILLING_HEADER_PREFIX))


def _parse_block(block, path, role):
    _expect(block, dict, path, "a valid dictionary")
    kind = block.get("type")
    if kind == "text":
        return TextBlock(_expect(block.get("text"), str, f"{path}.text", "a valid string"))
    if isinstance(kind, str) and kind in MEDIA_BLOCKS:
        return TextBlock(MEDIA_BLOCKS[kind](block, path))
    if isinstance(kind, str) and kind in SERVER_BLOCKS:
        text = SERVER_BLOCKS[kind](block, path)
        return TextBlock(text) if text else None
    if kind == "tool_use":
        if role != "assistant":
            raise invalid(f"{path}: tool_use blocks may only appear in assistant messages")
        block_id = _expect(block.get("id"), str, f"{path}.id", "a valid string")
        if not TOOL_USE_ID.match(block_id):
            raise invalid(f"{path}.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
        name = _expect(block.get("name"), str, f"{path}.name", "a valid string")
        return ToolUseBlock(block_id, name, _expect(block.get("input"), dict, f"{path}.input", "a valid dictionary"))
    if kind == "tool_result":
        if role != "user":
            raise invalid(f"{path}: tool_result blocks may only appear in user messages")
        use_id = _expect(block.get("tool_use_id"), str, f"{path}.tool_use_id", "a valid string")
        content = "\n\n".join(_texts_of_blocks(block.get("content", ""), f"{path}.content", media=True))
        is_error = _expect(block.get("is_error", False), bool, f"{path}.is_error", "a valid boolean")
        return ToolResultBlock(use_id, content, is_error)
    if kind == "thinking":
        if role != "assistant":
            raise invalid(f"{path}: thinking blocks may only appear in assistant messages")
        return ThinkingBlock(_expect(block.get("thinking"), str, f"{path}.thinking", "a valid string"))
    if kind == "redacted_thinking":
        return None  # opaque to a local model; signatures are never checked
    tags = ", ".join(repr(t) for t in ("text", *MEDIA_BLOCKS, "tool_use", "tool_result", "thinking",
                                        "redacted_thinking", *SERVER_BLOCKS))
    raise invalid(f"{path}.type: Input tag {kind!r} found using 'type' does not match any of the expected tags: {tags}")


# ---------------------------------------------------------------------------------------------------
# Blocks a text-only model reads as text
# ---------------------------------------------------------------------------------------------------

# A client keeps an image or PDF in its history (Claude Code's Read tool returns them inside tool
# results): refusing it would refuse every later request of the conversation. In its place the model
# reads a placeholder that says what was there, the same text every time so prefix reuse holds.
NOT_SHOWN = "not shown: the model serving this conversation reads text only"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# How each image type's bytes begin; the real API refuses data that does not match its media type.
IMAGE_MAGIC = {"image/jpeg": (b"\xff\xd8\xff",), "image/png": (b"\x89PNG\r\n\x1a\n",),
               "image/gif": (b"GIF87a", b"GIF89a"), "image/webp": (b"RIFF",)}


def _source(block, path, kind, types):
    source = _expect(block.get("source"), dict, f"{path}.source", "a valid dictionary")
    tag = source.get("type")
    if tag not in types:
        expected = ", ".join(repr(t) for t in types)
        raise invalid(f"{path}.{kind}.source: Input tag {tag!r} found using 'type' does not match any of the "
                      f"expected tags: {expected}")
    return source, tag, f"{path}.{kind}.source.{tag}"


def _base64(source, where):
    data = _expect(source.get("data"), str, f"{where}.data", "a valid string")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise invalid(f"{where}.data: invalid base64 data") from None


def _size(data):
    """
    >>> _size(b"x" * 1500), _size(b"x" * 3_500_000)
    ('1.5 KB', '3.5 MB')
    """
    return f"{len(data) / 1e6:.1f} MB" if len(data) >= 1e6 else f"{len(data) / 1e3:.1f} KB"


def _image_text(block, path):
    source, tag, where = _source(block, path, "image", ("base64", "url", "file"))
    if tag == "url":
        return f"[image at {_expect(source.get('url'), str, f'{where}.url', 'a valid string')}: {NOT_SHOWN}]"
    if tag == "file":
        return f"[image file {_expect(source.get('file_id'), str, f'{where}.file_id', 'a valid string')}: {NOT_SHOWN}]"
    media_type = source.get("media_type")
    if media_type not in IMAGE_TYPES:
        raise invalid(f"{where}.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'")
    data = _base64(source, where)
    if not data.startswith(IMAGE_MAGIC[media_type]) or (media_type == "image/webp" and data[8:12] != b"WEBP"):
        raise invalid(f"{where}.data: Image does not match the provided media type {media_type}")
    return f"[{media_type} image, {_size(data)}: {NOT_SHOWN}]"


def _document_text(block, path):
    """A plain-text document is its text (after its title); a PDF is a placeholder."""
    source, tag, where = _source(block, path, "document", ("base64", "text", "content", "url", "file"))
    title = _expect(block.get("title"), (str, type(None)), f"{path}.title", "a valid string")
    if tag == "text":
        if source.get("media_type") != "text/plain":
            raise invalid(f"{where}.media_type: Input should be 'text/plain'")
        text = _expect(source.get("data"), str, f"{where}.data", "a valid string")
    elif tag == "content":
        text = "\n\n".join(_texts_of_blocks(source.get("content"), f"{where}.content", media=True))
    else:
        named = f' "{title}"' if title else ""
        if tag == "base64":
            if source.get("media_type") != "application/pdf":
                raise invalid(f"{where}.media_type: Input should be 'application/pdf'")
            return f"[PDF document{named}, {_size(_base64(source, where))}: {NOT_SHOWN}]"
        field = "url" if tag == "url" else "file_id"
        return f"[PDF document{named} at {_expect(source.get(field), str, f'{where}.{field}', 'a valid string')}: {NOT_SHOWN}]"
    return f"{title}\n\n{text}" if title else text


def _search_result_text(block, path):
    title = _expect(block.get("title"), str, f"{path}.title", "a valid string")
    source = _expect(block.get("source"), str, f"{path}.source", "a valid string")
    return f"{title} ({source})\n\n" + "\n\n".join(_texts_of_blocks(block.get("content"), f"{path}.content"))


MEDIA_BLOCKS = {"image": _image_text, "document": _document_text, "search_result": _search_result_text}


def _json_text(value):
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _server_tool_use_text(block, path):
    """A call a server (Anthropic's web search, an MCP server) ran: what was asked, as text."""
    name = _expect(block.get("name"), str, f"{path}.name", "a valid string")
    server = block.get("server_name")
    return f"[called {server + '/' if isinstance(server, str) else ''}{name}: {_json_text(block.get('input', {}))}]"


def _web_search_result_text(block, path):
    content = block.get("content")
    if not isinstance(content, list):  # a web_search_tool_result_error
        return f"[web search failed: {_json_text(content)}]"
    lines = [f"- {r.get('title', '')} <{r.get('url', '')}>" for r in content if isinstance(r, dict)]
    return "[web search results:\n" + "\n".join(lines) + "]"


def _mcp_tool_result_text(block, path):
    error = " (error)" if block.get("is_error") is True else ""
    texts = _texts_of_blocks(block.get("content", ""), f"{path}.content")
    return f"[tool result{error}: " + "\n\n".join(texts) + "]"


# Blocks of server-run tools a client may echo back in its history; a container upload (a file handed
# to Anthropic's code execution) carries nothing a local model can read and is dropped.
SERVER_BLOCKS = {"server_tool_use": _server_tool_use_text, "web_search_tool_result": _web_search_result_text,
                 "mcp_tool_use": _server_tool_use_text, "mcp_tool_result": _mcp_tool_result_text,
                 "container_upload": lambda block, path: None}


def _parse_message(raw, path):
    _expect(raw, dict, path, "a valid dictionary")
    if "role" not in raw:
        raise invalid(f"{path}.role: Field required")
    role = raw["role"]
    if role not in ROLES:
        raise invalid(f"{path}.role: Input should be 'user' or 'assistant'")
    if "content" not in raw:
        raise invalid(f"{path}.content: Field required")
    content = raw["content"]
    if role == "system":
        return Message("system", (TextBlock(_text_of_blocks(content, f"{path}.content")),))
    if isinstance(content, str):
        return Message(role, (TextBlock(content),))
    _expect(content, list, f"{path}.content", "a valid string or list of blocks")
    blocks = (_parse_block(b, f"{path}.content.{i}", role) for i, b in enumerate(content))
    return Message(role, tuple(b for b in blocks if b is not None))


def _is_empty(message):
    return all(isinstance(b, TextBlock) and not b.text for b in message.content)


def join_turns(messages):
    """Consecutive turns of one role become one turn, as the real API does."""
    joined = []
    for message in messages:
        if joined and joined[-1].role == message.role and message.role != "system":
            joined[-1] = Message(message.role, joined[-1].content + message.content)
        else:
            joined.append(message)
    return tuple(joined)


def _check_tool_results(messages):
    """Each tool_result answers a tool_use of the assistant turn right before it."""
    previous_ids = set()
    for i, message in enumerate(messages):
        if message.role == "assistant":
            previous_ids = {b.id for b in message.content if isinstance(b, ToolUseBlock)}
        elif message.role == "user":
            for block in message.content:
                if isinstance(block, ToolResultBlock) and block.tool_use_id not in previous_ids:
                    raise invalid(f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` "
                                  f"blocks: {block.tool_use_id}. Each `tool_result` block must have a "
                                  "corresponding `tool_use` block in the previous message.")
            previous_ids = set()


def _parse_messages(raw):
    if raw is None:
        raise invalid("messages: Field required")
    _expect(raw, list, "messages", "a valid list")
    if not raw:
        raise invalid("messages: at least one message is required")
    parsed = [_parse_message(m, f"messages.{i}") for i, m in enumerate(raw)]
    for i, message in enumerate(parsed):
        final_assistant = i == len(parsed) - 1 and message.role == "assistant"
        if _is_empty(message) and not final_assistant and message.role != "system":
            raise invalid(f"messages.{i}: all messages must have non-empty content except for the "
                          "optional final assistant message")
    messages = join_turns(parsed)
    _check_tool_results(messages)
    last = messages[-1]
    if last.role == "assistant":
        text = "".join(b.text for b in last.content if isinstance(b, TextBlock))
        if text != text.rstrip():
            raise invalid("messages: final assistant content cannot end with trailing whitespace")
    return messages


def _parse_tools(raw):
    if raw is None:
        return ()
    _expect(raw, list, "tools", "a valid list")
    tools, seen = [], set()
    for i, tool in enumerate(raw):
        path = f"tools.{i}"
        _expect(tool, dict, path, "a valid dictionary")
        if tool.get("type") not in (None, "custom"):
            continue  # server tools (web search, code execution…) cannot run locally; the model never sees them
        name = _expect(tool.get("name"), str, f"{path}.name", "a valid string")
        if not TOOL_NAME.match(name):
            raise invalid(f"{path}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if name in seen:
            raise invalid(f"tools: Tool names must be unique, {name!r} appears more than once")
        seen.add(name)
        description = _expect(tool.get("description", ""), str, f"{path}.description", "a valid string")
        if "input_schema" not in tool:
            raise invalid(f"{path}.input_schema: Field required")
        schema = _expect(tool["input_schema"], dict, f"{path}.input_schema", "a valid dictionary")
        tools.append(Tool(name, description, schema))
    return tuple(tools)


def _parse_tool_choice(raw, tools):
    if raw is None:
        return ToolChoice()
    _expect(raw, dict, "tool_choice", "a valid dictionary")
    kind = raw.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    parallel_off = _expect(raw.get("disable_parallel_tool_use", False), bool,
                           "tool_choice.disable_parallel_tool_use", "a valid boolean")
    name = None
    if kind == "tool":
        name = _expect(raw.get("name"), str, "tool_choice.name", "a valid string")
        if name not in {t.name for t in tools}:
            raise invalid(f"tool_choice: Tool '{name}' not found in tools")
    if kind in ("any", "tool") and not tools:
        raise invalid(f"tool_choice: tool_choice of type '{kind}' requires tools to be set")
    return ToolChoice(kind, name, parallel_off)


def _parse_thinking(raw, max_tokens, count_only):
    """Returns (enabled, budget). `adaptive` lets the model think without a budget of its own."""
    if raw is None:
        return False, None
    _expect(raw, dict, "thinking", "a valid dictionary")
    kind = raw.get("type")
    if kind == "disabled":
        return False, None
    if kind == "adaptive":
        return True, None
    if kind != "enabled":
        raise invalid("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
    budget = _expect(raw.get("budget_tokens"), int, "thinking.budget_tokens", "a valid integer")
    if budget < 1024:
        raise invalid("thinking.budget_tokens: Input should be greater than or equal to 1024")
    if not count_only and budget >= max_tokens:
        raise invalid("`max_tokens` must be greater than `thinking.budget_tokens`")
    return True, budget


def _parse_json_schema(body):
    """Structured output: `output_config.format` (current) or `output_format` (the beta's first name)."""
    config = body.get("output_config")
    if config is not None:
        _expect(config, dict, "output_config", "a valid dictionary")
    fmt = (config or {}).get("format", body.get("output_format"))
    if fmt is None:
        return None
    _expect(fmt, dict, "output_config.format", "a valid dictionary")
    if fmt.get("type") != "json_schema":
        raise invalid("output_config.format.type: Input should be 'json_schema'")
    return _expect(fmt.get("schema"), dict, "output_config.format.schema", "a valid dictionary")


def _parse_stop_sequences(raw):
    if raw is None:
        return ()
    _expect(raw, list, "stop_sequences", "a valid list")
    for i, seq in enumerate(raw):
        _expect(seq, str, f"stop_sequences.{i}", "a valid string")
        if not seq.strip():
            raise invalid(f"stop_sequences.{i}: stop sequences must contain non-whitespace characters")
    return tuple(raw)


def parse_messages_request(body, count_only=False):
    """A decoded JSON body to a MessagesRequest, or ApiError(400) naming the first bad field.

    Fields a local model cannot use (`metadata`, `service_tier`, `context_management`, `container`,
    `cache_control` anywhere, unknown top-level keys) are accepted and ignored.
    """
    if "model" not in body:
        raise invalid("model: Field required")
    model = _expect(body["model"], str, "model", "a valid string")
    if not model:
        raise invalid("model: String should have at least 1 character")
    max_tokens = 0
    if not count_only:
        if "max_tokens" not in body:
            raise invalid("max_tokens: Field required")
        max_tokens = _expect(body["max_tokens"], int, "max_tokens", "a valid integer")
        if max_tokens < 1:
            raise invalid("max_tokens: Input should be greater than or equal to 1")
    system = _parse_system(body.get("system"))
    messages = _parse_messages(body.get("messages"))
    tools = _parse_tools(body.get("tools"))
    tool_choice = _parse_tool_choice(body.get("tool_choice"), tools)
    thinking, budget = _parse_thinking(body.get("thinking"), max_tokens, count_only)
    if thinking and tool_choice.type in ("any", "tool"):
        raise invalid("Thinking may not be enabled when tool_choice forces tool use.")
    top_k = body.get("top_k")
    if top_k is not None and _expect(top_k, int, "top_k", "a valid integer") < 0:
        raise invalid("top_k: Input should be greater than or equal to 0")
    metadata = body.get("metadata")
    if metadata is not None:
        _expect(metadata, dict, "metadata", "a valid dictionary")
        if metadata.get("user_id") is not None:
            _expect(metadata["user_id"], str, "metadata.user_id", "a valid string")
    stream = body.get("stream")
    if stream is not None and not count_only:
        _expect(stream, bool, "stream", "a valid boolean")
    return MessagesRequest(
        model=model, messages=messages, max_tokens=max_tokens, system=system,
        stop_sequences=_parse_stop_sequences(body.get("stop_sequences")),
        temperature=_number(body, "temperature", 0.0, 1.0), top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=top_k, stream=bool(stream) and not count_only, tools=tools, tool_choice=tool_choice,
        thinking=thinking, thinking_budget=budget, json_schema=_parse_json_schema(body))


# ---------------------------------------------------------------------------------------------------
# Engine output → message JSON and SSE frames
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ThinkingDelta:
    """A piece of the model's reasoning, shown as a thinking block."""
    thinking: str


@dataclass(frozen=True)
class ToolUseStart:
    """The model opened a tool call; a tool_use block with this name begins."""
    name: str


@dataclass(frozen=True)
class ToolInputDelta:
    """A piece of the call's input JSON; the pieces of one call concatenate to a JSON object."""
    partial_json: str


@dataclass(frozen=True)
class Finish:
    stop_reason: str
    stop_sequence: str
    input_tokens: int
    cache_read_input_tokens: int
    output_tokens: int


def usage(input_tokens, output_tokens, cache_read=0):
    return {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cache_read, "output_tokens": output_tokens}


def sse_frame(data):
    """One SSE event; SDKs dispatch on the `event:` line, so it always equals the JSON `type`."""
    return b"event: " + data["type"].encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


EMPTY_BLOCKS = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""},
                "tool_use": None}
EMPTY_DELTAS = {"text": {"type": "text_delta", "text": ""}, "thinking": {"type": "thinking_delta", "thinking": ""},
                "tool_use": {"type": "input_json_delta", "partial_json": ""}}
DELTA_FIELDS = {"text": "text", "thinking": "thinking", "tool_use": "partial_json"}


def thinking_signature(thinking):
    """Clients echo signatures back and this server never checks them; a digest of the reasoning
    keeps the same reasoning signed the same way."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


class MessageAssembler:
    """The single owner of the content-block grammar.

    Engine events go in; the SSE event dicts they cause come out, and the finished message is kept
    alongside, so the streamed and the non-streamed answer are built by the same code. At most one
    block is open; indices count up from 0; every block that opens is closed before message_delta;
    a thinking block gets its signature_delta right before it closes.
    """

    def __init__(self, message_id, model, input_tokens):
        self.message = {"id": message_id, "type": "message", "role": "assistant", "model": model,
                        "content": [], "stop_reason": None, "stop_sequence": None,
                        "usage": usage(input_tokens, 0)}
        self._open = None

    def start(self):
        return [{"type": "message_start", "message": {**self.message, "content": [],
                                                      "usage": {**self.message["usage"], "output_tokens": 1}}}]

    def feed(self, event):
        if isinstance(event, TextDelta):
            return self._delta("text", event.text) if event.text else []
        if isinstance(event, ThinkingDelta):
            return self._delta("thinking", event.thinking) if event.thinking else []
        if isinstance(event, ToolUseStart):
            self._input_json = ""
            return self._close() + self._open_block(
                "tool_use", {"type": "tool_use", "id": new_id("toolu_"), "name": event.name, "input": {}})
        if isinstance(event, ToolInputDelta):
            if self._open != "tool_use":
                raise ValueError("input_json_delta outside a tool_use block")
            return self._delta("tool_use", event.partial_json)
        if isinstance(event, Finish):
            return self._finish(event)
        raise TypeError(f"unknown engine event {event!r}")

    def keepalive(self, prefer):
        """An empty delta, opening a `prefer` ("text" or "thinking") block if none is open: Claude
        Code aborts a stream that carries no content delta for 300 s, pings or not, and a long prompt
        evaluation can take longer than that (CLAUDE_CODE_TRAFFIC.md §5)."""
        kind = self._open or prefer
        events = [] if self._open else self._open_block(kind, EMPTY_BLOCKS[kind])
        index = len(self.message["content"]) - 1
        return events + [{"type": "content_block_delta", "index": index, "delta": {**EMPTY_DELTAS[kind]}}]

    def _delta(self, kind, piece):
        events = [] if self._open == kind else self._close() + self._open_block(kind, EMPTY_BLOCKS[kind])
        block = self.message["content"][-1]
        if kind == "tool_use":
            self._input_json += piece
        else:
            block[kind] += piece
        delta = {**EMPTY_DELTAS[kind], DELTA_FIELDS[kind]: piece}
        return events + [{"type": "content_block_delta", "index": len(self.message["content"]) - 1,
                          "delta": delta}]

    def _open_block(self, kind, block):
        self._open = kind
        self.message["content"].append(dict(block))
        return [{"type": "content_block_start", "index": len(self.message["content"]) - 1,
                 "content_block": dict(block)}]

    def _close(self):
        if self._open is None:
            return []
        index = len(self.message["content"]) - 1
        block = self.message["content"][-1]
        events = []
        if self._open == "tool_use":
            block["input"] = json.loads(self._input_json) if self._input_json else {}
        elif self._open == "thinking":
            block["signature"] = thinking_signature(block["thinking"])
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": block["signature"]}})
        self._open = None
        return events + [{"type": "content_block_stop", "index": index}]

    def _finish(self, finish):
        events = self._close()
        if not self.message["content"]:
            # An empty reply still has one (empty) text block, so `content[0].text` works in clients.
            events += self._open_block("text", EMPTY_BLOCKS["text"]) + self._close()
        self.message["stop_reason"] = finish.stop_reason
        self.message["stop_sequence"] = finish.stop_sequence
        self.message["usage"] = usage(finish.input_tokens, finish.output_tokens, finish.cache_read_input_tokens)
        events.append({"type": "message_delta",
                       "delta": {"stop_reason": finish.stop_reason, "stop_sequence": finish.stop_sequence},
                       "usage": dict(self.message["usage"])})
        events.append({"type": "message_stop"})
        return events
