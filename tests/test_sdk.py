"""The real server with the real default model, driven by the official `anthropic` SDK."""

import asyncio

import anthropic
import pytest

from conftest import Running, make_config
from engine import Engine
from sse_grammar import sdk_client

HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]
# The newest SDKs no longer list `temperature` among create()'s arguments, but the API (and older
# clients, curl users) still send it; greedy decoding is what makes answers comparable in tests.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(served):
    return sdk_client(served.url)


def greedy(client, **kwargs):
    kwargs.setdefault("messages", HELLO)
    kwargs.setdefault("max_tokens", 24)
    return client.messages.create(model="local-model", extra_body=GREEDY, **kwargs)


def test_create_returns_a_complete_message_echoing_the_model(client):
    message = greedy(client)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "local-model"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens > 0
    count = client.messages.count_tokens(model="x", messages=HELLO).input_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == count


def test_a_max_tokens_stop_reports_exactly_max_tokens_output(client):
    message = greedy(client, max_tokens=3)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_the_joined_stream_equals_the_non_streamed_answer_at_temperature_0(client):
    expected = greedy(client, max_tokens=40)
    with client.messages.stream(model="m", max_tokens=40, extra_body=GREEDY, messages=HELLO) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == expected.content[0].text == final.content[0].text
    assert final.stop_reason == expected.stop_reason
    assert final.usage.output_tokens == expected.usage.output_tokens


def test_a_stop_sequence_spanning_tokens_ends_the_text_before_it(client):
    text = greedy(client, max_tokens=40).content[0].text
    words = text.split(" ")
    assert len(words) > 4, text
    # the end of one word and the start of the next: a stop sequence that spans several tokens
    stop = words[2][-2:] + " " + words[3][:3]
    expected = text[:text.index(stop)]
    for stream in (False, True):
        if stream:
            with client.messages.stream(model="m", max_tokens=40, extra_body=GREEDY, messages=HELLO,
                                        stop_sequences=["never-appears", stop]) as s:
                joined = "".join(s.text_stream)
                message = s.get_final_message()
            assert joined == expected
        else:
            message = greedy(client, max_tokens=40, stop_sequences=["never-appears", stop])
        assert message.content[0].text == expected
        assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop


def test_a_final_assistant_message_is_continued_not_repeated(client):
    prefill = "The sea is"
    message = greedy(client, messages=HELLO + [{"role": "assistant", "content": prefill}])
    plain = greedy(client)
    assert not message.content[0].text.startswith(prefill)
    assert message.content[0].text != plain.content[0].text


def test_system_prompts_as_text_blocks_and_as_mid_conversation_messages_are_served(client):
    message = greedy(client, system=[{"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}}],
                     messages=[{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be kind."}])
    assert message.content[0].text


def test_a_prompt_that_does_not_fit_is_a_400_in_the_words_claude_code_recognises(client, engine):
    long_text = "word " * (engine.n_ctx + 10)
    with pytest.raises(anthropic.BadRequestError) as info:
        greedy(client, messages=[{"role": "user", "content": long_text}])
    assert "prompt is too long: " in str(info.value) and f"> {engine.n_ctx - 1} maximum" in str(info.value)


def test_count_tokens_counts_exactly_what_generation_evaluates(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    counted = client.messages.count_tokens(model="m", messages=messages, system="Be short.").input_tokens
    message = greedy(client, messages=messages, system="Be short.", max_tokens=2)
    assert counted == message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_a_repeated_prompt_is_read_from_the_cache(client):
    messages = [{"role": "user", "content": "List four animals that live in the ocean."}]
    greedy(client, messages=messages, max_tokens=2)
    again = greedy(client, messages=messages, max_tokens=2)
    assert again.usage.cache_read_input_tokens > 10
    assert again.usage.input_tokens >= 1


def test_models_list_and_retrieve_and_unknown_is_404(client, engine):
    listed = client.models.list()
    assert [m.id for m in listed.data] == [engine.model_name]
    model = client.models.retrieve(engine.model_name)
    assert model.type == "model" and model.max_input_tokens == engine.n_ctx
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")


def test_bad_requests_raise_bad_request_error_naming_the_field(client):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="m", max_tokens=10, messages=HELLO, extra_body={"temperature": 3})
    assert "temperature" in str(info.value)
    assert info.value.response.headers["request-id"].startswith("req_")


def test_the_async_client_creates_and_streams(served):
    async def run():
        client = sdk_client(served.url, asynchronous=True)
        message = await client.messages.create(model="m", max_tokens=8, extra_body=GREEDY, messages=HELLO)
        async with client.messages.stream(model="m", max_tokens=8, extra_body=GREEDY, messages=HELLO) as stream:
            final = await stream.get_final_message()
        counted = await client.messages.count_tokens(model="m", messages=HELLO)
        await client.close()
        return message, final, counted
    message, final, counted = asyncio.run(run())
    assert message.content[0].text == final.content[0].text
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_an_api_key_is_required_once_set_and_either_header_may_carry_it(engine):
    running = Running(engine, api_key="s3cret")
    try:
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=running.url, api_key="wrong", max_retries=0).models.list()
        assert anthropic.Anthropic(base_url=running.url, api_key="s3cret").models.list().data
        bearer = anthropic.Anthropic(base_url=running.url, auth_token="s3cret", api_key=None)
        assert bearer.models.list().data
    finally:
        running.stop()


def test_generation_stops_when_the_context_is_full():
    small = Engine(make_config(ctx=64))
    running = Running(small)
    try:
        client = sdk_client(running.url)
        # greedy, this question sends the default model into a list that does not end by itself
        # (as Claude Code does: 32000 tokens asked for, streamed; the SDK refuses that unstreamed)
        with client.messages.stream(model="m", max_tokens=32000, extra_body=GREEDY,
                                    messages=[{"role": "user", "content": "What is the capital of France?"}]) as s:
            message = s.get_final_message()
        assert message.stop_reason == "model_context_window_exceeded"
        assert message.usage.input_tokens + message.usage.output_tokens == small.n_ctx
    finally:
        running.stop()
