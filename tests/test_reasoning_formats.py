"""Reasoning formats without a model: think tags and gpt-oss harmony channels split into thinking and
answer whatever the token boundaries, the budget close ends the reasoning, a harmony call in either order
reaches the call parser intact and triggers the lazy call grammar where it begins, and earlier reasoning is
rendered where a template takes it."""

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from chat_template import ChatTemplate
from engine import plan_reply
from reply_reader import CONTROL_TOKEN, HARMONY_CHANNELS, THINK_TAGS, ReasoningSplitter
from protocol import ToolInputDelta, ToolUseStart
from tool_calls import HARMONY, CallParser

ANALYSIS, FINAL = "<|channel|>analysis<|message|>", "<|channel|>final<|message|>"
NEXT = "<|end|><|start|>assistant"  # what ends an analysis message and begins the next one
MARKERS = (HARMONY_CHANNELS.open, HARMONY_CHANNELS.close, *HARMONY_CHANNELS.headers)
# Pieces of generated text: plain characters and beginnings of markers, to catch partial ones.
FRAGMENTS = ["a", "b", " ", "\n", "<", "|", ">", "<|", "<|e", "<|end|", "<|start|>assist", "<|channel|>",
             "<|channel|>fin", "<|channel|>analysis<|mess", "<|channel|>commentary"]
# Ours, not gpt-oss's: the shape of a harmony template, enough to show where earlier reasoning goes.
# Like gpt-oss's, it refuses a call turn that carries both content and thinking.
HARMONY_LIKE = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}"
    "{% if m.tool_calls and m.content and m.thinking %}{{ raise_exception('content or thinking') }}{% endif %}"
    "{% if m.thinking %}<|start|>assistant" + ANALYSIS + "{{ m.thinking }}<|end|>{% endif %}"
    "{% if m.content %}<|start|>assistant" + FINAL + "{{ m.content }}<|end|>{% endif %}"
    "{% for c in m.tool_calls or [] %}<|start|>assistant<|channel|>commentary to=functions.{{ c.function.name }}"
    "<|message|>{{ c.function.arguments | tojson }}<|call|>{% endfor %}"
    "{% elif m.role == 'tool' %}<|start|>functions<|message|>{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if tools %}<|start|>developer<|message|>{{ tools | tojson }}<|end|>{% endif %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
R1_LIKE = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<think>\n{% endif %}"


def request(**body):
    body.setdefault("model", "m")
    body.setdefault("max_tokens", 10)
    return protocol.parse_messages_request(body)


def split(fmt, chunks, inside=False):
    splitter, joined = ReasoningSplitter(fmt, inside), {"thinking": "", "text": ""}
    for i, chunk in enumerate(chunks):
        for kind, piece in splitter.feed(chunk, final=i == len(chunks) - 1):
            joined[kind] += piece
    return joined


def cut(text, sizes):
    """`text` in pieces of the given sizes, the rest as the last piece."""
    pieces, at = [], 0
    for size in sizes:
        pieces.append(text[at:at + size])
        at += size
    return pieces + [text[at:]]


# text a model writes: no markers, and no control tokens (they are never part of an answer)
plain = st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join).filter(
    lambda text: not any(marker in text for marker in MARKERS) and not CONTROL_TOKEN.search(text))


# --- harmony: thinking and answer ----------------------------------------------------------------------

@given(plain, plain, st.booleans(), st.lists(st.integers(1, 6), max_size=30))
def test_any_cut_of_a_harmony_reply_gives_its_analysis_as_thinking_and_its_final_as_text(
        analysis, answer, analysed, sizes):
    text = (ANALYSIS + analysis + NEXT if analysed else "") + FINAL + answer
    expected = {"thinking": analysis.lstrip() if analysed else "", "text": answer.lstrip()}
    assert split(HARMONY_CHANNELS, [text]) == expected
    assert split(HARMONY_CHANNELS, cut(text, sizes)) == expected
    assert split(HARMONY_CHANNELS, list(text)) == expected


@given(st.lists(st.sampled_from(FRAGMENTS + list(MARKERS)), max_size=20).map("".join), st.booleans(),
       st.lists(st.integers(1, 6), max_size=30))
def test_splitting_anything_does_not_depend_on_how_it_is_cut_into_tokens(text, inside, sizes):
    assert split(HARMONY_CHANNELS, cut(text, sizes), inside) == split(HARMONY_CHANNELS, [text], inside)
    assert split(HARMONY_CHANNELS, list(text), inside) == split(HARMONY_CHANNELS, [text], inside)


def test_partial_harmony_markers_are_held_back_until_they_complete_or_fail():
    splitter = ReasoningSplitter(HARMONY_CHANNELS)
    assert splitter.feed("<|channel|>anal") == []
    assert splitter.feed("ysis<|message|>Is 17 prime?<|en") == [("thinking", "Is 17 prime?")]
    assert splitter.feed("d|><|start|>assistant<|chan") == [] and not splitter.inside
    assert splitter.feed("nel|>final<|message|>Yes<|e") == [("text", "Yes")]
    assert splitter.feed("h") == [("text", "<|eh")]
    assert splitter.feed("<|st") == []
    assert splitter.feed("", final=True) == [("text", "<|st")]


def test_a_final_channel_without_analysis_is_all_text():
    assert split(HARMONY_CHANNELS, [FINAL + "Paris."]) == {"thinking": "", "text": "Paris."}


def test_a_preamble_on_the_commentary_channel_is_text():
    text = "<|channel|>commentary<|message|>Checking the weather.<|end|><|start|>assistant" + FINAL + " Rain."
    assert split(HARMONY_CHANNELS, [text]) == {"thinking": "", "text": "Checking the weather.Rain."}


