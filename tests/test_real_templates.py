"""Real chat templates: llama.cpp's own collection of ~70 (Qwen, Llama, Mistral, Gemma, gpt-oss,
DeepSeek, GLM, Kimi, Granite, LFM2, Command-R, …) render what a Claude Code conversation holds.

They are third-party code, so their text never enters this repository: they are read at test time
from the llama-cpp-python sdist that `make` downloads to compile (`vendor/llama.cpp/models/templates`).
Rendering needs no model, so every template is checked in a fraction of a second; a few are also
written into a copy of the default GGUF and served.
"""

import os
import time
import tarfile

import llama_cpp
import pytest

import chat_template
import protocol
from chat_template import ChatTemplate
from conftest import Running, make_config
from engine import Engine
from model_fixtures import _default_model_with
from sse_grammar import sdk_client
from tool_calls import detect_format

SDIST = os.path.expanduser(f"~/.cache/llama-compat/sdist/llama_cpp_python-{llama_cpp.__version__}.tar.gz")


def _read_templates():
    with tarfile.open(SDIST) as sdist:
        return {os.path.basename(m.name)[:-len(".jinja")]: sdist.extractfile(m).read().decode("utf-8")
                for m in sdist.getmembers() if "/models/templates/" in m.name and m.name.endswith(".jinja")}


TEMPLATES = _read_templates() if os.path.isfile(SDIST) else {}
# What a template still refuses, and why: the README's model table says the same.
REFUSES = {
    "CohereForAI-c4ai-command-r-plus-tool_use": "every tool parameter must have a description",
}
# Templates that cannot render even a plain question, so the server renders plain labelled turns instead.
FALLS_BACK = {"fireworks-ai-llama-3-firefunction-v2": "it needs a `functions` variable no other template reads"}
# Templates whose next turn does not extend the last one's prompt (so each turn evaluates more again):
# the system prompt and tools go before the last user message, or earlier reasoning is dropped.
REWRITES_HISTORY = {"Kimi-K2-Thinking", "Mistral-Small-3.2-24B-Instruct-2506", "mistralai-Mistral-Nemo-Instruct-2407",
                    "Qwen3.5-4B", "StepFun3.5-Flash", "openai-gpt-oss-120b"}

# The families whose calls are a JSON object after their own markers, and the format each template
# teaches; no other template may be read in one of those formats.
JSON_CALL_FORMATS = {
    "ibm-granite-granite-3.3-2B-Instruct": "granite",
    "NVIDIA-Nemotron-Nano-v2": "nemotron",
    "meetkai-functionary-medium-v3.1": "functionary-v3.1",
    "meetkai-functionary-medium-v3.2": "generic",  # its generation prompt ends inside the first call's header
    "ByteDance-Seed-OSS": "generic",  # writes `<function=NAME>` too, but each argument in a `<parameter=…>` tag
    "CohereForAI-c4ai-command-r-plus-tool_use": "command-r",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": "command-r7b",
    "Cohere2MoE": "command-r7b",
    "Apertus-8B-Instruct": "apertus",
}

TOOL = {"name": "get_weather", "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"type": "tool_use", "id": "toolu_01XYZabc", "name": "get_weather", "input": {"city": "Paris"}}
# what Claude Code sends: system blocks, a reminder block, the agent list as a system message, thinking
# + text + a call, then its result and the user's next words in one message
CLAUDE_CODE = {"system": [{"type": "text", "text": "You are Claude Code."}], "tools": [TOOL], "messages": [
    {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                 {"type": "text", "text": "What's the weather in Paris?"}]},
    {"role": "system", "content": "Agents: none"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "Let me check.", "signature": "s"},
                                      {"type": "text", "text": "Checking."}, CALL]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": CALL["id"], "content": "Sunny"},
                                 {"type": "text", "text": "Thanks, and tomorrow?"}]}]}


