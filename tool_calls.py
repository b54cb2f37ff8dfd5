"""Tool calls in the text a local model generates, and grammars that make it write them well-formed.

Contract: `CallParser` turns a model's raw text, fed in pieces of any size, into `protocol` events
(`TextDelta`, `ToolUseStart`, `ToolInputDelta`) for the call formats local models are trained on
(`ToolFormat`: hermes, llama3, mistral, harmony, DeepSeek V3 and R1, Kimi K2, Granite 3, Phi-4-mini,
Nemotron, functionary v3.1, Command-R and R7B, Apertus, and our own generic one); `call_grammar`,
`lazy_call_grammar`, `rest_of_call_grammar` and `json_grammar` build llama.cpp GBNF that forces one
call (or a whole JSON reply) to be well-formed; `format_call` writes a call as a model would. It
never loads a model, touches a socket or HTTP, or raises on anything a model writes.

The parser's guarantees, exactly:
1. `ToolUseStart(name)` is emitted only when `name` is one of `tool_names` and everything from the
   open marker up to the `{` that opens the arguments matched the format or one of its variants.
   Until then nothing about the call is emitted; if it stops matching, or generation ends first, its
   raw text comes out as `TextDelta` character for character, and scanning resumes one character
   past where it began.
2. The `ToolInputDelta`s after a `ToolUseStart` concatenate to a JSON text that strict `json.loads`
   reads as a dict: the exact text of the arguments as it arrives (raw control characters inside
   strings are escaped), where keys, commas, colons, numbers, literals and escapes wait until they
   are complete and a value follows. Arguments that break off (malformed, deeper than
   `protocol.MAX_JSON_DEPTH`, or cut by `finish()`) are closed on what was valid so far (an open
   string and open brackets get closed) and everything after is dropped (`done` turns true).
3. When no call is emitted, the `TextDelta`s concatenate to exactly the text fed. Whitespace between
   text and a call, and between calls, is dropped, so it never becomes a text block of its own; so
   is a close marker that generation ends inside, after a complete call.
4. With `parallel=False`, everything after the first complete call is dropped.
"""

import copy
import json
import re
from dataclasses import dataclass

from llama_cpp.llama_grammar import SchemaConverter

from protocol import MAX_JSON_DEPTH, TextDelta, ToolInputDelta, ToolUseStart

FORMAT_NAMES = ("hermes", "llama3", "mistral", "harmony", "deepseek-v3", "deepseek-r1", "kimi-k2", "granite",
                "phi-4-mini", "nemotron", "functionary-v3.1", "command-r", "command-r7b", "apertus", "generic")
# protocol.TOOL_NAME allows 128 characters, so a longer run of name characters names no tool.
MAX_NAME_CHARS = 128
# Python refuses to parse integers of more than 4300 digits (sys.int_info), so json.loads would fail
# on arguments already streamed; no tool argument needs a number or literal this long.
MAX_SCALAR_CHARS = 1000
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
SPACE = " \t\r\n"  # JSON's whitespace, and what is dropped around calls
SCALAR_CHARS = frozenset("0123456789+-.eEtrufalsn")
SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
HEX = frozenset("0123456789abcdefABCDEF")

# ---------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------

# A step pattern is a tuple of steps matched in order: a string matches itself (after optional JSON
# whitespace when it starts with a space), NAME matches a run of name characters that is one of the
# tools' names, and DIGITS a run of 1 to MAX_INDEX_DIGITS digits (a call's index in its list).
# Patterns are how the parser reads the text around a call's arguments.
NAME = None
DIGITS = 0
MAX_INDEX_DIGITS = 4
ARGS_OPEN = " {"  # every call's arguments are one JSON object


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes a call: `format_call` joins open_marker, name_prefix, the
    name, args_prefix, the arguments' JSON, args_suffix and close_marker; `heads` and `after` are
    the step patterns the parser accepts after the open marker and after the arguments. `variants`
    are other ways the same models open a call, each with its own open marker and heads; the parser
    and `lazy_call_grammar` take them too, and the format's own `after` follows them."""

    name: str
    open_marker: str  # begins a call in free generation
    name_prefix: str
    args_prefix: str
    args_suffix: str
    close_marker: str
    args_key: str  # the key holding the arguments ("" when no fixed key does)
    heads: tuple  # alternatives from the open marker up to the arguments
    after: tuple  # alternatives after a call: its close, or (with NAME) the next call of a list
    lead_ins: tuple = ()  # text dropped when it comes right before the open marker
    close_ends_generation: bool = False  # close_marker is an end-of-generation token: grammars stop before it
    variants: tuple = ()  # more ToolFormats the same models write

    def __post_init__(self):
        if self.name not in FORMAT_NAMES:
            raise ValueError(f"unknown tool-call format {self.name!r}")

    def literals(self):
        """Every fixed text of the format and its variants, as a tuple."""
        steps = (step.lstrip(" ") for pattern in self.heads + self.after for step in pattern if isinstance(step, str))
        own = (self.open_marker, self.name_prefix, self.args_prefix, self.args_suffix, self.close_marker,
               *self.lead_ins, *steps)
        return tuple(dict.fromkeys(text for text in own if text)) + sum((v.literals() for v in self.variants), ())


