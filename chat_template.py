"""A request rendered as prompt text with the model's own chat template.

Contract: `ChatTemplate` takes a GGUF's Jinja chat template (or, for a GGUF without one, plain
labelled turns) and renders a validated `protocol.MessagesRequest` to the exact text the model
reads: system prompt, history, tools, earlier calls and results in the template's own convention
(or our generic one where the template has none), the start of the assistant's turn and any
prefill. The same request always renders to the same text, so a conversation's next turn extends
its last one. Templates are third-party code: they run sandboxed (no attribute outside the data we
pass), get the Jinja extensions and conventions real templates are written against (Hugging Face's
`apply_chat_template`), and where one refuses a conversation the conversation is fitted to its
rules (system text folded into a user turn, roles made to alternate, call arguments as strings)
before it is refused with an `ApiError(400)`. A template that does not compile, or cannot render a
plain question, is logged and replaced by plain labelled turns: the server always starts and
answers. One request's rendering stops at RENDER_SECONDS with an `ApiError(400)`. It never
tokenizes, loads a model or touches I/O; `detect_reasoning` and `tool_calls.detect_format` read from
the template source how the model writes reasoning and calls.
"""

import collections.abc
import copy
import datetime
import hashlib
import json
import logging
import threading
import time

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from protocol import ApiError, TextBlock, ThinkingBlock, ToolResultBlock, ToolUseBlock, join_turns, \
    parse_messages_request
from reply_reader import HARMONY_CHANNELS, THINK_TAGS
from tool_calls import GENERIC, detect_format, format_call, template_supports_tools

# Used when a GGUF carries no chat template (base models such as Gemma 3 270M): plain labelled turns.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n\n"
    "{% else %}Assistant: {{ m.content }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
FALLBACK_END_STRINGS = ("\nUser:",)

log = logging.getLogger("llama-compat")

# Seconds one request's rendering may take (every fit tried included): a template is third-party code,
# and nested loops can run for hours. Real templates render a long Claude Code conversation in
# milliseconds.
RENDER_SECONDS = 10
# What a template must render at start, or it is replaced by plain labelled turns: a template that
# cannot render a plain question would refuse every request.
PROBE = parse_messages_request({"model": "probe", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})

GENERIC_TOOL_PREAMBLE = (
    "You can call these tools. To call one, reply with a line of the form\n"
    "<tool_call>{\"name\": \"TOOL_NAME\", \"input\": {...}}</tool_call>\n"
    "and nothing after it; the result comes back in the next user turn.\n\nTools:\n")


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    # Hugging Face templates call it with these keywords and expect no HTML escaping (jinja2's own
    # escapes '<').
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=separators, default=_json_default)


def _json_default(value):
    """What templates hand `tojson` besides plain data: an undefined value, a generator or map
    (`messages | map(...)`)."""
    if isinstance(value, jinja2.Undefined):
        return None
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{type(value).__name__} is not JSON serializable") from None


class _RenderTimeout(Exception):
    pass


_deadline = threading.local()  # each request renders in its own thread


def _check_deadline():
    if time.monotonic() > _deadline.at:
        raise _RenderTimeout


class _TimedSandbox(jinja2.sandbox.SandboxedEnvironment):
    """The sandbox, checking the render's deadline at every call, attribute and item lookup, and every
    1,024 steps of a `range`: a template loops only over those and over the data we pass."""

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_deadline()
        return super().getitem(obj, argument)


