"""Prefix reuse: what the cache gives back must equal a fresh evaluation, and be reported in usage."""

import pytest

import engine as engine_module
import protocol
from engine import ClientGone
from prompt_cache import StateCache

STORY = "Here is a story. " + " ".join(f"Sentence number {i} is about a cat named Tom." for i in range(60))


def run(engine, text, max_tokens=8, cancelled=lambda: False):
    request = protocol.parse_messages_request({"model": "m", "max_tokens": max_tokens, "temperature": 0,
                                               "messages": [{"role": "user", "content": text}]})
    with engine.submit(request, cancelled) as job:
        events = list(job)
    return "".join(e.text for e in events[:-1]), events[-1]


def fresh(engine, text):
    engine._forget()
    return run(engine, text)


def test_the_next_turn_reuses_the_previous_prompt_and_answers_as_a_fresh_evaluation(engine):
    expected, _ = fresh(engine, STORY + " What is the cat called?")
    run(engine, STORY)
    text, finish = run(engine, STORY + " What is the cat called?")
    assert finish.cache_read_input_tokens > 600
    assert finish.input_tokens + finish.cache_read_input_tokens == engine.count_tokens(
        protocol.parse_messages_request({"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": STORY + " What is the cat called?"}]}))
    assert text == expected


def test_returning_to_a_conversation_after_another_restores_its_saved_state(engine):
    expected, _ = fresh(engine, STORY + " Is Tom happy?")
    run(engine, STORY)
    run(engine, "Tell me about dogs.")  # a side request: the story's state is saved, not lost
    text, finish = run(engine, STORY + " Is Tom happy?")
    assert finish.cache_read_input_tokens > 600
    assert text == expected


def test_a_side_request_right_after_a_long_prompt_copies_no_state(engine, monkeypatch):
    """The prompt's state is copied while it is evaluated; the side request's cut then finds it
    saved and copies nothing, so nothing sits between it and its first token."""
    expected, _ = fresh(engine, STORY + " Who is Tom?")
    run(engine, STORY)
    copies = []
    real_copy = engine_module.llama_cpp.llama_state_seq_get_data
    monkeypatch.setattr(engine_module.llama_cpp, "llama_state_seq_get_data",
                        lambda *args: copies.append(args) or real_copy(*args))
    run(engine, "What is the capital of France?")
    text, finish = run(engine, STORY + " Who is Tom?")
    assert copies == []
    assert finish.cache_read_input_tokens > 600 and text == expected


def test_a_cancelled_prompt_evaluation_leaves_a_prefix_that_a_retry_reuses(engine):
    engine._forget()
    # a story no saved state begins with: what the retry reuses can only be what the cut left
    long_story = "Another story. " + STORY + " " + STORY

    def cancel_after_first_batch():
        return len(engine._kv_tokens) > 0
    with pytest.raises(ClientGone):
        run(engine, long_story, cancelled=cancel_after_first_batch)
    _, finish = run(engine, long_story)
    assert finish.cache_read_input_tokens >= engine_module.PROMPT_BATCH


def test_saved_states_are_evicted_least_recently_used_first_within_the_budget():
    cache = StateCache(budget=10)
    cache.put((1, 2), bytearray(4))
    cache.put((3, 4), bytearray(4))
    cache.get((1, 2))
    cache.put((5, 6), bytearray(4))
    assert cache.longest_prefix((3, 4))[1] == 0 and cache.longest_prefix((1, 2, 9)) == ((1, 2), 2)


def test_a_state_extended_by_a_newer_one_is_dropped():
    cache = StateCache(budget=100)
    cache.put((1, 2), bytearray(4))
    cache.put((1, 2, 3), bytearray(4))
    assert len(cache) == 1 and cache.longest_prefix((1, 2))[0] == (1, 2, 3)


def test_a_new_conversation_with_the_same_tools_system_and_agent_list_evaluates_only_the_users_words(engine):
    """Claude Code's shape: tools, system blocks (the billing line first), the user's words, then a
    system message with the agent list. Only the billing line and the words differ."""
    def first_turn(billing, words):
        return protocol.parse_messages_request({
            "model": "m", "max_tokens": 2, "temperature": 0,
            "system": [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.197.{billing};"},
                       {"type": "text", "text": "You are a coding agent. " + STORY[:800]}],
            "tools": [{"name": f"tool_{i}", "description": STORY[i * 60:i * 60 + 300],
                       "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
                      for i in range(4)],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>ok</system-reminder>"},
                                                      {"type": "text", "text": words}]},
                         {"role": "system", "content": "Agents: " + STORY[:1500]}]})

    def answer(request):
        with engine.submit(request, lambda: False) as job:
            return list(job)[-1]

    answer(first_turn("a1f", "Summarize the project."))
    finish = answer(first_turn("7c2", "Which tests are slow?"))
    assert finish.cache_read_input_tokens > 1000
    assert finish.input_tokens < 20  # the words and the start of the assistant's turn