def request(**fields):
    return protocol.parse_messages_request({"model": "m", "max_tokens": 10,
                                            "messages": [{"role": "user", "content": "hello"}], **fields})


def template(name):
    return ChatTemplate(TEMPLATES[name], "<s>", "</s>")


def test_the_collection_is_there():
    assert len(TEMPLATES) >= 60, f"llama.cpp's templates are read from {SDIST}, which `make` downloads"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_real_template_is_read_in_its_own_call_format(name):
    fmt = detect_format(TEMPLATES[name]).name
    if name in JSON_CALL_FORMATS:
        assert fmt == JSON_CALL_FORMATS[name]
    else:
        assert fmt not in set(JSON_CALL_FORMATS.values()) - {"generic"}


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - set(REFUSES)))
def test_a_real_template_renders_a_claude_code_conversation_with_everything_in_it(name):
    chat = template(name)
    assert chat.render(request()).count("hello") == 1
    assert "Be brief." in chat.render(request(system="Be brief."))
    assert "get_weather" in chat.render(request(tools=[TOOL]))  # the tools reach the prompt
    text = chat.render(request(**CLAUDE_CODE))
    for words in ("You are Claude Code.", "Agents: none", "What's the weather in Paris?", "Sunny",
                  "Thanks, and tomorrow?", "get_weather"):
        assert words in text


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - set(REFUSES) - REWRITES_HISTORY))
def test_the_next_turn_extends_the_last_ones_prompt(name):
    chat = template(name)
    first = CLAUDE_CODE["messages"]
    second = first + [{"role": "assistant", "content": "Tomorrow too."}, {"role": "user", "content": "Thanks."}]
    before, after = chat.render(request(**CLAUDE_CODE)), chat.render(request(**{**CLAUDE_CODE, "messages": second}))
    # all but the generation prompt, which the reply's own turn replaces (thinking opened, say)
    assert after.startswith(before[:len(before) - 40])


@pytest.mark.parametrize("name", sorted(REFUSES))
def test_what_a_template_still_refuses_is_a_400_that_says_why(name):
    with pytest.raises(protocol.ApiError) as refused:
        template(name).render(request(**CLAUDE_CODE))
    assert refused.value.status == 400 and "chat template cannot render" in refused.value.message


def test_a_template_that_does_not_compile_falls_back_to_labelled_turns(caplog):
    chat = ChatTemplate("{% for m in messages %}{{ m.content }", "<s>", "</s>")
    assert "User: hello" in chat.render(request())
    assert "does not compile" in caplog.text
    assert chat.end_strings == ("\nUser:",) and not chat.native_calls  # all of the fallback, not only its text
    assert "<tool_call>" in chat.render(request(tools=[TOOL]))  # the generic convention describes the tools


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_only_the_templates_that_cannot_render_a_plain_question_fall_back(name):
    assert (template(name).facts["chat_template"] == "plain labelled turns") == (name in FALLS_BACK)


def test_a_template_that_fails_on_a_plain_question_falls_back_to_labelled_turns(caplog):
    chat = ChatTemplate("{{ messages[0].content.no_such_method() }}", "<s>", "</s>")
    assert "User: hello" in chat.render(request())
    assert "cannot render a plain question" in caplog.text and chat.facts["chat_template"] == "plain labelled turns"


def test_a_template_stuck_in_a_loop_answers_that_request_with_a_400_in_time(monkeypatch):
    # quick for one turn, hours for two: the probe at start passes, the second request times out
    chat = ChatTemplate("{% for m in messages %}{% if not loop.first %}{% for i in range(100000) %}"
                        "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}{{ m.content }}{% endfor %}",
                        "<s>", "</s>")
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    assert chat.render(request()) == "hello"
    started = time.monotonic()
    with pytest.raises(protocol.ApiError) as refused:
        chat.render(request(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "c"}]))
    assert refused.value.status == 400 and "did not finish rendering" in refused.value.message
    assert time.monotonic() - started < 5


