"""`make bench`, second part: Claude Code's first turn on a 2-core CPU, and prompt evaluation by depth.

The request is synthesized here with the size and shape Claude Code 2.1.197 sends (CLAUDE_CODE_TRAFFIC.md
§3-4, re-checked against a capture of our own): 24 tools with JSON schemas (~70 KB), three system
blocks (the billing line first, then 62 and ~5,600 characters with `cache_control`), a user turn of a
`<system-reminder>` block and the user's words, then a `system` message with the agent list (~6 KB),
`thinking: adaptive`, `context_management`, `output_config`, `metadata`, streaming. Its prose is
generated from a fixed seed, so every run sends the same ~20,000 tokens; only the user's words and the
billing line change between conversations, as they do in Claude Code. `max_tokens` is 64 instead of
32,000: the figures are times to the first token, and a shorter reply only shortens the run.

Reported, each the time to the first non-empty content delta of a real server (a subprocess, as a
user starts it, --ctx 32768):
- cold: a fresh server with an empty cache folder;
- a second conversation in the same folder (target <= 15 s);
- a third conversation after a restart of the server, from the disk cache (target <= 15 s);
- then one in another folder (the system prompt differs from its environment section on);
the server's peak RSS and the disk cache's size; and, through the engine in a worker process, prompt evaluation tokens/s at several depths for the
default model and Gemma 3 270M (a sliding-window architecture).
"""

import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from bench import peak_rss_mb  # noqa: E402  (the tests folder is on the path from here on)
from e2e_claude_code import start_server, stop_server  # noqa: E402

CTX = 32768
THREADS = os.cpu_count() or 1
TARGET_SECONDS = 15
DEPTHS = (0, 4096, 8192, 14336, 18432)  # batch boundaries near 0, 4k, 8k, 14k, 18k
DEPTH_PROMPT_TOKENS = 19000
WORDS = ("the a an of to in for on with from by file path line command output input value option tool "
         "agent task user model code test change search pattern result error read write edit run shell "
         "directory project repository branch commit diff string number list object field name when "
         "before after only always never must should may use call return check keep prefer avoid "
         "instead unless each every other first last new existing current relative absolute exact "
         "multiple single specific allowed required optional default timeout limit offset content "
         "matches lines files changes tests errors results tools agents commands notes").split()
# Claude Code's prompt is dense with code: paths, flags, identifiers (about 4 characters a token)
TERMS = ("`git status`", "--no-verify", "e.g.", "(default: 120000ms)", "`/tmp/x.py`", "CLAUDE.md", "`npm test`",
         "JSON", "`rg -n`", "<example>", "</example>", "`old_string`", "`replace_all`", "**IMPORTANT**", "1-2",
         "`TodoWrite`", "~/.config", "`cd`", "`&&`", "HTTP(S)", "`*.ts`", "{{name}}", "`PR #123`", "2000")


# ---------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------

def prose(rng, n_words):
    """Sentences of plausible instruction-like English, so the tokenizer sees ordinary text."""
    sentences, left = [], n_words
    while left > 0:
        n = min(left, rng.randint(6, 18))
        words = [rng.choice(TERMS) if rng.random() < 0.25 else rng.choice(WORDS) for _ in range(n)]
        sentences.append(" ".join(words).capitalize() + rng.choice((".", ".", ".", ":", ";")))
        left -= n
    return " ".join(sentences)


def tool(rng, i):
    """One tool of Claude Code's kind: a long description and a schema of a few typed properties."""
    properties = {}
    for j in range(rng.randint(2, 6)):
        kind = rng.choice(("string", "string", "integer", "boolean", "array", "enum"))
        description = prose(rng, rng.randint(8, 30))
        if kind == "array":
            prop = {"type": "array", "items": {"type": "string"}, "description": description}
        elif kind == "enum":
            prop = {"type": "string", "enum": [rng.choice(WORDS) + str(k) for k in range(3)],
                    "description": description}
        else:
            prop = {"type": kind, "description": description}
        properties[f"{rng.choice(WORDS)}_{j}"] = prop
    return {"name": f"Tool{i}{rng.choice(WORDS).capitalize()}",
            "description": prose(rng, rng.randint(80, 390)),
            "input_schema": {"type": "object", "properties": properties,
                             "required": sorted(properties)[:1], "additionalProperties": False,
                             "$schema": "http://json-schema.org/draft-07/schema#"}}


