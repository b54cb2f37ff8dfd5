"""`make bench`, third part: the server's speed when other work shares the cores.

For each thread setting (OpenMP's wait policy and spin count, threads while generating and while
evaluating a prompt), the server is started as a user would start it and measured (a) alone, (b) while
a plain busy loop runs, and (c) while a second server with the same setting serves a stream of
requests. Decode speed is the rate of streamed text deltas of one answer; prompt speed is prompt
tokens over the time to the first token of a fresh ~300-token prompt. Every figure is printed as a
ratio to the same setting alone in this run, and to the spinning default alone, so machine noise
between runs does not enter the comparison.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench import DECODE_PROMPT, free_port, start_server, stream, user

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = os.cpu_count() or 1
# (label, environment, --threads, --threads-batch; 0 is the server's default). GOMP_SPINCOUNT=300000
# is what libgomp spins when no wait policy is set (the default, named so it shows in the table).
SETTINGS = [
    ("OpenMP default (spin 300k), all cores", {"GOMP_SPINCOUNT": "300000"}, CORES, CORES),
    ("default: all cores while free, fewer while taken", {}, 0, 0),
    ("spin 10k, all cores", {"GOMP_SPINCOUNT": "10000"}, CORES, CORES),
    ("passive, all cores", {"OMP_WAIT_POLICY": "PASSIVE"}, CORES, CORES),
    ("passive, one less generating", {"OMP_WAIT_POLICY": "PASSIVE"}, max(1, CORES - 1), CORES),
    ("passive, one less for both", {"OMP_WAIT_POLICY": "PASSIVE"}, max(1, CORES - 1), max(1, CORES - 1)),
]
CONDITIONS = ["alone", "busy loop", "second server"]
ROUNDS = 2
DECODE_TOKENS = 64
TIME_BOX = 20.0  # seconds a decode measurement may take; the stream is then left (and cancelled)


def start(env, threads, threads_batch, cache_dir):
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = start_server(port, cache_dir, "--ctx", "2048", "--threads", str(threads), "--threads-batch",
                        str(threads_batch), "--cache-ram", "0", env={**clean, **env})
    return proc, port


def measure(port, tag):
    decode, prompt = [], []
    for r in range(ROUNDS):
        _, arrivals, _ = stream(port, user(DECODE_PROMPT), DECODE_TOKENS, TIME_BOX)
        if len(arrivals) > 2 and arrivals[-1] > arrivals[0]:
            decode.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
        # a prompt no cache holds: its own number first
        text = f"Report {tag}-{r}-{time.time_ns()}. " + " ".join(f"Line {i} of the log says ok." for i in range(40))
        ttft, _, usage = stream(port, user(text), 1)
        if ttft and usage:
            prompt.append((usage["input_tokens"] + usage["cache_read_input_tokens"]) / ttft)
    return statistics.median(decode) if decode else 0.0, statistics.median(prompt) if prompt else 0.0


class Load:
    """Another server with the same setting, kept busy by one client until stopped."""

    def __init__(self, env, threads, threads_batch, cache_dir):
        self.proc, self.port = start(env, threads, threads_batch, cache_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        i = 0
        while not self._stop.is_set():
            i += 1
            stream(self.port, user(f"Tell me about the number {i}."), 48, time_box=30)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.proc.terminate()
        self.proc.wait()


def main():
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        for label, env, threads, threads_batch in SETTINGS:
            proc, port = start(env, threads, threads_batch, os.path.join(cache, "a"))
            try:
                measure(port, "warm-up")
                for condition in CONDITIONS:
                    other = None
                    if condition == "busy loop":
                        other = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    elif condition == "second server":
                        other = Load(env, threads, threads_batch, os.path.join(cache, "b"))
                    time.sleep(1)
                    try:
                        results[label, condition] = measure(port, label + condition)
                    finally:
                        if isinstance(other, Load):
                            other.stop()
                        elif other:
                            other.kill()
                            other.wait()
                    print(f"{label:40} {condition:14} decode {results[label, condition][0]:7.1f} tok/s  "
                          f"prompt {results[label, condition][1]:7.1f} tok/s", flush=True)
            finally:
                proc.terminate()
                proc.wait()
    base = results[SETTINGS[0][0], "alone"]
    print(f"\nSharing the machine ({CORES} cores): each figure / the same setting alone "
          f"[/ OpenMP default alone]\n")
    print("| setting | decode alone | prompt alone | " + " | ".join(
        f"decode, {c} | prompt, {c}" for c in CONDITIONS[1:]) + " |")
    print("|---" * (3 + 2 * (len(CONDITIONS) - 1)) + "|")
    for label, *_ in SETTINGS:
        alone = results[label, "alone"]
        cells = [f"{alone[0]:.1f} tok/s [{alone[0] / base[0]:.2f}]", f"{alone[1]:.0f} tok/s [{alone[1] / base[1]:.2f}]"]
        for condition in CONDITIONS[1:]:
            d, p = results[label, condition]
            cells += [f"{d / alone[0]:.2f} [{d / base[0]:.2f}]", f"{p / alone[1]:.2f} [{p / base[1]:.2f}]"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
