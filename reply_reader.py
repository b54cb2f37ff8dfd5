"""What a model generates, read as it streams: stop strings, reasoning, tool calls.

Contract: `ReplyReader` is fed the decoded text of each generated token and hands back `protocol`
events (`TextDelta`, `ThinkingDelta`, `ToolUseStart`, `ToolInputDelta`), holding back only what may
still turn out to be the start of a marker, and says when a stop string was hit. Its three stages,
each usable alone: `StopMatcher` cuts the text at the first stop string; `ReasoningSplitter` sets a
`ReasoningFormat`'s reasoning apart from the answer; `tool_calls.CallParser` reads calls out of the
answer. Pure text in and events out: it never loads a model, samples, or touches I/O.
"""

import re
from dataclasses import dataclass

from protocol import TextDelta, ThinkingDelta
from tool_calls import CallParser, marker_start_at_end


class StopMatcher:
    """Cuts generated text at the first stop string, holding back what might be the start of one.

    >>> m = StopMatcher(("END",))
    >>> m.feed("abcE"), m.feed("N"), m.feed("D!")
    (('abc', None), ('', None), ('', 'END'))
    """

    def __init__(self, stops):
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text):
        """Returns (text safe to emit, the stop string hit or None)."""
        self._pending += text
        hits = [(at + len(s), at, s) for s in self._stops if (at := self._pending.find(s)) >= 0]
        if hits:
            # the stop that completes first, as if text arrived one character at a time
            _, at, stop = min(hits, key=lambda hit: hit[:2])
            emit, self._pending = self._pending[:at], ""
            return emit, stop
        keep = marker_start_at_end(self._pending, self._stops)
        emit, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return emit, None

    def flush(self, text=""):
        """The end of generation: whatever was held back (plus `text`) is not a stop after all."""
        emit, hit = self.feed(text)
        if hit is not None:
            return emit
        emit, self._pending = emit + self._pending, ""
        return emit


@dataclass(frozen=True)
class ReasoningFormat:
    """How a family of models sets its reasoning apart from its answer: the reasoning runs from
    `open` to `close`, and outside it the `headers` (what a format writes between its reasoning and
    its answer) are dropped wherever they appear. No marker may contain another: that is what lets
    `ReasoningSplitter` hold back only the end of its text and still split it the same way however
    it is cut into tokens."""

    open: str
    close: str
    budget_close: str  # written into the context, as if by the model, when the thinking budget is spent
    headers: tuple = ()
    special: bool = False  # the markers are control tokens: they detokenize only as special pieces

    def __post_init__(self):
        markers = {self.open, self.close, *self.headers}
        if any(a != b and b in a for a in markers for b in markers):
            raise ValueError("a reasoning marker contains another one")

    def markers(self):
        return (self.open, self.close, *self.headers)

    def opened_by(self, prompt_text):
        """Whether a rendered prompt ends inside the reasoning (DeepSeek-R1 style generation prompts)."""
        return prompt_text.rstrip().endswith(self.open)


# Qwen 3, DeepSeek-R1 and their templates: reasoning between think tags, the answer after them.
THINK_TAGS = ReasoningFormat("<think>", "</think>", budget_close="\n</think>\n\n")
# gpt-oss (OpenAI harmony): reasoning is an analysis-channel message, the answer a final-channel one
# (after the generation prompt `<|start|>assistant`, with or without analysis before it). A call,
# `<|start|>assistant<|channel|>commentary to=functions.…`, reaches the call parser from `<|channel|>`
# on; a commentary message without a recipient (a preamble to calls) is answer text.
HARMONY_CHANNELS = ReasoningFormat(
    "<|channel|>analysis<|message|>", "<|end|>",
    budget_close="<|end|><|start|>assistant<|channel|>final<|message|>",
    headers=("<|start|>assistant", "<|channel|>final<|message|>", "<|channel|>commentary<|message|>", "<|end|>"),
    special=True)


CONTROL_TOKEN = re.compile(r"<\|\w+\|>")


