"""A request rendered as prompt text with the model's own chat template.

Contract: `ChatTemplate` takes a GGUF's Jinja chat template (or, for a GGUF without one, plain
labelled turns) and renders a validated `protocol.MessagesRequest` to the exact text the model
reads: system prompt, history, tools, earlier calls and results in the template's own convention
(or our generic one where the template has none), the start of the assistant's turn and any
prefill. The same request always renders to the same text, so a conversation's next turn extends
its last one. Templates run sandboxed; what a template refuses to render is an `ApiError(400)`.
It never tokenizes, loads a model or touches I/O; `detect_reasoning` and `tool_calls.detect_format`
read from the template source how the model writes reasoning and calls.
"""

import datetime
import json

import jinja2
import jinja2.sandbox

from protocol import ApiError, TextBlock, ThinkingBlock, ToolResultBlock, ToolUseBlock, join_turns
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

GENERIC_TOOL_PREAMBLE = (
    "You can call these tools. To call one, reply with a line of the form\n"
    "<tool_call>{\"name\": \"TOOL_NAME\", \"input\": {...}}</tool_call>\n"
    "and nothing after it; the result comes back in the next user turn.\n\nTools:\n")


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    # Hugging Face templates expect this signature and no HTML escaping (jinja2's own escapes '<').
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


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
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           undefined=jinja2.ChainableUndefined)
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        self._template = env.from_string(source or FALLBACK_TEMPLATE)
        self._bos, self._eos = bos_token, eos_token
        self.end_strings = () if source else FALLBACK_END_STRINGS
        self.native_tools = template_supports_tools(source)
        self.tool_format = detect_format(source) if self.native_tools else GENERIC
        self.reasoning = detect_reasoning(source)

    def render(self, request):
        """The prompt text for a request: its history, then the start of the assistant's turn, then
        any prefill. The same request always renders to the same text."""
        last_is_prefill = request.messages[-1].role == "assistant"
        history = request.messages[:-1] if last_is_prefill else request.messages
        offered = request.tools if request.tool_choice.type != "none" else ()
        opening, history = _split_opening_system(history)
        system = "\n\n".join(text for text in (*opening, request.system) if text)
        system = system if self.native_tools else _generic_system_text(system, offered)
        turns = [{"role": "system", "content": system}] if system else []
        for message in history:
            turns += _native_turns(message) if self.native_tools else [
                {"role": message.role, "content": _generic_content_text(message.content)}]
        tools = [_tool_json(t) for t in offered] if self.native_tools and offered else None
        try:
            text = self._render(turns, tools, request.thinking)
        except jinja2.TemplateError:
            # Templates that allow a system turn only first (or strict alternation) get mid-conversation
            # system messages folded into a neighbouring user turn.
            try:
                text = self._render(_fold_system_turns(turns), tools, request.thinking)
            except jinja2.TemplateError as exc:  # the conversation, not the server, is what it refuses
                raise ApiError(400, "invalid_request_error",
                               f"the model's chat template cannot render this conversation: {exc}") from None
        return text + request.prefill

    def _render(self, turns, tools, thinking):
        # enable_thinking: the switch of Qwen 3 style templates; others ignore it
        return self._template.render(messages=turns, tools=tools, add_generation_prompt=True,
                                     enable_thinking=thinking, bos_token=self._bos, eos_token=self._eos)


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


def _generic_system_text(system, tools):
    """The system prompt, with tool descriptions first so that a new conversation with the same tools
    shares the longest possible prefix with the last one."""
    if not tools:
        return system
    lines = [json.dumps({"name": t.name, "description": t.description, "input_schema": t.input_schema},
                        ensure_ascii=False) for t in tools]
    return GENERIC_TOOL_PREAMBLE + "\n".join(lines) + ("\n\n" + system if system else "")


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
