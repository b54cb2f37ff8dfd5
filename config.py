"""The server's settings: one frozen dataclass, filled from the command line.

Contract: `Config` holds everything an operator can set, each default written once, here; the engine
and the HTTP server both read it and nothing else of the command line. `parse_config` reads flags,
each falling back to the environment variable LLAMA_COMPAT_<FLAG>, then to the default, and exits
with a usage message on a value out of range. Importing it does nothing; it never loads a model.
"""

import argparse
import math
import os
from dataclasses import dataclass, field, fields


def default_cache_dir(environ=os.environ):
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llama-compat")


@dataclass(frozen=True)
class Config:
    model: str = ""  # a GGUF path; empty: the embedded SmolLM2-135M-Instruct
    host: str = "127.0.0.1"
    port: int = 1234
    ctx: int = 8192
    threads: int = 0  # while generating; 0: all cores while other processes leave them free
    threads_batch: int = 0  # the same while evaluating a prompt
    api_key: str = ""
    model_name: str = ""  # empty: from the GGUF's metadata
    max_queue: int = 16
    cors: str = ""
    cache_ram: int = 1024  # MB
    cache_dir: str = field(default_factory=default_cache_dir)
    cache_disk: int = 4096  # MB
    yarn: bool = True
    # seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled
    shutdown_grace: float = 10.0


HELP = {
    "model": "path to a GGUF model; empty means the embedded SmolLM2-135M-Instruct",
    "host": "address to bind",
    "port": "port to bind (0: any free)",
    "ctx": "context size in tokens",
    "threads": "CPU threads for llama.cpp while it generates (0: all cores)",
    "threads_batch": "CPU threads for llama.cpp while it evaluates a prompt (0: all cores)",
    "api_key": "require this key as x-api-key or Authorization: Bearer (empty: no auth)",
    "model_name": "model id shown by /v1/models (empty: from the GGUF's metadata)",
    "max_queue": "requests that may wait for the model; more get 529 overloaded_error",
    "cors": "allow browser requests from this origin (empty: CORS off)",
    "cache_ram": "MB of RAM for saved prompt states, so returning to an earlier conversation after another "
                 "one does not evaluate its prompt again (0: keep only the live one)",
    "cache_dir": "folder for prompt states kept across restarts",
    "cache_disk": "MB of disk for prompt states kept across restarts (0: none)",
    "yarn": "auto: when --ctx exceeds the model's training context and the GGUF declares no rope scaling of "
            "its own, apply YaRN scaling so the model stays coherent",
    "shutdown_grace": "seconds in-flight requests get to finish after SIGTERM/SIGINT before they are answered "
                      "as failed (529 overloaded_error, or an error event in a stream)",
}


def parse_config(argv=None, environ=os.environ):
    """Flags, each falling back to an environment variable, then to the default shown in --help."""
    p = argparse.ArgumentParser(
        prog="compat_server.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve Anthropic's Messages API from one local GGUF model. Each flag can also be "
                    "set by the environment variable LLAMA_COMPAT_<FLAG> (e.g. LLAMA_COMPAT_PORT).",
        epilog="`compat_server.py [flags] claude [its arguments]` runs Claude Code against this server, "
               "starting the server with these flags when none answers on --host/--port.")
    defaults = Config(cache_dir=default_cache_dir(environ))
    for f in fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        env = environ.get("LLAMA_COMPAT_" + f.name.upper())
        if f.type is bool:  # argparse checks choices on the command line only: the environment here
            if env not in (None, "auto", "off"):
                p.error(f"LLAMA_COMPAT_{f.name.upper()} must be auto or off, not {env!r}")
            p.add_argument(flag, choices=("auto", "off"), default=env or ("auto" if default else "off"),
                           help=HELP[f.name])
        else:  # argparse converts (and reports a bad value in) a string default as if it were given
            p.add_argument(flag, type=f.type, default=default if env is None else env, help=HELP[f.name])
    a = vars(p.parse_args(argv))
    if not math.isfinite(a["shutdown_grace"]) or a["ctx"] < 16 or min(
            a["max_queue"], a["threads"], a["threads_batch"], a["cache_ram"], a["cache_disk"], a["shutdown_grace"]) < 0 or (
            not 0 <= a["port"] <= 65535):
        p.error("--ctx must be >= 16, --port 0-65535, --max-queue, --threads, the cache sizes and "
                "--shutdown-grace >= 0")
    types = {f.name: f.type for f in fields(Config)}
    return Config(**{name: value == "auto" if types[name] is bool else value for name, value in a.items()})
