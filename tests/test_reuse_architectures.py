"""Cutting the KV cache back to a shared prefix must answer exactly as a fresh evaluation, on the
default model (full attention) and on Gemma 3 270M (sliding-window attention, window 512), for cuts
inside and outside the window. The window layers keep only their window, so a cut the cache cannot
serve must fall back to evaluation rather than answer wrongly; a checkpoint taken just before the
prompt's end gives back what the window no longer can."""

import os
import random

import llama_cpp
import numpy
import pytest

import protocol
from conftest import make_config
from engine import CHECKPOINT_BACK, Engine, Prompt, Sampling, prompt_batches
from model_fixtures import TINY_MODELS, gemma3_path, tiny_model_path, with_chat_template

# Unpredictable text: a formulaic one lets a model continue correctly from its full-attention layers
# alone, which hides a broken sliding-window cache (measured: this text exposes it at a 900-token cut).
_rng = random.Random(7)
_WORDS = "river stone lamp velvet orbit canyon mint harbor quartz ember falcon meadow cobalt saffron tundra violin"
TEXT = "Notes: " + " ".join(f"{_rng.choice(_WORDS.split())} {_rng.choice(_WORDS.split())}, {_rng.randint(10, 99)}."
                            for _ in range(300))
TURN = " In summary, the notes"


@pytest.fixture(scope="module")
def model(request, model_cache):
    if request.param == "default":
        return Engine(make_config(ctx=4096))
    return Engine(make_config(model=gemma3_path(model_cache), ctx=4096))


def greedy(engine, tokens):
    # token by token, below the request level: the engine's own run of a prompt given as tokens
    events = list(engine._run(engine._turns.reserve(), Prompt(tuple(tokens), (), ()),
                              Sampling(max_tokens=12, temperature=0), lambda: False))
    return "".join(e.text for e in events[:-1]), events[-1]


# Reuse evaluates the new tokens in a small batch, on cache cells in another order, where a fresh
# evaluation has them in one large batch: llama.cpp's kernels then round differently (next-token
# logits differed by up to 1.6 here, on both models) and a greedy answer can part at a near-tie
# after a few words (seen on an AVX2 machine, not on another). A wrong cache changes the choices the
# model is sure of: each of those must agree. Choices count as sure past this logit margin.
SURE_MARGIN = 1.0