def claude_code_request(user_words, billing, folder="/home/user/project"):
    """A Claude Code first turn; everything but `user_words`, `billing` and `folder` is the same in
    every call. As in Claude Code, the folder is named in an environment section near the end of the
    long system block."""
    rng = random.Random(2197)
    tools = [tool(rng, i) for i in range(24)]
    cached = {"type": "ephemeral"}
    system = [
        {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.197.{billing}; cc_entrypoint=sdk-cli;"},
        {"type": "text", "text": "You are a command line coding agent, working in the user's folder.",
         "cache_control": cached},
        {"type": "text", "text": f"{prose(rng, 560)}\n\n# Environment\nWorking directory: {folder}\n"
                                 f"Is a git repository: true\nPlatform: linux\n\n{prose(rng, 150)}",
         "cache_control": cached},
    ]
    reminder = f"<system-reminder>\n{prose(rng, 45)}\n</system-reminder>"
    agents = "Available agent types:\n" + "\n".join(f"- agent{k}: {prose(rng, 35)}" for k in range(20))
    return {
        "model": "local-model",
        "max_tokens": 64,
        "stream": True,
        "system": system,
        "tools": tools,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": reminder},
                                         {"type": "text", "text": user_words, "cache_control": cached}]},
            {"role": "system", "content": agents},
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": json.dumps({"device_id": "0" * 64, "session_id": f"bench-{billing}"})},
    }


# ---------------------------------------------------------------------------------------------------
# Conversations with the server
# ---------------------------------------------------------------------------------------------------