def _json_head(key, name_key="name"):
    return (" {", f' "{name_key}"', " :", ' "', NAME, '"', " ,", f' "{key}"', " :")


HERMES = ToolFormat("hermes", "<tool_call>", '\n{"name": "', '", "arguments": ', "}", "\n</tool_call>",
                    "arguments", heads=(_json_head("arguments"),), after=((" </tool_call>",),))
# Small models told about "input" sometimes write "arguments" anyway; both are read.
GENERIC = ToolFormat("generic", "<tool_call>", '{"name": "', '", "input": ', "}", "</tool_call>", "input",
                     heads=(_json_head("input"), _json_head("arguments")), after=((" </tool_call>",),))
# Llama 3.1/3.2 templates ask for "parameters"; the models write "arguments" often enough to read both.
# Their open marker is the call's own start, `{"name"`, so their heads go on from there.
LLAMA3 = ToolFormat("llama3", '{"name"', ': "', '", "parameters": ', "}", "", "parameters",
                    heads=(_json_head("parameters")[2:], _json_head("arguments")[2:]), after=((" ;",),),
                    lead_ins=("<|python_tag|>",))
_MISTRAL_HEADS = ((" [",) + _json_head("arguments"), (NAME, "[ARGS]"))
_MISTRAL_AFTER = ((" ,",) + _json_head("arguments"), (" ]",))
# Older Mistral templates write a JSON list of calls; newer ones (with [ARGS]) write name[ARGS]{...}.
# Both parse either way; the two differ in what format_call and the grammars write.
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", '[{"name": "', '", "arguments": ', "}", "]", "arguments",
                     heads=_MISTRAL_HEADS, after=_MISTRAL_AFTER)
MISTRAL_ARGS = ToolFormat("mistral", "[TOOL_CALLS]", "", "[ARGS]", "", "", "arguments",
                          heads=_MISTRAL_HEADS, after=_MISTRAL_AFTER)
# gpt-oss may also name the recipient before the channel, as its own chat template writes earlier
# calls: `<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>`. Its generation
# prompt ends with `<|start|>assistant`, so such a call may begin with ` to=functions.`. The content
# type may be `<|constrain|>json` or missing, and a missing one leaves `<|channel|>commentary<|message|>`,
# which engine.HARMONY_CHANNELS drops as a header: then the name comes right before the arguments.
HARMONY_RECIPIENT_FIRST = ToolFormat(
    "harmony", " to=functions.", "", "<|channel|>commentary json<|message|>", "", "<|call|>", "",
    heads=((NAME, "<|channel|>commentary", " json", " <|message|>"),
           (NAME, "<|channel|>commentary", " <|constrain|>json", " <|message|>"),
           (NAME, "<|channel|>commentary", " <|message|>"), (NAME,)),
    after=((" <|call|>",),), lead_ins=("<|start|>assistant",), close_ends_generation=True)
# gpt-oss: `<|constrain|>json` may be missing, and `<|call|>` is an end-of-generation token.
HARMONY = ToolFormat("harmony", "<|channel|>commentary to=functions.", "", " <|constrain|>json<|message|>", "",
                     "<|call|>", "", heads=((NAME, " <|constrain|>json", " <|message|>"), (NAME, " <|message|>")),
                     after=((" <|call|>",),), lead_ins=("<|start|>assistant",), close_ends_generation=True,
                     variants=(HARMONY_RECIPIENT_FIRST,))

# DeepSeek V3.1 and later: `<｜tool▁calls▁begin｜>`, then per call `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{…}
# <｜tool▁call▁end｜>`, then `<｜tool▁calls▁end｜>`. DeepSeek-R1 (and its distills) put the call's type
# before the name and the arguments in a json code fence.
_DS_CALLS, _DS_CALL, _DS_SEP, _DS_CALL_END, _DS_CALLS_END = (
    "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")
