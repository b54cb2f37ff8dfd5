"""Engine logic that needs no model: stop matching, prompt rendering, and the admission queue."""

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from chat_template import ChatTemplate
from engine import ClientGone, Turns
from reply_reader import StopMatcher

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Like Gemma's and Mistral's: a system turn only first, strict user/assistant alternation after it.
STRICT = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
          "{{ raise_exception('System role only first') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}"
          "{% if add_generation_prompt %}[assistant]{% endif %}")


def request(**body):
    body.setdefault("model", "m")
    body.setdefault("max_tokens", 10)
    return protocol.parse_messages_request(body)


# --- stop sequences ----------------------------------------------------------------------------------

def reference(text, stops):
    """Generation that stops the moment any stop sequence has been produced, one character at a time."""
    for n in range(1, len(text) + 1):
        ending = [s for s in stops if text[:n].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[:n - len(stop)], stop
    return text, None


@given(st.text(alphabet="abc", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(1, 5), max_size=30))
def test_stop_matching_is_independent_of_how_text_is_split_into_tokens(text, stops, cuts):
    matcher, emitted, hit, at = StopMatcher(stops), "", None, 0
    pieces = []
    for cut in cuts + [len(text)]:
        pieces.append(text[at:at + cut])
        at += cut
    for piece in pieces:
        out, hit = matcher.feed(piece)
        emitted += out
        if hit:
            break
    if hit is None:
        emitted += matcher.flush()
    assert (emitted, hit) == reference(text, stops)


def test_text_that_only_starts_like_a_stop_sequence_is_released_at_the_end():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", None)
    assert matcher.flush() == "ST"


# --- prompt rendering ---------------------------------------------------------------------------------

def test_the_models_template_renders_system_history_and_generation_prompt():
    text = ChatTemplate(CHATML, "", "").render(request(system="S", messages=[{"role": "user", "content": "Hi"}]))
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_prefill_is_appended_after_the_generation_prompt():
    text = ChatTemplate(CHATML, "", "").render(request(messages=[{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello"}]))
    assert text.endswith("<|im_start|>assistant\nHello")


def test_a_system_message_after_the_first_reply_stays_in_place_where_the_template_allows():
    text = ChatTemplate(CHATML, "", "").render(request(messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "ok"},
        {"role": "system", "content": "agents"}, {"role": "user", "content": "b"}]))
    assert text.index("assistant\nok") < text.index("system\nagents") < text.index("user\nb")


def test_system_messages_before_the_first_reply_go_before_the_system_prompt_ahead_of_the_users_words():
    first_turn = [{"role": "user", "content": "a"}, {"role": "system", "content": "agents"}]
    text = ChatTemplate(CHATML, "", "").render(request(system="S", messages=first_turn))
    assert text.startswith("<|im_start|>system\nagents\n\nS<|im_end|>\n<|im_start|>user\na<|im_end|>")
    # the next turn renders the same prefix, so its KV cache is reused
    later = ChatTemplate(CHATML, "", "").render(request(system="S", messages=first_turn + [
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "b"}]))
    assert later.startswith(text)


def test_user_messages_that_only_a_system_message_kept_apart_become_one_turn():
    text = ChatTemplate(STRICT, "", "").render(request(system="S", messages=[
        {"role": "user", "content": "a"}, {"role": "system", "content": "agents"}, {"role": "user", "content": "b"}]))
    assert text == "[system]agents\n\nS[user]a\n\nb[assistant]"


def test_a_conversation_of_system_messages_only_is_rendered_as_sent():
    text = ChatTemplate(CHATML, "", "").render(request(messages=[{"role": "system", "content": "x"}]))
    assert text == "<|im_start|>system\nx<|im_end|>\n<|im_start|>assistant\n"


def test_a_later_system_message_folds_into_the_user_turn_before_it_and_stays_there_next_turn():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "b"}, {"role": "system", "content": "note"}]
    text = ChatTemplate(STRICT, "", "").render(request(messages=turns))
    assert text == "[user]a[assistant]ok[user]b\n\nnote[assistant]"
    later = ChatTemplate(STRICT, "", "").render(request(messages=turns + [
        {"role": "assistant", "content": "fine"}, {"role": "user", "content": "c"}]))
    assert later.startswith(text)


