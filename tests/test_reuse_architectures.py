"""Cutting the KV cache back to a shared prefix must answer exactly as a fresh evaluation, on the
default model (full attention) and on Gemma 3 270M (sliding-window attention, window 512), for cuts
inside and outside the window. The window layers keep only their window, so a cut the cache cannot
serve must fall back to evaluation rather than answer wrongly."""

import random

import pytest

from engine import Engine, Prompt, Sampling
from model_fixtures import gemma3_path

# Unpredictable text: a formulaic one lets a model continue correctly from its full-attention layers
# alone, which hides a broken sliding-window cache (measured: this text exposes it at a 900-token cut).
_rng = random.Random(7)
_WORDS = "river stone lamp velvet orbit canyon mint harbor quartz ember falcon meadow cobalt saffron tundra violin"
TEXT = "Notes: " + " ".join(f"{_rng.choice(_WORDS.split())} {_rng.choice(_WORDS.split())}, {_rng.randint(10, 99)}."
                            for _ in range(300))
TURN = " In summary, the notes"


@pytest.fixture(scope="module", params=["default", "gemma3"])
def model(request, model_cache):
    if request.param == "default":
        return Engine(n_ctx=4096)
    return Engine(gemma3_path(model_cache), n_ctx=4096)


def greedy(engine, tokens):
    ticket = engine.reserve()
    events = list(engine.generate(ticket, Prompt(tuple(tokens), (), ()), Sampling(max_tokens=12, temperature=0),
                                  lambda: False))
    return "".join(e.text for e in events[:-1]), events[-1]


@pytest.mark.slow
@pytest.mark.parametrize("cut_back", [64, 900], ids=["inside-window", "outside-window"])
def test_reuse_after_a_cut_answers_as_a_fresh_evaluation(model, cut_back):
    tokens = list(model._llm.tokenize(TEXT.encode(), add_bos=True, special=False))
    assert len(tokens) > 1500
    turn = model._llm.tokenize(TURN.encode(), add_bos=False, special=False)
    prompt = tokens[:len(tokens) - cut_back] + turn
    model._forget()
    expected, _ = greedy(model, prompt)
    greedy(model, tokens)  # the cache now holds the whole text
    text, finish = greedy(model, prompt)
    assert text == expected
    reused = finish.cache_read_input_tokens
    assert reused in (0, len(tokens) - cut_back)  # a prefix served from the cache, or none at all
    if model._n_swa == 0 or cut_back < 512 - 64:
        assert reused == len(tokens) - cut_back
    if model._n_swa and cut_back > 512:
        assert reused == 0  # the window layers no longer hold what the new tokens must see