DEEPSEEK_V3 = ToolFormat("deepseek-v3", _DS_CALLS, _DS_CALL, _DS_SEP, _DS_CALL_END, _DS_CALLS_END, "",
                         heads=((" " + _DS_CALL, NAME, _DS_SEP),),
                         after=((" " + _DS_CALL_END, " " + _DS_CALL, NAME, _DS_SEP),
                                (" " + _DS_CALL_END, " " + _DS_CALLS_END)))
DEEPSEEK_R1 = ToolFormat("deepseek-r1", _DS_CALLS, _DS_CALL + "function" + _DS_SEP, "\n```json\n",
                         "\n```" + _DS_CALL_END, _DS_CALLS_END, "",
                         heads=((" " + _DS_CALL, "function", _DS_SEP, NAME, " ```json"),),
                         after=((" ```", " " + _DS_CALL_END, " " + _DS_CALL, "function", _DS_SEP, NAME, " ```json"),
                                (" ```", " " + _DS_CALL_END, " " + _DS_CALLS_END)))


# Kimi K2: `<|tool_calls_section_begin|>`, then per call `<|tool_call_begin|>functions.NAME:INDEX
# <|tool_call_argument_begin|>{…}<|tool_call_end|>`, then `<|tool_calls_section_end|>`.
_KIMI_CALL, _KIMI_ARGS, _KIMI_CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
KIMI_K2 = ToolFormat("kimi-k2", "<|tool_calls_section_begin|>", _KIMI_CALL + "functions.", ":0" + _KIMI_ARGS,
                     _KIMI_CALL_END, "<|tool_calls_section_end|>", "",
                     heads=((" " + _KIMI_CALL, "functions.", NAME, ":", DIGITS, _KIMI_ARGS),),
                     after=((" " + _KIMI_CALL_END, " " + _KIMI_CALL, "functions.", NAME, ":", DIGITS, _KIMI_ARGS),
                            (" " + _KIMI_CALL_END, " <|tool_calls_section_end|>")))


# Granite 3.x: `<|tool_call|>`, then a JSON list of {"name", "arguments"} objects and nothing after it.
# Its models also write the objects without the list, as Ollama's Granite templates show earlier calls.
_NAME_ARGS = _json_head("arguments")
GRANITE = ToolFormat("granite", "<|tool_call|>", '[{"name": "', '", "arguments": ', "}", "]", "arguments",
                     heads=((" [",) + _NAME_ARGS, _NAME_ARGS), after=((" ,",) + _NAME_ARGS, (" ]",)))
# Phi-4-mini: the same, closed by `<|/tool_call|>`. The Berkeley function-calling leaderboard's Phi
# handler records that it often leaves that close out, and sometimes the list.
PHI4_MINI = ToolFormat("phi-4-mini", "<|tool_call|>", '[{"name": "', '", "arguments": ', "}", "]<|/tool_call|>",
                       "arguments", heads=GRANITE.heads,
                       after=((" ,",) + _NAME_ARGS, (" ]", " <|/tool_call|>"), (" <|/tool_call|>",)))
NEMOTRON = ToolFormat("nemotron", "<TOOLCALL>", '[{"name": "', '", "arguments": ', "}", "]</TOOLCALL>",
                      "arguments", heads=((" [",) + _NAME_ARGS,),
                      after=((" ,",) + _NAME_ARGS, (" ]", " </TOOLCALL>")))
# functionary v3.1: `<function=NAME>{…}</function>`, one after another.
FUNCTIONARY_V31 = ToolFormat("functionary-v3.1", "<function=", "", ">", "", "</function>", "",
                             heads=((NAME, ">"),), after=((" </function>",),))
# Command-R/R+: `Action:`, then a json code fence around a list of {"tool_name", "parameters"}.
# Command R7B and Cohere's later models: the list between `<|START_ACTION|>` and `<|END_ACTION|>`, each
# call numbered first by a "tool_call_id" (their instructions leave it out, so both are read).
_TOOL_PARAMS = _json_head("parameters", "tool_name")
COMMAND_R = ToolFormat("command-r", "Action:", '\n```json\n[{"tool_name": "', '", "parameters": ', "}",
                       "]\n```", "parameters", heads=((" ```json", " [") + _TOOL_PARAMS,),
                       after=((" ,",) + _TOOL_PARAMS, (" ]", " ```")))