class _TimedRange(collections.abc.Sequence):
    """`range` for templates: the sandbox's size limit, and the deadline checked as it is iterated."""

    def __init__(self, *args):
        self._range = jinja2.sandbox.safe_range(*args)

    def __len__(self):
        return len(self._range)

    def __getitem__(self, index):
        return self._range[index]

    def __iter__(self):
        for i, value in enumerate(self._range):
            if not i % 1024:
                _check_deadline()
            yield value


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks the assistant's part for training masks
    (transformers' `return_assistant_tokens_mask`); for rendering it is its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def detect_reasoning(template_source):
    """The reasoning format a chat template teaches its model, or None when it teaches none.

    >>> detect_reasoning("{{ '<|start|>assistant<|channel|>analysis<|message|>' }}") is HARMONY_CHANNELS
    True
    """
    source = template_source or ""
    if "<|channel|>" in source and "analysis" in source:
        return HARMONY_CHANNELS
    return THINK_TAGS if THINK_TAGS.open in source else None


class ChatTemplate:
    """The GGUF's own Jinja chat template (sandboxed), or the labelled-turns fallback.

    A template that takes `tools` gets them, and earlier calls and results, in its own format
    (`tool_calls` on assistant turns, `tool` turns for results); any other template gets the tools
    described in the system text with our generic calling convention, and history written in it.
    """

    def __init__(self, source, bos_token, eos_token):
        # not the immutable sandbox: real templates append to lists and set keys on dicts they build
        # (Kimi K2); attribute access stays limited to the data we pass
        env = _TimedSandbox(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined,
                            extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, range=_TimedRange,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        self._bos, self._eos = bos_token, eos_token
        try:
            self._template = env.from_string(source or FALLBACK_TEMPLATE)
        except Exception as exc:  # a template is third-party code: whatever it does wrong, we start
            log.warning("the model's chat template does not compile (%s); using plain labelled turns", exc)
            self._template, source = env.from_string(FALLBACK_TEMPLATE), None
        self._setup(source)
        if source:
            try:
                self.render(PROBE)
            except ApiError as exc:
                log.warning("the model's chat template cannot render a plain question (%s); using plain "
                            "labelled turns", exc.message)
                self._template = env.from_string(FALLBACK_TEMPLATE)
                self._setup(None)

    def _setup(self, source):
        self.end_strings = () if source else FALLBACK_END_STRINGS
        self.native_tools = template_supports_tools(source)  # it renders the tool list itself
        self.tool_format = detect_format(source)
        # a template that writes earlier calls in a known format but takes no tool list (DeepSeek
        # V3.1, the R1 distills) renders the history itself; the tools go into the system text
        self.native_calls = self.native_tools or self.tool_format is not GENERIC
        self.reasoning = detect_reasoning(source)
        # what a user needs to know about how their model is read: logged at start, and in the
        # model's entry of GET /v1/models
        self.facts = {
            "chat_template": "gguf" if source else "plain labelled turns",
            "tool_calls": self.tool_format.name + (" (the template's own)" if self.native_calls else " (ours)"),
            "reasoning": f"{self.reasoning.open}…{self.reasoning.close}" if self.reasoning else None}
        self.summary = "; ".join((
            "the GGUF's own template" if source else "plain labelled turns (no usable template in the GGUF)",
            f"tool calls: {self.facts['tool_calls']}",
            f"reasoning: {self.facts['reasoning']}" if self.reasoning else "no reasoning section"))

    def render(self, request):
        """The prompt text for a request: its history, then the start of the assistant's turn, then
        any prefill. The same request always renders to the same text."""
        last_is_prefill = request.messages[-1].role == "assistant"
        history = request.messages[:-1] if last_is_prefill else request.messages
        offered = request.tools if request.tool_choice.type != "none" else ()
        opening, history = _split_opening_system(history)
        system = "\n\n".join(text for text in (*opening, request.system) if text)
        system = system if self.native_tools else _system_with_tools(system, offered, self.tool_format)
        turns = [{"role": "system", "content": system}] if system else []
        for message in history:
            turns += _native_turns(message) if self.native_calls else [
                {"role": message.role, "content": _generic_content_text(message.content)}]
        tools = [_tool_json(t) for t in offered] if self.native_tools and offered else None
        refusal = None
        _deadline.at = time.monotonic() + RENDER_SECONDS
        for fit in FITS:
            turns, tools = fit(turns, tools)  # each fit adds its change to those before it
            try:  # a copy each time: templates may append to and set what they are given
                text = self._render(copy.deepcopy(turns), tools if tools is ABSENT else copy.deepcopy(tools),
                                    request.thinking)
            except _RenderTimeout:
                raise ApiError(400, "invalid_request_error", f"the model's chat template did not finish "
                               f"rendering this conversation within {RENDER_SECONDS} s") from None
            except Exception as exc:  # the template's own code refused (raise_exception or a failure)
                refusal = refusal or exc
                continue
            return text + request.prefill
        # the conversation, not the server, is what it refuses
        raise ApiError(400, "invalid_request_error",
                       f"the model's chat template cannot render this conversation: {refusal}") from None

    def _render(self, turns, tools, thinking):
        # enable_thinking: the switch of Qwen 3 style templates; others ignore it. `tools` is passed
        # only when there are tools or a fit says None (Hugging Face passes None, and templates
        # written for tool use only fail on it)
        extra = {} if tools is ABSENT else {"tools": tools}
        return self._template.render(messages=turns, add_generation_prompt=True, enable_thinking=thinking,
                                     bos_token=self._bos, eos_token=self._eos, **extra)


def _split_opening_system(messages):
    """System messages sent before the model's first turn go with the system prompt, before it:
    they are context for the whole conversation, and Claude Code's agent list (~1,500 tokens, the
    same in every conversation) arrives that way right after the first user message, so rendered in
    place it would be evaluated anew, deep in the context, for every new conversation; and before the
    system prompt, which names the working folder, it is shared by conversations in other folders too.
    Returns (their texts, the other messages); later system messages stay where they are, and so do
    all of them when no user message would be left to render."""
    first_reply = next((i for i, m in enumerate(messages) if m.role == "assistant"), len(messages))
    opening = [m.content[0].text for m in messages[:first_reply] if m.role == "system"]
    # user messages that only a system message kept apart become one turn, as the API joins them
    rest = join_turns([m for i, m in enumerate(messages) if i >= first_reply or m.role != "system"])
    if not any(m.role == "user" for m in rest):
        return [], list(messages)
    return opening, rest


def _tool_json(tool):
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.input_schema}}