# How gpt-oss opens a call right after `<|start|>assistant`: channel first, or recipient first with each
# content type (its own template writes earlier calls recipient first, with " json").
CALL_OPENINGS = [HARMONY.open_marker + "get_weather <|constrain|>json<|message|>",
                 " to=functions.get_weather<|channel|>commentary json<|message|>",
                 " to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>",
                 " to=functions.get_weather<|channel|>commentary<|message|>"]


@pytest.mark.parametrize("analysed", [True, False])
@pytest.mark.parametrize("opening", CALL_OPENINGS)
def test_a_harmony_call_in_either_order_reaches_the_call_parser_as_one_call_and_no_text(opening, analysed):
    analysis = ANALYSIS + "The user wants the weather." + NEXT if analysed else ""
    text = analysis + opening + '{"city": "Paris"}'  # <|call|> ends generation: never text
    for chunks in ([text], list(text)):
        splitter, parser, thinking, events = ReasoningSplitter(HARMONY_CHANNELS), CallParser(
            HARMONY, ["get_weather"]), "", []
        for i, chunk in enumerate(chunks):
            for kind, piece in splitter.feed(chunk, final=i == len(chunks) - 1):
                if kind == "thinking":
                    thinking += piece
                else:
                    events += parser.feed(piece)
        events += parser.finish()
        assert thinking == ("The user wants the weather." if analysed else "")
        assert events[0] == ToolUseStart("get_weather") and parser.calls == 1
        assert all(isinstance(e, ToolInputDelta) for e in events[1:])
        assert json.loads("".join(e.partial_json for e in events[1:])) == {"city": "Paris"}


@pytest.mark.parametrize("analysed", [True, False])
@pytest.mark.parametrize("opening", CALL_OPENINGS)
def test_the_lazy_call_grammar_is_triggered_where_a_harmony_call_begins_in_either_order(opening, analysed):
    plan = plan_reply(request(tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
                              messages=[{"role": "user", "content": "Weather?"}]), HARMONY)
    analysis = ANALYSIS + "The user wants the weather." + NEXT if analysed else ""
    # llama.cpp (0.3.36's) searches the text so far for the trigger after each token; the group's start
    # is where the grammar takes over
    match = re.search(plan.trigger, analysis + opening)
    assert match.start(1) == len(analysis) and opening.startswith(match[1])  # the grammar starts with the call


# --- the thinking budget -------------------------------------------------------------------------------

def test_the_budget_close_ends_the_reasoning_and_the_answer_follows_as_text():
    for fmt, opening in ((HARMONY_CHANNELS, ANALYSIS), (THINK_TAGS, "<think>\n")):
        splitter = ReasoningSplitter(fmt)
        assert splitter.feed(opening + "Still going") == [("thinking", "Still going")] and splitter.inside
        assert {kind for kind, _ in splitter.feed(fmt.budget_close)} <= {"thinking"} and not splitter.inside
        assert splitter.feed("Yes.") == [("text", "Yes.")]


# --- templates: which format, and earlier reasoning ------------------------------------------------------

def test_the_reasoning_format_is_detected_from_the_chat_template():
    assert ChatTemplate(HARMONY_LIKE, "", "").reasoning is HARMONY_CHANNELS
    assert ChatTemplate(R1_LIKE, "", "").reasoning is THINK_TAGS
    assert ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}", "", "").reasoning is None
    assert ChatTemplate(None, "", "").reasoning is None


def test_a_harmony_generation_prompt_does_not_start_inside_the_analysis():
    ask = request(messages=[{"role": "user", "content": "Hi"}])
    assert not HARMONY_CHANNELS.opened_by(ChatTemplate(HARMONY_LIKE, "", "").render(ask))
    assert THINK_TAGS.opened_by(ChatTemplate(R1_LIKE, "", "").render(ask))


def test_earlier_thinking_is_rendered_where_a_harmony_template_takes_it():
    text = ChatTemplate(HARMONY_LIKE, "", "").render(request(messages=[
        {"role": "user", "content": "Is 17 prime?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "No divisors.", "signature": ""},
                                          {"type": "text", "text": "Yes."}]},
        {"role": "user", "content": "And 18?"}]))
    assert ("<|start|>assistant" + ANALYSIS + "No divisors.<|end|><|start|>assistant" + FINAL + "Yes.<|end|>"
            in text)


def test_earlier_thinking_before_a_call_is_rendered_and_a_call_turn_with_text_still_renders():
    weather = [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}]
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": [
                   {"type": "thinking", "thinking": "Call the tool.", "signature": ""},
                   {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"}]}]
    template = ChatTemplate(HARMONY_LIKE, "", "")
    text = template.render(request(tools=weather, messages=history))
    assert ANALYSIS + "Call the tool.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather" in text
    # text next to the call: the template shows the text and the request still renders
    history[1]["content"].insert(1, {"type": "text", "text": "Let me check."})
    text = template.render(request(tools=weather, messages=history))
    assert FINAL + "Let me check.<|end|>" in text and "Call the tool." not in text


def test_a_harmony_reply_cut_short_between_two_messages_shows_no_control_tokens():
    assert split(HARMONY_CHANNELS, [FINAL + "Hi<", "|end|>" + NEXT + "<|channel|>"]) == {"thinking": "", "text": "Hi"}
    assert split(HARMONY_CHANNELS, [FINAL + "x <"]) == {"thinking": "", "text": "x <"}