_ID_TOOL_PARAMS = (" {", ' "tool_call_id"', " :", ' "', DIGITS, '"', " ,") + _TOOL_PARAMS[1:]
COMMAND_R7B = ToolFormat("command-r7b", "<|START_ACTION|>", '[{"tool_call_id": "0", "tool_name": "',
                         '", "parameters": ', "}", "]<|END_ACTION|>", "parameters",
                         heads=((" [",) + _ID_TOOL_PARAMS, (" [",) + _TOOL_PARAMS),
                         after=((" ,",) + _ID_TOOL_PARAMS, (" ,",) + _TOOL_PARAMS, (" ]", " <|END_ACTION|>")))
# Apertus: each call is an object whose one key is the tool's name: `[{"NAME": {…}}, …]`.
_NAME_KEY = (" {", ' "', NAME, '"', " :")
APERTUS = ToolFormat("apertus", "<|tools_prefix|>", '[{"', '": ', "}", "]<|tools_suffix|>", "",
                     heads=((" [",) + _NAME_KEY,), after=((" ,",) + _NAME_KEY, (" ]", " <|tools_suffix|>")))


# Text only one family's chat template contains; the first found names the format. Phi-4-mini's own
# template only wraps the tool list in `<|tool|>`…`<|/tool|>`; templates written for its calls show
# `<|tool_call|>`…`<|/tool_call|>`. R7B's template also says "Action:".
TEMPLATE_MARKERS = (("<tool_call>", HERMES), ("[ARGS]", MISTRAL_ARGS), ("[TOOL_CALLS]", MISTRAL),
                    ("<|channel|>", HARMONY), ("<function=", FUNCTIONARY_V31), ("<|python_tag|>", LLAMA3),
                    (_DS_CALLS, DEEPSEEK_V3), ("<|tool_calls_section_begin|>", KIMI_K2),
                    ("<|/tool_call|>", PHI4_MINI), ("<|tool|>", PHI4_MINI), ("<|tool_call|>", GRANITE),
                    ("<TOOLCALL>", NEMOTRON), ("<|START_ACTION|>", COMMAND_R7B), ("<|tools_prefix|>", APERTUS),
                    ("Action:", COMMAND_R))


def detect_format(template_source):
    """The call format a GGUF chat template teaches its model; GENERIC when it teaches none.

    >>> detect_format("{% if tools %}<tool_call>{% endif %}").name
    'hermes'
    """
    source = template_source or ""
    fmt = next((fmt for marker, fmt in TEMPLATE_MARKERS if marker in source), GENERIC)
    if fmt is DEEPSEEK_V3 and "```json" in source:
        return DEEPSEEK_R1
    # Qwen3-Coder-style templates (Seed-OSS) write `<function=NAME>` too, with each argument in a
    # `<parameter=…>` tag rather than a JSON object
    if fmt is FUNCTIONARY_V31 and "<parameter=" in source:
        return GENERIC
    # Llama 3.2's template has no python tag, only the ipython role and "parameters"
    return LLAMA3 if fmt is GENERIC and "ipython" in source and "parameters" in source else fmt


def template_supports_tools(template_source):
    """Whether a Jinja chat template uses a `tools` variable (in a tag, not in its plain text)."""
    tags = re.findall(r"\{[{%](.*?)[%}]\}", template_source or "", re.S)
    return any(re.search(r"\btools\b", tag) for tag in tags)


def format_call(fmt, name, arguments):
    """The text a model trained on `fmt` writes to call `name` with `arguments`.

    >>> format_call(HERMES, "get_weather", {"city": "Paris"})
    '<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>'
    """
    args = json.dumps(arguments, ensure_ascii=False)
    return fmt.open_marker + fmt.name_prefix + name + fmt.args_prefix + args + fmt.args_suffix + fmt.close_marker


# ---------------------------------------------------------------------------------------------------
# Scanning: step patterns and the arguments' JSON
# ---------------------------------------------------------------------------------------------------