def _native_turns(message):
    """One message as Hugging Face chat turns: calls as `tool_calls`, each result as a `tool` turn."""
    text = "\n\n".join(b.text for b in message.content if isinstance(b, TextBlock) and b.text)
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
             for b in message.content if isinstance(b, ToolUseBlock)]
    results = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.content}
               for b in message.content if isinstance(b, ToolResultBlock)]
    turn = {"role": message.role, "content": text}
    reasoning = "\n\n".join(b.thinking for b in message.content if isinstance(b, ThinkingBlock) and b.thinking)
    if reasoning:
        turn["reasoning_content"] = reasoning  # Qwen 3's name; templates without it ignore it
        # gpt-oss's name. Its template has one analysis message before a call and refuses a call turn
        # with both content and thinking; it shows the content there instead.
        if not (calls and text):
            turn["thinking"] = reasoning
    if calls:
        turn["tool_calls"] = calls
    return results + ([turn] if text or calls or not results else [])


def _system_with_tools(system, tools, fmt):
    """The system prompt, with tool descriptions first so that a new conversation with the same tools
    shares the longest possible prefix with the last one; how to call them is shown in `fmt`, the
    model's own format where the template teaches one, else our generic one."""
    if not tools:
        return system
    lines = [json.dumps({"name": t.name, "description": t.description, "input_schema": t.input_schema},
                        ensure_ascii=False) for t in tools]
    preamble = GENERIC_TOOL_PREAMBLE if fmt is GENERIC else (
        "You can call these tools. To call one, reply with\n" + format_call(fmt, "TOOL_NAME", {"ARGUMENT": "VALUE"})
        + "\nand nothing after it; the result comes back in the next turn.\n\nTools:\n")
    return preamble + "\n".join(lines) + ("\n\n" + system if system else "")


