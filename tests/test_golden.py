"""One golden answer: the default model's temperature-0 reply to a fixed request, byte for byte, and
the exact prompt length it was rendered to. A change of rendering, tokenization or sampling that
alters answers fails here even when every other test still passes.

The answer stops before the model's first near-tie: each of its tokens won by a logit margin of at
least 1.75, so llama.cpp's rounding on another CPU does not change it (after the sixth token the
margin falls to 0.3).

When a change is meant to alter answers (a new llama.cpp, a new default model, a new rendering),
refresh the figures: `.venv/bin/python tests/test_golden.py` prints them from the current code.
"""

import anthropic
import pytest

from sse_grammar import sdk_client

# temperature rides in extra_body: this SDK's create() no longer takes it as a keyword
REQUEST = {"model": "m", "max_tokens": 6, "extra_body": {"temperature": 0},
           "messages": [{"role": "user", "content": "Name the three primary colors."}]}
ANSWER = "The three primary colors are:"
INPUT_TOKENS = 36


@pytest.fixture(scope="module")
def client(served):
    return sdk_client(served.url)


def test_the_default_model_gives_its_golden_answer(client):
    message = client.messages.create(**REQUEST)
    assert (message.content[0].text, message.usage.input_tokens + message.usage.cache_read_input_tokens) == (
        ANSWER, INPUT_TOKENS)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 6


if __name__ == "__main__":
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from conftest import Running, make_config

    from engine import Engine
    running = Running(Engine(make_config()))
    message = anthropic.Anthropic(base_url=running.url, api_key="unused").messages.create(**REQUEST)
    print(f"ANSWER = {message.content[0].text!r}\n"
          f"INPUT_TOKENS = {message.usage.input_tokens + message.usage.cache_read_input_tokens}")
    running.stop()