def _step(state, ch, names):
    """The state (pattern, step index, characters matched in the step, name) after `ch`, or None."""
    steps, i, j, name = state
    while i < len(steps):
        step = steps[i]
        if step is DIGITS:
            if ch.isdigit() and ch.isascii() and j < MAX_INDEX_DIGITS:
                return steps, i, j + 1, name
            if not j:
                return None
            i, j = i + 1, 0
            continue
        if step is NAME:
            if ch in NAME_CHARS and len(name) < MAX_NAME_CHARS:
                return steps, i, 0, name + ch
            if name not in names:
                return None
            i += 1
            continue
        text = step.lstrip(" ")
        if j == 0 and text != step and ch in SPACE:
            return steps, i, 0, name
        if not text:  # a step of optional whitespace only, and it is over
            i += 1
            continue
        if ch != text[j]:
            return None
        return (steps, i + 1, 0, name) if j + 1 == len(text) else (steps, i, j + 1, name)
    return None


class _Malformed(Exception):
    """The arguments cannot continue with this character."""


class _JsonObject:
    """Checks one JSON object a character at a time and says which of its text is safe to emit.

    Safe text always ends after `{` or `[`, after a complete value, or after a complete character of a
    value string, so `closing()` can always complete it. Keys, commas, colons, whitespace, numbers,
    literals and escape sequences are held until they are complete and a value follows them.
    """

    def __init__(self):
        self._stack = []  # the closing bracket of each open container, innermost last
        self._state = "value"
        self._key = False  # the open string is a key (held back) rather than a value (streamed)
        self._held = ""
        self._token = ""  # the number, literal or escape sequence being read
        self.safe = ""  # safe text not yet taken
        self.done = False

    def feed(self, ch):
        """Raises _Malformed when `ch` cannot come next; safe text accumulates in `safe`."""
        getattr(self, "_in_" + self._state)(ch)

    def take(self):
        text, self.safe = self.safe, ""
        return text

    def closing(self):
        """What turns the safe text so far into a complete JSON text."""
        quote = '"' if self._state in ("string", "escape") and not self._key else ""
        return quote + "".join(reversed(self._stack))

    def _commit(self, text):
        self.safe += self._held + text
        self._held = ""

    def _hold(self, text):
        self._held += text

    def _in_value(self, ch):
        if not self._stack and ch != "{":  # the arguments themselves must be an object
            raise _Malformed
        if ch in SPACE:
            return self._hold(ch)
        if ch in "{[":
            if len(self._stack) >= MAX_JSON_DEPTH:
                raise _Malformed
            self._stack.append("}" if ch == "{" else "]")
            self._state = "first_key" if ch == "{" else "first_value"
            return self._commit(ch)
        if ch == '"':
            self._state, self._key = "string", False
            return self._commit(ch)
        self._state, self._token = "scalar", ""  # checked whole, once it ends
        self._in_scalar(ch)

    def _in_first_value(self, ch):
        return self._close(ch) if ch == "]" else self._in_value(ch)

    def _in_first_key(self, ch):
        return self._close(ch) if ch == "}" else self._in_key(ch)

    def _in_key(self, ch):
        self._key = True
        self._expect(ch, '"', "string")

    def _in_colon(self, ch):
        self._expect(ch, ":", "value")

    def _expect(self, ch, wanted, state):
        if ch not in SPACE and ch != wanted:
            raise _Malformed
        self._state = state if ch == wanted else self._state
        self._hold(ch)

    def _in_after(self, ch):
        if ch in SPACE:
            return self._hold(ch)
        if ch != ",":
            return self._close(ch)
        self._state = "key" if self._stack[-1] == "}" else "value"
        self._hold(ch)

    def _close(self, ch):
        if ch != self._stack[-1]:
            raise _Malformed
        self._stack.pop()
        self._state, self.done = "after", not self._stack
        self._commit(ch)

    def _in_string(self, ch):
        if ch == "\\":
            self._state, self._token = "escape", ch
            return
        if ch == '"':
            self._state = "colon" if self._key else "after"
        elif ch < " ":  # not allowed raw in JSON (RFC 8259 section 7), yet models put newlines in code
            ch = json.dumps(ch)[1:-1]
        self._hold(ch) if self._key else self._commit(ch)

    def _in_escape(self, ch):
        self._token += ch
        if ch not in ('"\\/bfnrtu' if len(self._token) == 2 else HEX):
            raise _Malformed
        if self._token[1] == "u" and len(self._token) < 6:
            return
        text, self._token, self._state = self._token, "", "string"
        self._hold(text) if self._key else self._commit(text)

    def _in_scalar(self, ch):
        if ch in SCALAR_CHARS:
            if len(self._token) >= MAX_SCALAR_CHARS:
                raise _Malformed
            self._token += ch
            return
        if not SCALAR.fullmatch(self._token):
            raise _Malformed
        text, self._token, self._state = self._token, "", "after"
        self._commit(text)
        self._in_after(ch)