class ReasoningSplitter:
    """Splits generated text into reasoning and answer at a format's markers, holding back what
    might be the start of a marker; markers are dropped, and so is whitespace right after one.

    >>> s = ReasoningSplitter(THINK_TAGS)
    >>> s.feed("<thi"), s.feed("nk>\\nhmm</thi"), s.feed("nk>\\n\\nYes")
    ([], [('thinking', 'hmm')], [('text', 'Yes')])
    >>> s = ReasoningSplitter(HARMONY_CHANNELS)
    >>> s.feed("<|channel|>analysis<|message|>hmm<|en"), s.feed("d|><|start|>assistant<|channel|>final<|message|>Yes")
    ([('thinking', 'hmm')], [('text', 'Yes')])
    """

    def __init__(self, fmt, inside=False):
        self.fmt = fmt
        self.inside = inside
        self._pending = ""
        self._after_marker = inside
        # what ends the stretch of text being read: inside the reasoning its close, outside its open
        # or a header
        self._markers = {True: (fmt.close,), False: (fmt.open, *fmt.headers)}
        self._patterns = {side: re.compile("|".join(map(re.escape, markers)))
                          for side, markers in self._markers.items()}

    def feed(self, text, final=False):
        """Returns [(kind, text)], kind "thinking" or "text". `final`: generation ended, so what was
        held back is not a marker after all."""
        self._pending += text
        out = []
        while match := self._patterns[self.inside].search(self._pending):
            self._emit(out, self._pending[:match.start()])
            self._pending = self._pending[match.end():]
            # inside, the close ends the reasoning; outside, the open starts it and a header is skipped
            self.inside, self._after_marker = not self.inside and match[0] == self.fmt.open, True
        keep = marker_start_at_end(self._pending, self._markers[self.inside])
        if final:
            # what was held back is text after all, unless it is a header of control tokens cut short
            # (a reply that ran out of tokens between two harmony messages)
            if self.fmt.special and CONTROL_TOKEN.match(self._pending[len(self._pending) - keep:]):
                self._pending = self._pending[:len(self._pending) - keep]
            keep = 0
        self._emit(out, self._pending[:len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        return out

    def _emit(self, out, piece):
        if self._after_marker:
            piece = piece.lstrip()
            self._after_marker = not piece
        if piece:
            out.append(("thinking" if self.inside else "text", piece))


class ReplyReader:
    """The three stages in order: stop strings first (they cut everything after them), then
    reasoning apart from the answer, then calls out of the answer. Reasoning becomes `ThinkingDelta`s
    only when `show_thinking`; otherwise it is dropped.

    >>> r = ReplyReader(("END",), reasoning=THINK_TAGS, show_thinking=True)
    >>> r.feed("<think>hm</think>Hi E"), r.feed("ND more")
    (([ThinkingDelta(thinking='hm'), TextDelta(text='Hi ')], None), ([], 'END'))
    """

    def __init__(self, stops, reasoning=None, starts_in_thinking=False, show_thinking=False,
                 tool_format=None, tool_names=(), parallel=True):
        self._stops = StopMatcher(stops)
        self._reasoning = ReasoningSplitter(reasoning, starts_in_thinking) if reasoning else None
        self._show_thinking = show_thinking
        self._calls = CallParser(tool_format, tool_names, parallel) if tool_format else None

    @property
    def thinking(self):
        """The text read last was reasoning, and the reasoning is still open."""
        return self._reasoning is not None and self._reasoning.inside

    @property
    def calls(self):
        """Tool calls started so far."""
        return self._calls.calls if self._calls else 0

    @property
    def done(self):
        """A call ended and no further one may follow: the reply is over."""
        return self._calls is not None and self._calls.done

    def feed(self, text):
        """Returns (events, the stop string hit or None); after a hit, the reply is over."""
        text, hit = self._stops.feed(text)
        return self._read(text), hit

    def close_reasoning(self, close):
        """The engine wrote `close` (the format's budget close) into the context: read it as generated,
        with what the stop stage held back, which was reasoning."""
        return self._read(self._stops.flush() + close)

    def finish(self, tail="", stopped=False):
        """The end of generation; `tail` is what the UTF-8 decoder still held (ignored once a stop
        string cut the reply). Returns the last events: held-back text, a call closed."""
        events = self._read("" if stopped else self._stops.flush(tail), final=True)
        return events + (self._calls.finish() if self._calls else [])

    def _read(self, text, final=False):
        events = []
        pieces = self._reasoning.feed(text, final) if self._reasoning else (("text", text),)
        for kind, piece in pieces:
            if kind == "text":
                events += self._calls.feed(piece) if self._calls else [TextDelta(piece)] if piece else []
            elif self._show_thinking:
                events.append(ThinkingDelta(piece))
        return events