def _generic_content_text(blocks):
    parts = []
    for block in blocks:
        if isinstance(block, TextBlock):
            if block.text:
                parts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            parts.append(format_call(GENERIC, block.name, block.input))
        elif isinstance(block, ToolResultBlock):
            status = ' is_error="true"' if block.is_error else ""
            parts.append(f'<tool_result id="{block.tool_use_id}"{status}>{block.content}</tool_result>')
        elif isinstance(block, ThinkingBlock):
            continue  # earlier reasoning is not shown to a template without a place for it
    return "\n\n".join(parts)


def _fold_system_turns(turns):
    """Each system turn after the first joins the user turn just before it, or else the next one, so
    it never crosses an assistant turn and the next request's rendering keeps this one as its prefix."""
    folded, pending = [], []
    for i, turn in enumerate(turns):
        if turn["role"] == "system" and i > 0:
            if folded and folded[-1]["role"] == "user" and not pending:
                folded[-1] = {"role": "user", "content": folded[-1]["content"] + "\n\n" + turn["content"]}
            else:
                pending.append(turn["content"])
        elif pending and turn["role"] == "user":
            folded.append({"role": "user", "content": "\n\n".join(pending + [turn["content"]])})
            pending = []
        else:
            folded.append(turn)
    if pending:
        folded.append({"role": "user", "content": "\n\n".join(pending)})
    return folded


ABSENT = object()  # `tools` left undefined in the template's context


def _as_given(turns, tools):
    return turns, tools


def _tools_absent_when_none(turns, tools):
    """Mid-conversation system turns folded into user turns (templates that allow a system turn only
    first), and no `tools` variable at all when there are none."""
    return _fold_system_turns(turns), ABSENT if tools is None else tools


def _strict_roles(turns, tools):
    """For templates with no system role (Gemma 2) or strict alternation (Mistral): the system text
    opens the first user turn, user text right after tool results joins the last result, and
    adjacent turns of one role become one."""
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
        at = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
        if at is None:
            turns = [{"role": "user", "content": system}] + turns
        else:
            turns = turns[:at] + [{**turns[at], "content": system + "\n\n" + turns[at]["content"]}] + turns[at + 1:]
    merged = []
    for turn in turns:
        last = merged[-1] if merged else None
        if last and turn["role"] == "user" and last["role"] == "tool" and turn["content"]:
            merged[-1] = {**last, "content": last["content"] + "\n\n" + turn["content"]}
        elif last and turn["role"] == last["role"] and turn["role"] in ("user", "assistant"):
            joined = {**last, "content": "\n\n".join(c for c in (last["content"], turn["content"]) if c)}
            calls = last.get("tool_calls", []) + turn.get("tool_calls", [])
            merged[-1] = {**joined, "tool_calls": calls} if calls else joined
        else:
            merged.append(turn)
    return merged, tools


def _short_call_ids(turns, tools):
    """For templates that demand call ids of nine letters and digits (Mistral): each id replaced by
    the same nine hex digits of its hash wherever it appears, so every turn maps it alike."""
    def short(call_id):
        return hashlib.sha256(call_id.encode()).hexdigest()[:9]
    turns = [{**t, "tool_calls": [{**c, "id": short(c["id"])} for c in t["tool_calls"]]} if t.get("tool_calls")
             else {**t, "tool_call_id": short(t["tool_call_id"])} if t["role"] == "tool" else t for t in turns]
    return turns, tools


def _arguments_as_strings(turns, tools):
    """For templates that concatenate a call's arguments as text (functionary): JSON strings, and
    each tool's fields also at the top level of its entry, where some templates read them."""
    turns = [{**t, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"], ensure_ascii=False)}} for c in t["tool_calls"]]} if t.get("tool_calls") else t
             for t in turns]
    if tools not in (None, ABSENT):
        tools = [{**tool, **tool["function"]} for tool in tools]
    return turns, tools


# How a conversation is fitted to a template that refuses it, most faithful first; each is applied
# on top of those before it. Each request starts from the first: history only grows, so what made
# one turn need a fit holds for the next turns too, and they still extend it.
FITS = (_as_given, _tools_absent_when_none, _strict_roles, _short_call_ids, _arguments_as_strings)