# ---------------------------------------------------------------------------------------------------
# The streaming parser
# ---------------------------------------------------------------------------------------------------

class CallParser:
    """Generated text in, engine events out; see the module docstring for its guarantees.

    >>> p = CallParser(HERMES, ["get_weather"])
    >>> p.feed('Let me look.\\n<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Pa')
    [TextDelta(text='Let me look.'), ToolUseStart(name='get_weather'), ToolInputDelta(partial_json='{"city": "Pa')]
    >>> p.feed('ris"}}\\n</tool_call>'), p.finish(), p.calls
    ([ToolInputDelta(partial_json='ris"}')], [], 1)
    """

    def __init__(self, fmt, tool_names, parallel=True):
        self.fmt = fmt
        self.calls = 0  # ToolUseStarts emitted: the engine's stop_reason is "tool_use" when positive
        self._names = frozenset(tool_names)
        self._parallel = parallel
        # each text that starts a call, with the alternatives that may follow it; whitespace before a
        # call is dropped, so a marker is found without its own leading whitespace
        self._heads = {start: tuple(steps + (ARGS_OPEN,) for steps in f.heads) for f in (fmt, *fmt.variants)
                       for start in (*(lead + f.open_marker for lead in f.lead_ins), f.open_marker.lstrip(SPACE))}
        self._after = tuple(steps + (ARGS_OPEN,) if NAME in steps else steps for steps in fmt.after)
        self._mode = "text"  # text | steps | args | rest | done: which _read_ method reads next
        self._pending, self._floor, self._after_call = "", 0, False  # text mode
        self._live, self._raw, self._ws, self._steps_after_call = [], "", 0, False  # steps mode
        self._args, self._in_object = None, False  # args mode
        self._depth, self._in_string, self._escaped = 0, False, False  # rest mode

    @property
    def in_call(self):
        """An open marker was read and its call is not over: the rest can be grammar-constrained."""
        return self._mode in ("args", "rest") or (self._mode == "steps" and not self._steps_after_call)

    @property
    def done(self):
        """Nothing more will be emitted (after finish(), a broken call, or a call when not parallel)."""
        return self._mode == "done"

    def feed(self, text):
        events = []
        self._run(text, events)
        return events

    def finish(self):
        """The end of generation: a call not yet started is text, a call cut short is closed."""
        events = []
        if self._mode == "steps" and self._steps_after_call and any(NAME not in s[0] for s in self._live):
            self._mode = "done"  # a call's close cut off is not text: Phi-4-mini often stops before its own
        while self._mode == "steps":
            self._run(self._give_up(), events)
        if self._mode == "text" and self._pending:
            events.append(TextDelta(self._pending))
        elif self._mode == "args":
            self._break_call(events)
        self._mode, self._pending = "done", ""
        return events

    def _run(self, text, events):
        while text and self._mode != "done":
            text = getattr(self, "_read_" + self._mode)(text, events)

    # Text, until a call starts ----------------------------------------------------------------------

    def _read_text(self, text, events):
        if self._after_call:
            text = text.lstrip(SPACE)
            self._after_call = not text
        self._pending += text
        hits = [(at, -len(s), s) for s in self._heads if (at := self._pending.find(s, self._floor)) >= 0]
        if not hits:
            self._release_text(events, len(self._pending) - self._held_back())
            return ""
        at, _, start = min(hits)
        kept = len(self._pending[:at].rstrip(SPACE))
        self._ws, self._raw = at - kept, self._pending[kept:at + len(start)]
        rest = self._pending[at + len(start):]
        self._release_text(events, kept)
        self._pending, self._floor = "", 0
        self._start_steps(self._heads[start], after_call=False)
        return rest

    def _held_back(self):
        """How much of the pending text's end might begin a call, with the whitespace before it."""
        n = marker_start_at_end(self._pending[self._floor:], self._heads)
        return len(self._pending) - len(self._pending[:len(self._pending) - n].rstrip(SPACE))

    def _release_text(self, events, n):
        if n:
            events.append(TextDelta(self._pending[:n]))
        self._pending, self._floor = self._pending[n:], max(0, self._floor - n)

    # Step patterns: from the open marker to the arguments, and after them ----------------------------

    def _start_steps(self, alternatives, after_call):
        self._mode, self._steps_after_call = "steps", after_call
        self._live = [(steps, 0, 0, "") for steps in alternatives]

    def _read_steps(self, text, events):
        """Matches all alternatives at once; the first one complete decides what comes next."""
        for k, ch in enumerate(text):
            self._live = [s for s in (_step(state, ch, self._names) for state in self._live) if s]
            if not self._live:
                return self._give_up() + text[k:]
            self._raw += ch
            steps, _, _, name = next((s for s in self._live if s[1] == len(s[0])), (None,) * 4)
            if steps and NAME in steps:
                self._open_call(name, events)
                return text[k + 1:]
            if steps:  # the call's close marker
                self._mode, self._raw, self._after_call = "text", "", True
                return text[k + 1:]
        return ""

    def _give_up(self):
        """Steps that stopped matching are text after all; returns that text, to be scanned again.
        A call's own open marker cannot start it again (`_floor`); text after a call can hold one."""
        raw, self._raw, self._mode = self._raw, "", "text"
        self._after_call = self._steps_after_call
        self._floor = 0 if self._steps_after_call else self._ws + 1
        return raw

    # The arguments, and the rest of the call's own JSON object --------------------------------------

    def _open_call(self, name, events):
        # `{` before the arguments' own means the call is a JSON object that continues after them
        self._in_object = "{" in self._raw[:-1]
        self._mode, self._raw = "args", ""
        self._args = _JsonObject()
        self._args.feed("{")  # emitted with what follows it
        self.calls += 1
        events.append(ToolUseStart(name))

    def _read_args(self, text, events):
        for k, ch in enumerate(text):
            try:
                self._args.feed(ch)
            except _Malformed:
                self._break_call(events)
                return ""
            if self._args.done:
                events.append(ToolInputDelta(self._args.take()))
                self._end_call()
                return text[k + 1:]
        if self._args.safe:
            events.append(ToolInputDelta(self._args.take()))
        return ""

    def _break_call(self, events):
        """Closes arguments that cannot go on; a model this far off its format is not followed further."""
        events.append(ToolInputDelta(self._args.take() + self._args.closing()))
        self._mode = "done"

    def _end_call(self):
        if not self._parallel:
            self._mode = "done"
        elif self._in_object:
            self._mode, self._depth, self._in_string, self._escaped = "rest", 1, False, False
        else:
            self._start_steps(self._after, after_call=True)

    def _read_rest(self, text, events):
        """Skips what follows the arguments inside the call's object (e.g. Mistral's "id")."""
        for k, ch in enumerate(text):
            if self._in_string:
                self._in_string = self._escaped or ch != '"'
                self._escaped = not self._escaped and ch == "\\"
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._start_steps(self._after, after_call=True)
                    return text[k + 1:]
        return ""