def first_token(port, body):
    """(seconds to the first non-empty content delta, final usage) of one streamed request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    started = time.perf_counter()
    connection.request("POST", "/v1/messages?beta=true", json.dumps(body),
                       {"content-type": "application/json", "anthropic-version": "2023-06-01"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    first, usage = None, None
    for line in response:
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        delta = event.get("delta", {})
        if first is None and event["type"] == "content_block_delta" and any(
                delta.get(k) for k in ("text", "thinking", "partial_json")):
            first = time.perf_counter() - started
        if event["type"] == "message_delta":
            usage = event["usage"]
    connection.close()
    if first is None:
        raise SystemExit(f"no content in the reply (usage {usage})")
    return first, usage


def measure_conversations(workdir):
    """Runs the server as a user runs it for Claude Code (--ctx 32768), with a cache folder in
    `workdir`, and stops it with SIGTERM (in-flight work and disk writes finish first) to restart it."""
    cache_dir = os.path.join(workdir, "prompt-cache")
    server, port = start_server(CTX, workdir, ["--threads", str(THREADS)])
    try:
        cold, cold_usage = first_token(port, claude_code_request("Summarize what this project does.", "a1f"))
        second, second_usage = first_token(port, claude_code_request("List the tests that are slow and why.", "7c2"))
        rss_mb = peak_rss_mb(server.pid)
    finally:
        stop_server(server)
    server, port = start_server(CTX, workdir, ["--threads", str(THREADS)])
    try:
        restarted, restarted_usage = first_token(port, claude_code_request("Which files handle the network?", "e05"))
        elsewhere, elsewhere_usage = first_token(
            port, claude_code_request("What does the parser do?", "b39", folder="/home/user/other-project"))
    finally:
        stop_server(server)
    disk_mb = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir)) / 2**20
    return [("cold (fresh server, empty cache)", cold, cold_usage, None),
            ("second conversation, same folder", second, second_usage, TARGET_SECONDS),
            ("third conversation after a restart (disk)", restarted, restarted_usage, TARGET_SECONDS),
            ("a conversation in another folder", elsewhere, elsewhere_usage, None)], disk_mb, rss_mb


# ---------------------------------------------------------------------------------------------------
# Prompt evaluation by depth, through the engine the server uses
# ---------------------------------------------------------------------------------------------------

def depth_worker(model_path):
    """Evaluates DEPTH_PROMPT_TOKENS of the request's text in the engine's batches and prints the
    time each batch began (the engine asks `cancelled()` once before each batch)."""
    from config import Config
    from engine import PROMPT_BATCH, Engine, Sampling
    from protocol import parse_messages_request
    engine = Engine(Config(model=model_path, ctx=CTX, threads=THREADS, cache_ram=0, cache_disk=0))
    body = claude_code_request("Depth.", "000")
    text = json.dumps(body["tools"]) + json.dumps(body["system"]) + json.dumps(body["messages"])
    # ~1.4 times the request: past DEPTH_PROMPT_TOKENS in either tokenizer, within the context
    request = parse_messages_request({"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": text + text[:len(text) * 2 // 5]}]})
    prompt = engine._prepare(request)  # below the request level: the prompt is cut to a token count
    prompt = replace(prompt, tokens=prompt.tokens[:DEPTH_PROMPT_TOKENS])
    marks = []
    for _ in engine._run(engine._turns.reserve(), prompt, Sampling(max_tokens=1),
                         lambda: marks.append(time.perf_counter())):
        pass
    batches = len(range(0, len(prompt.tokens), PROMPT_BATCH))
    rates = {d: PROMPT_BATCH / (marks[d // PROMPT_BATCH + 1] - marks[d // PROMPT_BATCH]) for d in DEPTHS
             if d // PROMPT_BATCH + 1 < batches}
    print(json.dumps({"rates": rates, "tokens": len(prompt.tokens), "seconds": marks[batches] - marks[0]}))


def measure_depths():
    from model_fixtures import gemma3_path
    models = [("default (SmolLM2 135M)", None),
              ("Gemma 3 270M", gemma3_path(os.path.join(tempfile.gettempdir(), "llama-compat-test-models")))]
    results = []
    for name, path in models:
        out = subprocess.run([sys.executable, __file__, "--depth-worker", path or ""], check=True,
                             capture_output=True, text=True).stdout
        results.append((name, json.loads(out.strip().splitlines()[-1])))
    return results


def main():
    workdir = tempfile.mkdtemp(prefix="llama-compat-bench-")
    try:
        conversations, disk_mb, rss_mb = measure_conversations(workdir)
        depths = measure_depths()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nClaude Code first turn (synthesized, ~20k tokens, 24 tools): --ctx {CTX}, {THREADS} threads")
    print(f"{'figure':44} {'TTFT s':>8} {'prompt':>7} {'reused':>7}  target")
    for name, seconds, usage, target in conversations:
        prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
        verdict = "" if target is None else f"<= {target} s: " + (
            "met" if seconds <= target else f"missed by {seconds - target:.1f} s")
        print(f"{name:44} {seconds:8.1f} {prompt:7} {usage['cache_read_input_tokens']:7}  {verdict}")
    cold = conversations[0][1]
    print(f"cold / second conversation: {cold / conversations[1][1]:.0f}x; "
          f"cold / after restart: {cold / conversations[2][1]:.0f}x")
    print(f"server peak RSS over the first two conversations: {rss_mb:.0f} MB; disk cache used: {disk_mb:.0f} MB")
    print(f"\nprompt evaluation, tokens/s by depth (engine batches of 512, ctx {CTX}):")
    print(f"{'model':24} " + " ".join(f"{d:>7}" for d in DEPTHS) + f" {'total':>16}")
    for name, result in depths:
        rates = " ".join(f"{result['rates'].get(str(d), float('nan')):7.0f}" for d in DEPTHS)
        print(f"{name:24} {rates} {result['tokens']:6} in {result['seconds']:5.0f} s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--depth-worker"]:
        depth_worker(sys.argv[2] or None)
    else:
        main()
