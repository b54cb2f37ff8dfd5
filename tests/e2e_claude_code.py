"""Claude Code end to end: our server, the real `claude` CLI in print mode, one prompt, a Read round trip,
the one command, and a long session through two compactions.

Contract: starts `compat_server.py` as a child process on a free loopback port, runs the Claude Code
binary installed in `.e2e/` (`make e2e` installs it with npm) against it in a throw-away HOME with a
clean environment, checks that each run exits 0 with a reply, and stops the server whatever happens.
Standard library only, so `tests/test_claude_code.py` imports the same functions. It never installs
anything unless asked (`--install`), connects to nothing but 127.0.0.1, and writes only in temporary
folders.

    python tests/e2e_claude_code.py                  # --bare: text, stream-json, a Read round trip, one command,
                                                     # a long session at --ctx 8192 (~10 minutes)
    python tests/e2e_claude_code.py --profile full   # Claude Code's full tool list: ~20k tokens, ~5 minutes

Why the pieces are the way they are (details in shared/CLAUDE_CODE_TRAFFIC.md):
- Profiles differ in the prompt Claude Code sends: `--bare` is ~1,100 tokens (tools Bash, Edit, Read),
  `--tools Read,Bash` ~2,750, the default tool list ~20,000 (needs --ctx 32768, about 5 minutes of
  prompt evaluation on 2 cores).
- CLAUDE_CODE_MAX_OUTPUT_TOKENS caps `max_tokens`: Claude Code asks for 32,000 and the 135M model at
  the API's default temperature 1.0 sometimes never stops; uncapped, such a reply runs until the
  context is full, after which Claude Code tries to compact and fails with "Prompt is too long".
- Claude Code never sends `tool_choice`, and the default model seldom calls a tool on its own. The
  Read round trip therefore goes through `ToolSteeringProxy`, which adds `tool_choice` (forcing the
  call, then `none` once the result is back; `steer` says what else it changes) and forwards the
  responses untouched.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
E2E_DIR = ROOT / ".e2e"
CLAUDE_BIN = E2E_DIR / "node_modules" / ".bin" / "claude"
# The version whose traffic shared/CLAUDE_CODE_TRAFFIC.md and the capture describe.
CLAUDE_CODE_VERSION = os.environ.get("CLAUDE_CODE_VERSION", "2.1.197")
MODEL = "local-model"

# name: (Claude Code flags, --ctx for our server)
PROFILES = {
    "bare": (["--bare"], 8192),
    "tools": (["--tools", "Read,Bash"], 8192),
    "full": ([], 32768),
}
PROMPT = "Say hello in five words."
# Seconds for the server to load the model and answer HEAD /.
SERVER_START_TIMEOUT = 120
# Seconds for the server to finish in-flight work after SIGTERM (compat_server's grace is 10 s).
SERVER_STOP_TIMEOUT = 20
# A cap on each reply (see the module docstring): 256 tokens take ~4 s at depth 1k on 2 cores, so a
# reply that never ends costs ~20 s (Claude Code asks three times to go on, then exits 1).
MAX_OUTPUT_TOKENS = 256
# New conversations tried when one fails that way (measured: 1 run in 12 to 20 does).
ATTEMPTS = 3
# The long session: the default context (at 4096 a summary cut at the output cap and continued can
# still meet the end of the context), two compactions within ~30 turns.
LONG_SESSION_CTX = 8192
LONG_SESSION_TURNS = 60
# What the long session's turns ask about, one after another.
LONG_SESSION_TOPICS = ["rivers", "bread", "clocks", "bridges", "owls", "glass", "maps", "tides", "bees", "salt"]
# The secret the Read round trip must bring back from the file into the conversation.
SECRET = "PERIWINKLE-4217"


@dataclass(frozen=True)
class Run:
    """One finished `claude -p` invocation."""

    argv: tuple
    returncode: int
    stdout: str
    stderr: str
    seconds: float


# ---------------------------------------------------------------------------------------------------
# Claude Code: install and find
# ---------------------------------------------------------------------------------------------------

def claude_binary():
    """The installed `claude` executable, or None. The npm package's postinstall links the native
    binary from its platform package over a small stub in bin/; where install scripts did not run
    (npm warns that they will need approval), the platform package's binary is used directly."""
    candidates = [CLAUDE_BIN, *sorted(E2E_DIR.glob("node_modules/@anthropic-ai/claude-code-*/claude"))]
    for path in candidates:
        if path.exists() and path.resolve().stat().st_size > 1_000_000 and os.access(path, os.X_OK):
            return path
    return None