# ---------------------------------------------------------------------------------------------------
# Grammars
# ---------------------------------------------------------------------------------------------------

# Keywords SchemaConverter ignores in ways that can forbid arguments the schema allows; a grammar that
# forbids valid calls is worse than a permissive one, so such schemas get the permissive grammar.
UNSUPPORTED_KEYWORDS = frozenset({"patternProperties", "dependentSchemas", "if", "then", "else",
                                  "$dynamicRef", "$recursiveRef"})
# The converter reads `properties` and ignores these when both are in one schema (and vice versa).
COMBINERS = frozenset({"allOf", "anyOf", "oneOf"})
ANY_OBJECT = {"type": "object"}
ANY_JSON = {"type": ["object", "array", "string", "number", "boolean", "null"]}
LOOSE_CHAR, STRICT_CHAR = 'char ::= [^"\\\\]', 'char ::= [^"\\\\\\x00-\\x1F]'
_GBNF_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A GBNF token: string literal, character class, repetition count, or rule name (group 1).
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{[^}]*\}|([a-zA-Z0-9-]+)')


def marker_start_at_end(text, markers):
    """The length of the longest end of `text` that is the start (not the whole) of one of `markers`:
    what a streaming reader must hold back until the next piece says whether a marker begins there.

    >>> marker_start_at_end("say <tool_ca", ["<tool_call>"]), marker_start_at_end("a <b", ["<tool_call>"])
    (8, 0)
    """
    return max((next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)
                for marker in markers), default=0)


def call_grammar(fmt, tools, forced_name=None, any_arguments=False):
    """GBNF whose `root` is one complete call in `fmt`, open marker included, to one of `tools`
    (protocol.Tool) or only to `forced_name`: for tool_choice "any" and "tool". `any_arguments`:
    the input is any JSON object, not the tool's schema (for when llama.cpp refuses the stricter one)."""
    return _calls_grammar((fmt,), tools, forced_name, with_open_marker=True, any_arguments=any_arguments)