def forced_logits(engine, prompt, answer=None, steps=24, fresh=False):
    """Next-token logits after `prompt` and after each token of `answer` fed in (None: the greedy
    answer of `steps` tokens), with the engine's own prefix reuse, or (`fresh`) none at all: the
    prompt evaluated from nothing, no state kept; returns (logits, the answer, prompt tokens reused)."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(engine._vocab)

    def last():
        return numpy.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(engine._ctx, -1), shape=(n_vocab,)).copy()

    with engine._turns.reserve() as ticket:
        engine._turns.acquire(ticket, lambda: False)
        if fresh:  # in the engine's own batches, so that only reuse can make a difference
            engine._forget()
            marks = {len(prompt) - CHECKPOINT_BACK} if engine._checkpoints else set()
            for start, end in prompt_batches(0, len(prompt), marks):
                engine._decode(prompt[start:end])
            reused = 0
        else:
            reused = engine._evaluate(tuple(prompt), lambda: False)
        rows, fed = [last()], []
        while len(rows) < (steps if answer is None else len(answer) + 1):
            fed.append(int(rows[-1].argmax()) if answer is None else answer[len(fed)])
            engine._decode(fed[-1:])
            rows.append(last())
    return numpy.array(rows), fed, reused


def assert_same_greedy_answer(logits, fresh):
    """Greedy choices after reuse equal a fresh evaluation's wherever the fresh one is sure (a near
    tie may flip with the order of the arithmetic), and it is sure often enough to mean something."""
    top2 = numpy.sort(fresh, axis=1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > SURE_MARGIN
    assert sure.sum() >= 8
    assert (logits.argmax(axis=1) == fresh.argmax(axis=1))[sure].all()


# a small cut on full attention is test_cache.py's everyday case; here the large one
@pytest.mark.slow
@pytest.mark.parametrize("model, cut_back", [("default", 900), ("gemma3", 64), ("gemma3", 900)], indirect=["model"],
                         ids=["default-far", "gemma3-inside-window", "gemma3-outside-window"])
def test_reuse_after_a_cut_answers_as_a_fresh_evaluation(model, cut_back):
    tokens = list(model._llm.tokenize(TEXT.encode(), add_bos=True, special=False))
    assert len(tokens) > 1500
    turn = model._llm.tokenize(TURN.encode(), add_bos=False, special=False)
    prompt = tokens[:len(tokens) - cut_back] + turn
    fresh, answer, _ = forced_logits(model, prompt, fresh=True)
    greedy(model, tokens)  # the cache now holds the whole text
    logits, _, reused = forced_logits(model, prompt, answer)
    assert reused in (0, len(tokens) - cut_back)  # a prefix served from the cache, or none at all
    if model._n_swa == 0 or cut_back < 512 - 64:
        assert reused == len(tokens) - cut_back
    if model._n_swa and cut_back > 512:
        assert reused == 0  # the window layers no longer hold what the new tokens must see
    if reused == 0:
        assert (logits == fresh).all()  # evaluated afresh: the same arithmetic, bit for bit
    assert_same_greedy_answer(logits, fresh)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma3", "mamba", "lfm2"])
def test_a_reply_longer_than_the_window_still_leaves_its_prompt_reusable(arch, model_cache):
    """The next turn parts from the live state just inside the last prompt (as when a template drops
    the reasoning its generation prompt opened), after a reply longer than Gemma 3's 512-token window.
    The live state cannot be cut back that far on a window: only the checkpoint taken just before the
    prompt's end gives that prefix back, even after a side request in between. On full attention the
    saved live state does (test_cache.py). A recurrent state (Mamba) or a hybrid one (LFM2's
    convolution layers) cannot be cut back at all: the same checkpoint."""
    model = tiny_model_path(model_cache, arch) if arch in TINY_MODELS else gemma3_path(model_cache)
    served, reference = (Engine(make_config(model=model, ctx=4096)) for _ in range(2))
    tokens = list(served._llm.tokenize(TEXT.encode(), add_bos=True, special=False))
    prompt, reply = tokens[:700], tokens[700:1500]
    turn = prompt[:-3] + served._llm.tokenize(TURN.encode(), add_bos=False, special=False)
    fresh, answer, _ = forced_logits(reference, turn, fresh=True)
    greedy(served, prompt)  # the prompt evaluated, then answered
    greedy(served, prompt + reply)  # a long reply now in the live state
    greedy(served, served._llm.tokenize(b"A side request about cats.", add_bos=True, special=False))
    logits, _, reused = forced_logits(served, turn, answer)
    assert reused == len(prompt) - CHECKPOINT_BACK
    assert_same_greedy_answer(logits, fresh)
    served.close()
    reference.close()


@pytest.mark.slow
def test_a_template_that_moves_the_tools_before_the_last_user_turn_gets_a_checkpoint_there(model_cache):
    """Mistral Nemo's real template puts the system prompt and the tools just before the last user
    message, so the next turn parts from this one before its last user turn, far from its end. On a
    recurrent memory only a checkpoint there gives that prefix back."""
    from test_real_templates import TEMPLATES
    if "mistralai-Mistral-Nemo-Instruct-2407" not in TEMPLATES:
        pytest.skip("llama.cpp's templates come from the llama-cpp-python sdist, which is not downloaded")
    path = os.path.join(model_cache, "mamba-mistral-nemo.gguf")
    if not os.path.exists(path):
        with_chat_template(tiny_model_path(model_cache, "mamba"), path, TEMPLATES["mistralai-Mistral-Nemo-Instruct-2407"])
    served, reference = (Engine(make_config(model=path, ctx=4096)) for _ in range(2))
    history = [{"role": "user", "content": TEXT[:1200]}, {"role": "assistant", "content": TEXT[1200:1800]},
               {"role": "user", "content": "Which words come back most often?"}]
    tools = [{"name": "count", "description": "Counts a word.",
              "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}}}]

    def request(messages):
        return protocol.parse_messages_request({"model": "m", "max_tokens": 4, "temperature": 0, "tools": tools,
                                                "system": "You count words.", "messages": messages})
    first = served._prepare(request(history))
    assert first.parts_at is not None and first.parts_at < len(first.tokens) - 50  # tools, system, question
    with served.submit(request(history), lambda: False) as job:
        reply = "".join(getattr(event, "text", "") for event in job)
    turn = served._prepare(request(history + [{"role": "assistant", "content": reply or "."},
                                              {"role": "user", "content": "And the rarest?"}])).tokens
    assert turn[:first.parts_at] == first.tokens[:first.parts_at]
    assert turn[:first.parts_at + 1] != first.tokens[:first.parts_at + 1]  # parted right there
    fresh, answer, _ = forced_logits(reference, turn, fresh=True)
    logits, _, reused = forced_logits(served, turn, answer)
    assert reused == first.parts_at
    assert_same_greedy_answer(logits, fresh)
    served.close()
    reference.close()