def test_a_conversation_the_template_refuses_is_a_400():
    picky = "{% if messages|length > 1 %}{{ raise_exception('No user query found in messages.') }}{% endif %}"
    with pytest.raises(protocol.ApiError) as refused:
        ChatTemplate(picky, "", "").render(request(messages=[{"role": "user", "content": "a"}, {
            "role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]))
    assert refused.value.status == 400 and "No user query found" in refused.value.message


def test_a_template_that_refuses_it_gets_it_folded_into_the_next_user_turn():
    text = ChatTemplate(STRICT, "", "").render(request(system="S", messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "ok"},
        {"role": "system", "content": "agents"}, {"role": "user", "content": "b"}]))
    assert text == "[system]S[user]a[assistant]ok[user]agents\n\nb[assistant]"


def test_without_a_template_turns_are_labelled_and_the_next_user_label_ends_the_turn():
    template = ChatTemplate(None, "", "")
    text = template.render(request(system="S", messages=[{"role": "user", "content": "Hi"}]))
    assert text == "S\n\nUser: Hi\n\nAssistant:"
    assert "\nUser:" in template.end_strings


def test_tools_are_described_before_the_system_text_and_rendering_is_stable():
    body = dict(system="S", tools=[{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
                messages=[{"role": "user", "content": "Hi"}])
    template = ChatTemplate(CHATML, "", "")
    text = template.render(request(**body))
    assert text.index("get_weather") < text.index("\nS<|im_end|>")
    assert text == template.render(request(**body))


def test_tool_calls_and_results_in_the_history_are_rendered_as_text():
    text = ChatTemplate(CHATML, "", "").render(request(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"}]}]))
    assert '<tool_call>{"name": "w", "input": {"c": "Oslo"}}</tool_call>' in text
    assert '<tool_result id="toolu_1">rain</tool_result>' in text


def test_templates_are_sandboxed(caplog):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    assert ChatTemplate(evil, "", "").render(request(messages=[{"role": "user", "content": "x"}])) == "User: x\n\nAssistant:"
    assert "__class__" in caplog.text and "unsafe" in caplog.text  # refused at start: labelled turns instead
    later = "{% if messages|length > 1 %}" + evil + "{% endif %}"
    with pytest.raises(protocol.ApiError) as refused:
        ChatTemplate(later, "", "").render(request(messages=[{"role": "user", "content": "x"}, {
            "role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]))
    assert refused.value.status == 400 and "__class__" in refused.value.message and "unsafe" in refused.value.message


# --- admission --------------------------------------------------------------------------------------

def test_the_model_is_handed_out_first_come_first_served():
    turns, order = Turns(max_queue=8), []
    first = turns.reserve()
    turns.acquire(first, lambda: False)
    tickets = [turns.reserve() for _ in range(3)]

    def wait(i):
        turns.acquire(tickets[i], lambda: False)
        order.append(i)
        tickets[i].close()
    threads = [threading.Thread(target=wait, args=(i,)) for i in (2, 0, 1)]
    for t in threads:
        t.start()
    first.close()  # whenever each thread gets to wait, the queue's order is the reservations'
    for t in threads:
        t.join(60)
    assert order == [0, 1, 2]


def test_a_full_queue_answers_529_and_a_cancelled_waiter_gives_up_its_place():
    turns = Turns(max_queue=1)
    holder = turns.reserve()
    turns.acquire(holder, lambda: False)
    waiter = turns.reserve()
    with pytest.raises(protocol.ApiError) as info:
        turns.reserve()
    assert info.value.status == 529 and info.value.error_type == "overloaded_error"
    with pytest.raises(ClientGone):
        turns.acquire(waiter, lambda: True)
    waiter.close()
    assert turns.waiting == 0
    holder.close()
    assert turns.reserve()


def test_an_idle_model_admits_a_request_even_with_no_queue():
    assert Turns(max_queue=0).reserve()


# --- context past the training length ------------------------------------------------------------------

def test_yarn_scaling_applies_only_past_the_training_context_and_can_be_turned_off():
    from engine import default_model_path, rope_scaling
    path = default_model_path()  # trained on 8,192 tokens, no rope scaling of its own
    assert rope_scaling(path, 8192, yarn=True) == {}
    assert rope_scaling(path, 32768, yarn=False) == {}
    scaled = rope_scaling(path, 32768, yarn=True)
    assert scaled["rope_freq_scale"] == 0.25 and scaled["yarn_orig_ctx"] == 8192
