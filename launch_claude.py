"""`python compat_server.py [server flags] claude [claude's own arguments]`: Claude Code on the local
model in one command.

Contract: finds the user's `claude`; makes sure a server answers at the configured address, starting
one with the same flags when none does (its log goes to a file) and stopping it when `claude` exits;
runs `claude` with the environment this server needs; returns `claude`'s exit code. It never loads
the model in its own process and passes the user's arguments to `claude` unchanged. Settings the user
already has in the environment win over ours, except where `claude` must reach this server.
"""

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time

SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat_server.py")
# Seconds a started server may take to answer (loading a large GGUF from a slow disk).
START_TIMEOUT = 300
# Claude Code (2.1.197, measured in issue 14) compacts a conversation early only when
# CLAUDE_CODE_AUTO_COMPACT_WINDOW is set, at CLAUDE_CODE_MAX_CONTEXT_TOKENS minus its output cap minus
# this many tokens (a model name starting with `claude-` ignores the setting).
CLAUDE_COMPACT_MARGIN = 13_000
# Room the compaction request needs beside the conversation and its summary: its instruction (~1,282
# tokens of the default model) and the three requests to go on that a summary cut at the cap gets.
COMPACT_INSTRUCTION = 1_450
# The smallest context in which a long Claude Code conversation (~1,100 tokens of fixed prompt with
# --bare) keeps room to grow between compactions with the settings below.
ROOMY_CONTEXT = 8192


def split_argv(argv):
    """(server flags, claude's arguments or None): the word `claude` where a flag name is expected
    starts Claude Code with everything after it (every server flag takes a value).

    >>> split_argv(["--ctx", "4096", "claude", "-p", "hi"]), split_argv(["--model-name", "claude"])
    ((['--ctx', '4096'], ['-p', 'hi']), (['--model-name', 'claude'], None))
    """
    i = 0
    while i < len(argv):
        if argv[i] == "claude":
            return argv[:i], argv[i + 1:]
        i += 1 if "=" in argv[i] or not argv[i].startswith("--") else 2
    return argv, None


def output_cap(n_ctx):
    """The answer size Claude Code asks for (it sends 32,000): a thirty-second of the context, since a
    compaction must find room for a summary of up to four of them (below)."""
    return max(256, min(8192, n_ctx // 32))


def claude_environment(environ, base_url, token, model_id, n_ctx):
    """What `claude` needs to use this server, compact before the context is full and stay offline.

    >>> env = claude_environment({"ANTHROPIC_API_KEY": "sk-real"}, "http://127.0.0.1:1234", "local", "smol", 4096)
    >>> env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"], env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"], "ANTHROPIC_API_KEY" in env
    ('14622', '256', False)
    """
    given = environ.get("CLAUDE_CODE_MAX_OUTPUT_TOKENS", "")
    cap = int(given) if given.isascii() and given.isdigit() else output_cap(n_ctx)
    # Claude Code compacts at window - cap - CLAUDE_COMPACT_MARGIN, checked before each request, so a
    # conversation may pass that point by one answer before it is compacted. The point leaves room for
    # that answer, the compaction request's instruction and its summary, which Claude Code continues
    # up to three times when it is cut at the cap (a small model's often is)
    point = n_ctx - 5 * cap - COMPACT_INSTRUCTION
    window = point + cap + CLAUDE_COMPACT_MARGIN

    ours = {
        "ANTHROPIC_MODEL": model_id,  # not claude-…: Claude Code then honours the context window below
        "ANTHROPIC_SMALL_FAST_MODEL": model_id,
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(cap),
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(window),
        "CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(window),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    env = {**ours, **environ}
    # a real key would be sent here instead of this server's token; a cloud provider would take the
    # traffic elsewhere
    for name in ("ANTHROPIC_API_KEY", "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX"):
        env.pop(name, None)
    env.update(ANTHROPIC_BASE_URL=base_url, ANTHROPIC_AUTH_TOKEN=token)
    return env


def server_info(host, port, api_key):
    """(model id, context size) of the server answering at host:port, or None when none answers."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/v1/models", headers={"x-api-key": api_key or "local"})
        response = conn.getresponse()
        body = json.loads(response.read()) if response.status == 200 else None
        conn.close()
    except (OSError, ValueError):
        return None
    try:
        model = body["data"][0]
        return model["id"], int(model["max_input_tokens"])
    except (KeyError, IndexError, TypeError, ValueError):
        return "another server", None  # something answers, but not this server


def start_server(server_argv, host, port, api_key, log_path):
    """This file as a server with the same flags; returns (process, server_info) once it answers."""
    with open(log_path, "ab") as log_file:
        # a session of its own: Ctrl-C in the terminal is for `claude`, not for the server
        proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, *server_argv], start_new_session=True,
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            info = server_info(host, port, api_key)
            if info:
                return proc, info
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.kill()
    proc.wait()
    raise SystemExit(f"llama-compat: the server did not start; its log is {log_path}")


def run(config, server_argv, claude_argv):
    """Claude Code with `claude_argv` against the server `config` describes; returns its exit code."""
    claude = shutil.which("claude")
    if claude is None:
        print("llama-compat: Claude Code is not installed (no `claude` on PATH); install it with "
              "`npm install -g @anthropic-ai/claude-code`", file=sys.stderr)
        return 127
    if config.port == 0:
        print("llama-compat: `claude` needs a fixed --port to reach the server", file=sys.stderr)
        return 2
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host.strip("[]")
    started, info = None, server_info(host, config.port, config.api_key)
    if info is None:
        log_path = os.path.join(config.cache_dir, "server.log")
        try:
            os.makedirs(config.cache_dir, exist_ok=True)
        except OSError:
            log_path = os.devnull
        print(f"llama-compat: starting the server on {host}:{config.port} (log: {log_path})", file=sys.stderr)
        started, info = start_server(server_argv, host, config.port, config.api_key, log_path)
    try:
        model_id, n_ctx = info
        if n_ctx is None:
            print(f"llama-compat: {host}:{config.port} is used by another server; pick a free --port",
                  file=sys.stderr)
            return 2
        if n_ctx < ROOMY_CONTEXT:
            print(f"llama-compat: a context of {n_ctx} tokens leaves Claude Code little room to compact a long "
                  f"conversation (it would compact nearly every turn); --ctx {ROOMY_CONTEXT} or more is better",
                  file=sys.stderr)
        env = claude_environment(os.environ, f"http://{host}:{config.port}", config.api_key or "local",
                                 model_id, n_ctx)
        child = subprocess.Popen([claude, *claude_argv], env=env)
        # SIGTERM to the launcher ends `claude` (and then the server it started), not the launcher alone
        signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
        while True:
            try:
                code = child.wait()
                return 128 - code if code < 0 else code  # killed by a signal: the shell's convention
            except KeyboardInterrupt:
                continue  # Ctrl-C reached `claude` too; it decides whether to end
    finally:
        if started is not None:
            started.send_signal(signal.SIGTERM)
            started.wait()