def install_claude():
    """`npm install --prefix .e2e @anthropic-ai/claude-code@VERSION` (the native binary comes inside
    the platform package, nothing else is downloaded)."""
    subprocess.run(["npm", "install", "--prefix", str(E2E_DIR), "--no-audit", "--no-fund",
                    f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"], check=True)
    if claude_binary() is None:
        raise RuntimeError(f"npm did not install a native claude binary at {CLAUDE_BIN}")
    return CLAUDE_BIN


# ---------------------------------------------------------------------------------------------------
# Our server as a child process
# ---------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_head(port):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("HEAD", "/")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def start_server(ctx, workdir, extra_args=()):
    """compat_server.py on a free port, logging to WORKDIR/server.log and keeping its prompt states
    in WORKDIR/prompt-cache (so a run starts cold and leaves the user's ~/.cache alone: one state of
    Claude Code's full prompt is ~470 MB); returns (process, port) once HEAD / answers 200."""
    port = free_port()
    log_path = Path(workdir) / "server.log"
    argv = [sys.executable, str(ROOT / "compat_server.py"), "--port", str(port), "--ctx", str(ctx),
            "--cache-dir", str(Path(workdir) / "prompt-cache"), *extra_args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not answers_head(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"server did not come up on port {port}; log: {log_path}")
        time.sleep(0.25)
    return proc, port


def stop_server(proc):
    """SIGTERM (the server drains in-flight requests), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------
# Running Claude Code
# ---------------------------------------------------------------------------------------------------

def claude_env(home, base_url, max_output_tokens=MAX_OUTPUT_TOKENS):
    """A clean environment: nothing from the caller's shell (ANTHROPIC_MODEL, a real API key, …)
    reaches Claude Code, only what points it at our server and keeps it quiet."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_AUTH_TOKEN": "local",
        "ANTHROPIC_API_KEY": "local",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # --dangerously-skip-permissions refuses to run as root without it
        "IS_SANDBOX": "1",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output_tokens),
    }


def make_home(path=None):
    """A throw-away HOME where onboarding is already done, so nothing interactive is asked. Runs
    that share one keep the same prompt: Claude Code's system prompt names the memory folder under
    HOME (and the working directory), so a new HOME changes the prompt early on."""
    home = Path(path or tempfile.mkdtemp(prefix="llama-compat-home-"))
    home.mkdir(exist_ok=True)
    (home / ".claude.json").write_text(json.dumps({"hasCompletedOnboarding": True}))
    return home


def run_claude(claude, base_url, prompt, flags, workdir, output_format="text", timeout=600,
               max_output_tokens=MAX_OUTPUT_TOKENS, home=None):
    """`claude -p PROMPT --model local-model FLAGS` in `workdir`, with `home` as HOME (a fresh one,
    removed afterwards, when None)."""
    argv = [str(claude), "-p", prompt, "--model", MODEL, *flags]
    if output_format != "text":
        argv += ["--output-format", output_format, "--verbose"]
    env = claude_env(home or make_home(), base_url, max_output_tokens)
    started = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    finally:
        if home is None:
            shutil.rmtree(env["HOME"], ignore_errors=True)
    return Run(tuple(argv), done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def run_until_it_ends(claude, base_url, prompt, flags, workdir, output_format="text", timeout=600,
                      max_output_tokens=MAX_OUTPUT_TOKENS, home=None, attempts=ATTEMPTS):
    """run_claude, repeated while the reply outlasts the cap: Claude Code then exits 1 with "exceeded
    the N output token maximum", which is the sampled model's doing (Claude Code sends no
    temperature, so it is 1.0), not the server's. Returns (run, attempts used)."""
    for attempt in range(1, attempts + 1):
        run = run_claude(claude, base_url, prompt, flags, workdir, output_format, timeout, max_output_tokens,
                         home)
        if not outran_the_cap(run):
            break
    return run, attempt


def stream_events(run):
    """The JSON lines of a `--output-format stream-json --verbose` run."""
    return [json.loads(line) for line in run.stdout.splitlines() if line.strip().startswith("{")]


def reply_of(run, output_format):
    """The model's final reply: stdout for text, the `result` event for stream-json. Raises
    AssertionError with the run's output when there is none."""
    detail = f"exit {run.returncode}\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    assert run.returncode == 0, detail
    if output_format == "text":
        reply = run.stdout.strip()
    else:
        results = [e for e in stream_events(run) if e.get("type") == "result"]
        assert results and results[-1].get("subtype") == "success" and not results[-1].get("is_error"), detail
        reply = (results[-1].get("result") or "").strip()
    assert reply, "empty reply\n" + detail
    return reply


# ---------------------------------------------------------------------------------------------------
# The Read round trip: a proxy that forces the first call of a turn
# ---------------------------------------------------------------------------------------------------

def steer(body, tool):
    """The request as ToolSteeringProxy forwards it: `tool` forced in the conversation's first
    request and tools turned off in every later one, so the conversation is exactly a call, its
    result and a text answer (with Claude Code's "Output token limit hit" continuations, if the
    answer runs long). Requests that offer no `tool` (or already choose) pass unchanged.

    Where it forces the call it also changes what a 135M model needs to write a usable one:
    `thinking` goes (the API refuses it together with a forced tool), the tool's schema keeps only
    its required properties (else the model fills Read's optional `pages` with noise, which Read
    rejects), and `temperature` 0 makes it copy the path from the prompt instead of sampling around it."""
    if body.get("tool_choice") or tool not in [t.get("name") for t in body.get("tools") or ()]:
        return body
    if any(m.get("role") == "assistant" for m in body.get("messages") or ()):
        return dict(body, tool_choice={"type": "none"})
    steered = dict(body, tool_choice={"type": "tool", "name": tool}, temperature=0,
                   tools=[_required_only(t) if t.get("name") == tool else t for t in body["tools"]])
    steered.pop("thinking", None)
    return steered


def _required_only(tool):
    schema = dict(tool.get("input_schema") or {})
    required = schema.get("required") or ()
    schema["properties"] = {k: v for k, v in (schema.get("properties") or {}).items() if k in required}
    return dict(tool, input_schema=schema)


class ToolSteeringProxy(ThreadingHTTPServer):
    """Forwards to our server on `upstream_port`, applying `steer` to POST /v1/messages bodies;
    responses (streams included) go back unchanged."""

    daemon_threads = True

    def __init__(self, upstream_port, tool):
        super().__init__(("127.0.0.1", 0), _SteeringHandler)
        self.upstream_port, self.tool = upstream_port, tool
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _SteeringHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    HOP_BY_HOP = ("connection", "keep-alive", "transfer-encoding", "content-length", "host")

    def log_message(self, *args):
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.command == "POST" and self.path.split("?")[0] == "/v1/messages":
            body = json.dumps(steer(json.loads(body), self.server.tool)).encode()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.HOP_BY_HOP}
        headers["content-length"] = str(len(body))
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=900)
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        self.send_response_only(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() not in self.HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            while self.command != "HEAD" and (chunk := response.read1(65536)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True  # Claude Code hung up (it does once it has its answer)
        finally:
            upstream.close()

    do_GET = do_HEAD = do_POST = _forward


def tool_round_trip(run):
    """(tool_use inputs, tool_result texts) of a stream-json run, in order."""
    calls, results = [], []
    for event in stream_events(run):
        for block in (event.get("message") or {}).get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                calls.append((block.get("name"), block.get("input")))
            elif block.get("type") == "tool_result":
                content = block.get("content")
                if isinstance(content, list):
                    content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
                results.append(str(content))
    return calls, results


def read_round_trip(claude, server_port, timeout=600, max_output_tokens=MAX_OUTPUT_TOKENS, attempts=3):
    """Claude Code's Read tool on a file holding SECRET, forced through ToolSteeringProxy.

    The model still writes the path itself. Asked for /tmp/DIR/note.txt, the 135M model writes it
    whole or as DIR/note.txt, so Claude Code runs in the temp folder, where both resolve (measured:
    8 of 8; in DIR itself 3 of 4). Read is the only tool offered, since permissions are skipped, and
    `--max-turns 2` (the call, then the answer) stops anything past the expected shape. Each attempt
    is a new conversation in a new DIR.
    Returns (run, calls, results) of the first attempt whose tool_result holds SECRET, else of the
    last one."""
    flags = ["--bare", "--tools", "Read", "--dangerously-skip-permissions", "--max-turns", "2"]
    with ToolSteeringProxy(server_port, "Read") as proxy:
        for _ in range(attempts):
            folder = Path(tempfile.mkdtemp(prefix="llama-compat-e2e-"))
            try:
                note = folder / "note.txt"
                note.write_text(f"The secret word is {SECRET}.\n")
                prompt = f"Use the Read tool to read the file {note} and tell me the secret word."
                run = run_claude(claude, proxy.url, prompt, flags, folder.parent, "stream-json", timeout,
                                 max_output_tokens)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            calls, results = tool_round_trip(run)
            if run.returncode == 0 and any(SECRET in r for r in results):
                break
    return run, calls, results


def outran_the_cap(run):
    """Claude Code gave up on a reply that did not end within the output cap and its three requests
    to go on: the sampled model's doing (it sends no temperature, so 1.0), not the server's."""
    return "output token maximum" in run.stdout + run.stderr


def launcher_run(claude, workdir, home, claude_args, port=None, ctx=8192, timeout=600):
    """`compat_server.py --port P --ctx CTX claude CLAUDE_ARGS…`, as a user types it: the launcher
    starts its own server when none answers on P (a free port when None) and stops it afterwards, and
    runs this `claude` with the environment it sets."""
    env = {k: v for k, v in claude_env(home, "").items() if not k.startswith(("ANTHROPIC_", "CLAUDE_CODE_"))}
    env["PATH"] = f"{Path(claude).parent}{os.pathsep}{env['PATH']}"
    argv = [sys.executable, str(ROOT / "compat_server.py"), "--port", str(port or free_port()), "--ctx", str(ctx),
            "--cache-dir", str(Path(workdir) / "launcher-cache"), "claude", *claude_args]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    return Run(tuple(argv), done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def compactions(home):
    """How many times Claude Code compacted the conversations under `home` (its transcripts mark each
    with a compact_boundary record)."""
    return sum(line.count('"subtype":"compact_boundary"')
               for path in (Path(home) / ".claude" / "projects").rglob("*.jsonl")
               for line in path.read_text(errors="replace").splitlines())


def long_session(claude, workdir, ctx, least_compactions, most_turns, timeout=600):
    """One conversation continued with `claude -p … --bare --continue` through the one command, turn
    after turn, each asking for a few paragraphs, until Claude Code has compacted it
    `least_compactions` times or a turn fails for another reason than a reply that outran the output
    cap (the sampled model's doing). The server runs at `--ctx ctx` on a port the launcher then finds,
    so every turn gets the launcher's settings and nothing else; its log is WORKDIR/long/server.log.
    Returns (turns as Runs, compactions)."""
    home = make_home(Path(workdir) / "long-home")
    (Path(workdir) / "long").mkdir(exist_ok=True)
    server, port = start_server(ctx, Path(workdir) / "long")
    runs = []
    try:
        for turn in range(most_turns):
            topic = LONG_SESSION_TOPICS[turn % len(LONG_SESSION_TOPICS)]
            runs.append(launcher_run(claude, workdir, home, ["-p", f"Write three paragraphs about {topic}.",
                                                              "--bare", *(["--continue"] if turn else [])],
                                     port, ctx, timeout))
            done = runs[-1]
            seen = compactions(home)
            print(f"turn {turn + 1}: exit {done.returncode} in {done.seconds:.1f}s, {seen} compactions: "
                  f"{(done.stdout.strip() or done.stderr.strip())[:100]!r}", flush=True)
            if seen >= least_compactions or done.returncode != 0 and not outran_the_cap(done):
                break
    finally:
        stop_server(server)
    return runs, compactions(home)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="bare",
                   help="bare: ~1,100 prompt tokens; tools: --tools Read,Bash, ~2,750; full: ~20,000 (minutes)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--ctx", type=int, default=0, help="server context (0: the profile's)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed for each claude run")
    p.add_argument("--no-tool-round-trip", action="store_true", help="skip the Read round trip")
    p.add_argument("--install", action="store_true", help="npm-install Claude Code into .e2e if missing")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server log, homes)")
    p.add_argument("--allow-output-cap", action="store_true",
                   help="count a run that ends in Claude Code's 'exceeded the N output token maximum' as "
                        "done: every request (and the three continuations) was served; the model did not stop")
    args = p.parse_args(argv)

    claude = claude_binary() or (install_claude() if args.install else None)
    if claude is None:
        print(f"no Claude Code at {CLAUDE_BIN}: run `make e2e` or pass --install", file=sys.stderr)
        return 2
    flags, ctx = PROFILES[args.profile]
    workdir = Path(tempfile.mkdtemp(prefix="llama-compat-e2e-"))
    home = make_home(workdir / "home")
    server, port = start_server(args.ctx or ctx, workdir)
    failed = False
    try:
        print(f"server on 127.0.0.1:{port} (--ctx {args.ctx or ctx}); claude {' '.join(flags)}", flush=True)
        for output_format in ("text", "stream-json"):
            run, attempt = run_until_it_ends(claude, f"http://127.0.0.1:{port}", args.prompt, flags, workdir,
                                             output_format, args.timeout, home=home)
            try:
                if args.allow_output_cap and outran_the_cap(run):
                    print(f"--- {output_format}: served, but the model did not stop within {MAX_OUTPUT_TOKENS} "
                          f"tokens ({attempt} attempts, last {run.seconds:.1f}s)", flush=True)
                    continue
                print(f"--- {output_format}: exit {run.returncode} in {run.seconds:.1f}s (attempt {attempt})\n"
                      f"{reply_of(run, output_format)}", flush=True)
            except AssertionError as exc:
                print(f"--- {output_format}: FAILED\n{exc}", flush=True)
                failed = True
        if not args.no_tool_round_trip:
            run, calls, results = read_round_trip(claude, port, args.timeout)
            ok = run.returncode == 0 and any(SECRET in r for r in results)
            print(f"--- Read round trip: {'ok' if ok else 'FAILED'} (exit {run.returncode}, "
                  f"{run.seconds:.1f}s)\ncalls: {calls}\nresults: {[r[:200] for r in results]}", flush=True)
            failed |= not ok
        if args.profile == "bare":  # the idle server above is not the one the launcher finds: other port
            run = launcher_run(claude, workdir, home, ["-p", args.prompt, "--bare"], timeout=args.timeout)
            ok = run.returncode == 0 and bool(run.stdout.strip())
            print(f"--- one command (compat_server.py claude -p …): {'ok' if ok else 'FAILED'} (exit "
                  f"{run.returncode}, {run.seconds:.1f}s)\n{run.stdout.strip()[:300] or run.stderr[-1000:]}",
                  flush=True)
            failed |= not ok
            runs, compacted = long_session(claude, workdir, LONG_SESSION_CTX, 2, LONG_SESSION_TURNS, args.timeout)
            refused = (Path(workdir) / "long" / "server.log").read_text(errors="replace").count("prompt is too long")
            capped = sum(map(outran_the_cap, runs))
            ok = compacted >= 2 and not refused and all(r.returncode == 0 or outran_the_cap(r) for r in runs)
            print(f"--- long session (--ctx {LONG_SESSION_CTX}, the one command, --continue): "
                  f"{'ok' if ok else 'FAILED'}: {len(runs)} turns, {compacted} compactions, {refused} requests "
                  f"refused as too long, {capped} turns whose reply outran the output cap", flush=True)
            failed |= not ok
    finally:
        stop_server(server)
        if args.keep or failed:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