def lazy_call_grammar(fmt, tools):
    """GBNF for one call in `fmt` or one of its variants, open marker included: for tool_choice
    "auto", where llama.cpp applies it from the first open marker the model writes by itself."""
    return _calls_grammar((fmt, *fmt.variants), tools, None, with_open_marker=True)


def rest_of_call_grammar(fmt, tools):
    """GBNF for what follows once the model wrote the open marker by itself (tool_choice "auto")."""
    return _calls_grammar((fmt,), tools, None, with_open_marker=False)


def json_grammar(schema):
    """GBNF for a whole reply that is a JSON value matching `schema` (any JSON if it cannot be
    converted)."""
    return _convert_or(schema, ANY_JSON) + "\n"


def _calls_grammar(fmts, tools, forced_name, with_open_marker, any_arguments=False):
    chosen = [tool for tool in tools if forced_name in (None, tool.name)]
    if not chosen:
        raise ValueError(f"no tool named {forced_name!r} to build a grammar for")
    # each tool's schema rules apart, so equal $defs names never collide
    rules = [_prefix_rules(_arguments_grammar(ANY_OBJECT if any_arguments else tool.input_schema), f"tool{i}-")
             for i, tool in enumerate(chosen)]
    roots, calls = [], []
    for k, fmt in enumerate(fmts):
        call = "call" + (str(k) if k else "")  # one rule per format: its calls to each tool
        close = fmt.args_suffix + ("" if fmt.close_ends_generation else fmt.close_marker)
        alternatives = [_literal(fmt.name_prefix + tool.name + fmt.args_prefix) + f" tool{i}-root"
                        + (f" {_literal(close)}" if close else "") for i, tool in enumerate(chosen)]
        roots.append((_literal(fmt.open_marker) + " " if with_open_marker else "") + call)
        calls.append(f"{call} ::= " + " | ".join(alternatives))
    return "\n".join(["root ::= " + " | ".join(roots)] + calls + rules) + "\n"


def _arguments_grammar(schema):
    """A tool's input_schema as GBNF rules under `root`; a schema without "type" is an object."""
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        return _convert(ANY_OBJECT)
    return _convert_or({"type": "object", **schema}, ANY_OBJECT)


def _convert_or(schema, fallback):
    try:
        return _convert(schema)
    except Exception:  # the converter fails by assert, KeyError, ValueError, RecursionError and more
        return _convert(fallback)


def _convert(schema):
    if _unsupported(schema):
        raise ValueError("the schema uses keywords SchemaConverter would mistranslate")
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    resolved = converter.resolve_refs(copy.deepcopy(schema), "schema")  # it rewrites $refs in place
    converter.visit(resolved, "")
    # This converter's string characters include raw control characters, which strict JSON parsers
    # (json.loads, the SDKs) refuse; the grammar asks for them escaped.
    return converter.format_grammar().replace(LOOSE_CHAR, STRICT_CHAR)


def _unsupported(schema):
    if isinstance(schema, list):
        return any(_unsupported(item) for item in schema)
    if not isinstance(schema, dict):
        return False
    if UNSUPPORTED_KEYWORDS & schema.keys() or ("properties" in schema and COMBINERS & schema.keys()):
        return True
    # The converter escapes only `"`, CR and LF in literals: a backslash in a key or an enum/const
    # value would come out as a wrong or unparsable literal.
    literals = [*schema.get("properties", ()), *schema.get("enum", ()), *[schema.get("const", "")]]
    subschemas = [*schema.get("properties", {}).values(), *schema.get("$defs", {}).values(), *(
        v for k, v in schema.items() if k not in ("properties", "$defs", "enum", "const", "default", "examples"))]
    return any("\\" in json.dumps(v, ensure_ascii=False) for v in literals) or _unsupported(subschemas)


def _prefix_rules(grammar, prefix):
    return _GBNF_TOKEN.sub(lambda m: prefix + m[1] if m[1] else m[0], grammar)


def _literal(text):
    """A GBNF string literal; llama.cpp's grammar parser knows only \\n \\r \\t \\\\ \\" \\x escapes."""
    return '"' + "".join(_GBNF_ESCAPES.get(ch) or (f"\\x{ord(ch):02X}" if ch < " " else ch)
                         for ch in text) + '"'