def test_range_in_a_template_still_behaves_like_range():
    chat = ChatTemplate("{{ range(3)|list }} {{ range(5)|length }} {{ range(2, 9, 3)|reverse|join(',') }} "
                        "{{ range(4)[1] }}{% for i in range(2) %}{{ loop.index }}{% endfor %}", "", "")
    assert chat.render(request()) == "[0, 1, 2] 5 8,5,2 112"


@pytest.mark.parametrize("name", ["Mistral-Small-3.2-24B-Instruct-2506", "meetkai-functionary-medium-v3.2"])
def test_a_conversation_that_needed_a_fit_does_not_change_how_others_render(name):
    plain = request(system="Be brief.")
    alone = template(name).render(plain)
    chat = template(name)
    chat.render(request(**CLAUDE_CODE))  # needs a fit on these templates
    assert chat.render(plain) == alone


def test_mistral_call_ids_are_nine_alphanumerics_the_same_in_every_turn():
    chat = template("mistralai-Mistral-Nemo-Instruct-2407")
    text = chat.render(request(**CLAUDE_CODE))
    assert CALL["id"] not in text
    short = [word for word in text.replace('"', " ").split() if len(word) == 9 and word.isalnum()
             and not word.isalpha()]
    assert short and text.count(short[0]) == 2  # the call and its result


SERVED = ("Cohere2MoE", "LFM2.5-8B-A1B", "deepseek-ai-DeepSeek-V3.1", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
          "moonshotai-Kimi-K2")


@pytest.fixture(scope="module")
def served_templates(model_cache):
    """Templates written into the default GGUF and served: two the server once refused to start with
    (`{% break %}` in Cohere2MoE, `{% generation %}` in LFM2.5), two whose call formats are read
    although they take no tool list (DeepSeek V3.1 and R1), and Kimi K2's."""
    runs = {}
    for name in SERVED:
        engine = Engine(make_config(model=_default_model_with(model_cache, name.lower(), TEMPLATES[name])))
        runs[name] = Running(engine)
    yield runs
    for running in runs.values():
        running.stop()
        running.server.engine.close()


@pytest.mark.parametrize("name", SERVED[:2])
def test_a_gguf_with_such_a_template_starts_and_answers(served_templates, name):
    client = sdk_client(served_templates[name].url)
    message = client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.input_tokens > 0
    with client.messages.stream(model="m", max_tokens=8, tools=[TOOL], **{
            k: v for k, v in CLAUDE_CODE.items() if k != "tools"}) as stream:
        assert stream.get_final_message().usage.input_tokens > 50


@pytest.mark.parametrize("name, fmt", [("deepseek-ai-DeepSeek-V3.1", "deepseek-v3"),
                                       ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "deepseek-r1"),
                                       ("moonshotai-Kimi-K2", "kimi-k2")])
def test_a_forced_call_in_the_models_own_format_comes_back_as_tool_use(served_templates, name, fmt):
    running = served_templates[name]
    assert running.server.engine.template.tool_format.name == fmt
    client = sdk_client(running.url)
    # maxLength: at temperature 1 the 135M model can ramble inside a string until max_tokens; with it,
    # a call is at most ~140 tokens here even in R1's format (its markers are text to this tokenizer)
    bounded = {**TOOL, "input_schema": {**TOOL["input_schema"], "properties": {"city": {"type": "string",
                                                                                        "maxLength": 40}}}}
    body = dict(model="m", max_tokens=200, tools=[bounded], tool_choice={"type": "tool", "name": "get_weather"},
                messages=[{"role": "user", "content": "Weather in Paris?"}])
    message = client.messages.create(**body)
    with client.messages.stream(**body) as stream:
        streamed = stream.get_final_message()
    for reply in (message, streamed):
        assert reply.stop_reason == "tool_use" and reply.content[-1].type == "tool_use"
        assert reply.content[-1].name == "get_weather" and isinstance(reply.content[-1].input.get("city"), str)
