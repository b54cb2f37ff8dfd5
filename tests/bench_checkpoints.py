"""`make bench`, part 3: the next turn after a long reasoning reply, per architecture.

A conversation under DeepSeek-R1-Distill's real chat template (its generation prompt opens the
reasoning; earlier turns' reasoning is dropped from the history): a ~1,200-token first prompt, a
1,100-token reply, then the next turn. Its time to the first token is compared with a cold
evaluation of the same prompt by a fresh engine, in one run. On a sliding window (Gemma 3) only the
checkpoint before the first prompt's end makes the next turn cheap; likewise on a recurrent or hybrid
memory (random-weight models built the way the tests build theirs, but of a real small model's size,
so that a cold evaluation costs what it would: a 2-layer model evaluates a whole prompt in the time
llama.cpp takes to set up a batch). About 4 minutes on 2 cores, and ~1 GB of models written once.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import protocol  # noqa: E402
from conftest import make_config  # noqa: E402
from engine import Engine  # noqa: E402
from model_fixtures import default_model_path, gemma3_path, tiny_model_path, with_chat_template  # noqa: E402
from test_real_templates import TEMPLATES  # noqa: E402

TEMPLATE = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"
FACTS = " ".join(f"Fact {i}: river {i} flows north past {i * 7} stones." for i in range(60))
FIRST = [{"role": "user", "content": FACTS + "\n\nWhich river passes 42 stones?"}]
NEXT = FIRST + [{"role": "assistant", "content": "River 6."}, {"role": "user", "content": "And 49?"}]


# Mamba 130M's shape, and an LFM2 between its 350M model and SmolLM2 in size: 6 of 16 layers attention.
MAMBA = dict(seed=7, n_embd=768, n_layer=24, d_inner=1536, d_state=16, d_conv=4, dt_rank=48)
LFM2 = dict(seed=7, n_embd=768, n_layer=16, n_head=12, n_ff=2048, l_cache=3,
            n_head_kv=tuple(4 if i in (2, 5, 8, 10, 12, 14) else 0 for i in range(16)))


def answer(engine, messages, max_tokens):
    request = protocol.parse_messages_request({"model": "m", "max_tokens": max_tokens, "temperature": 0,
                                               "messages": messages})
    started = time.perf_counter()
    with engine.submit(request, lambda: False) as job:
        events = list(job)
    return time.perf_counter() - started, events[-1]


def measure(label, source):
    folder = tempfile.mkdtemp()
    path = with_chat_template(source, os.path.join(folder, "model.gguf"), TEMPLATES[TEMPLATE])
    cold_engine = Engine(make_config(model=path, ctx=4096))
    cold, _ = answer(cold_engine, NEXT, 1)
    cold_engine.close()
    engine = Engine(make_config(model=path, ctx=4096))
    _, first = answer(engine, FIRST, 1100)
    warm, finish = answer(engine, NEXT, 1)
    engine.close()
    print(f"| {label} | {first.input_tokens} + {first.output_tokens} | {cold:.2f} s | {warm:.2f} s "
          f"({finish.cache_read_input_tokens} reused) | {cold / warm:.1f}x |", flush=True)


def main():
    cache = os.path.join(tempfile.gettempdir(), "llama-compat-test-models")
    print("| model | first prompt + reply tokens | next turn cold | next turn after the reply | speed-up |")
    print("|---|---|---|---|---|")
    measure("SmolLM2 135M (full attention)", default_model_path())
    measure("Gemma 3 270M (sliding window 512)", gemma3_path(cache))
    measure("Mamba 130M shape, random weights (recurrent)", tiny_model_path(cache, "mamba", MAMBA))
    measure("LFM2 137M, random weights (hybrid: convolution + attention)", tiny_model_path(cache, "lfm2", LFM2))


if __name__ == "__main__":
    main()
