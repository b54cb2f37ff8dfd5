"""Reasoning models: reasoning comes back as thinking blocks, the budget closes it, and it never
leaks into text. End to end through a test model: the default model's weights with a reasoning
template of our own in the DeepSeek-R1 style (its generation prompt opens the reasoning section)."""

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

import compat_server
from conftest import Running, ScriptedEngine, make_config
from engine import Engine, sampling_for
from model_fixtures import _default_model_with
from protocol import Finish, TextDelta, ThinkingDelta, parse_messages_request
from reply_reader import THINK_TAGS, ReasoningSplitter
from sse_grammar import sdk_client

R1_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")
ASK = [{"role": "user", "content": "Is 17 a prime number?"}]


@pytest.fixture(scope="module")
def r1_engine(model_cache):
    engine = Engine(make_config(model=_default_model_with(model_cache, "r1", R1_STYLE), ctx=4096))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(r1_engine):
    running = Running(r1_engine)
    yield sdk_client(running.url)
    running.stop()


def split(text, inside, cuts):
    splitter, out, at = ReasoningSplitter(THINK_TAGS, inside), [], 0
    for cut in cuts + [len(text)]:
        out += splitter.feed(text[at:at + cut])
        at += cut
    joined = {"thinking": "", "text": ""}
    for kind, piece in out:
        joined[kind] += piece
    return joined


@given(st.text(alphabet="ab <>/thinkT\n", max_size=40), st.booleans(), st.lists(st.integers(1, 6), max_size=20))
def test_splitting_does_not_depend_on_how_text_is_cut_into_tokens(text, inside, cuts):
    assert split(text, inside, cuts) == split(text, inside, [])


def test_reasoning_and_answer_are_separated_and_tags_never_reach_either():
    assert split("<think>\nLet me see.\n</think>\n\nYes.", False, [3, 5]) == {
        "thinking": "Let me see.\n", "text": "Yes."}


def test_thinking_streams_as_a_signed_thinking_block_without_its_tags(client):
    with client.messages.stream(model="m", max_tokens=1100, messages=ASK,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        events = list(stream)
        message = stream.get_final_message()
    kinds = [b.type for b in message.content]
    assert kinds[0] == "thinking" and message.content[0].thinking and message.content[0].signature
    assert any(e.type == "content_block_delta" and e.delta.type == "signature_delta" for e in events)
    assert "<think>" not in str(message.content) and "</think>" not in str(message.content)


def test_the_thinking_budget_closes_the_reasoning_and_the_answer_follows(r1_engine):
    """Below the request level, where a budget may be smaller than the API's least (1024 tokens):
    greedily this model reasons for ~55 tokens and then ends its turn without an answer, so only the
    budget can be what closes its reasoning here. Each run evaluates afresh, so both are the same
    greedy path up to the budget."""
    request = parse_messages_request({"model": "m", "max_tokens": 1100, "temperature": 0, "messages": ASK,
                                      "thinking": {"type": "enabled", "budget_tokens": 1024}})

    def reply(budget):
        r1_engine._forget()
        prompt = replace(r1_engine._prepare(request), thinking_budget=budget)
        events = list(r1_engine._run(r1_engine._turns.reserve(), prompt, sampling_for(request), lambda: False))
        return ("".join(e.thinking for e in events if isinstance(e, ThinkingDelta)),
                "".join(e.text for e in events if isinstance(e, TextDelta)))

    unbounded, _ = reply(None)
    thinking, text = reply(16)
    thinking = thinking.rstrip()  # the budget's close begins with a newline
    assert unbounded.startswith(thinking) and len(thinking) < len(unbounded) and text.strip()


def test_without_thinking_the_template_switch_is_off_and_no_reasoning_is_returned(client):
    message = client.messages.create(model="m", max_tokens=40, messages=ASK, thinking={"type": "disabled"})
    assert all(b.type == "text" for b in message.content)
    assert "<think>" not in message.content[0].text


def test_thinking_blocks_in_the_history_are_accepted_with_any_signature(client):
    history = ASK + [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": "17 has no divisors but 1 and itself.", "signature": ""},
        {"type": "redacted_thinking", "data": "opaque"}, {"type": "text", "text": "Yes."}]},
        {"role": "user", "content": "And 18?"}]
    message = client.messages.create(model="m", max_tokens=20, messages=history, thinking={"type": "disabled"})
    assert message.content[0].type == "text"


def test_a_long_prompt_evaluation_is_kept_alive_with_empty_deltas(monkeypatch):
    monkeypatch.setattr(compat_server, "CONTENT_KEEPALIVE", 0.3)
    slow = ScriptedEngine([ThinkingDelta("hmm"), TextDelta("Yes"), Finish("end_turn", None, 3, 0, 2)], delay=1.0)
    running = Running(slow)
    try:
        client = sdk_client(running.url)
        with client.messages.stream(model="m", max_tokens=10, messages=ASK, thinking={"type": "adaptive"}) as s:
            events = list(s)
            message = s.get_final_message()
        deltas = [e for e in events if e.type == "content_block_delta"]
        assert deltas[0].delta.type == "thinking_delta" and deltas[0].delta.thinking == ""
        assert [b.type for b in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == "hmm" and message.content[1].text == "Yes"
    finally:
        running.stop()
