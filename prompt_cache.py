"""Saved prompt states: KV-cache snapshots of earlier prompts, in RAM and on disk, keyed by tokens.

Contract: stores opaque state bytes (what llama.cpp's `llama_state_seq_get_data` copies out) under
the exact token sequence they hold, finds the stored sequence sharing the longest prefix with a new
prompt, and forgets the least recently used past a byte budget. Both tiers (`StateCache` in RAM,
`DiskStates` on disk) speak one vocabulary: `longest_prefix`, `get`, `put`; for memories that cannot
be cut back (`cuts_back=False`) only a state whose tokens are all a prefix of the new prompt counts,
and none is dropped for a newer one it is a prefix of. `DiskStates` keeps
states across restarts: files written atomically by a background thread, each checked when read
(format, model identity, token count, digest); a bad file is removed with a warning, and a folder
that cannot be written turns the disk tier off with a warning. It never calls llama.cpp and never raises on what
it finds on disk.
"""

import ctypes
import hashlib
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict

log = logging.getLogger("llama-compat")

MAGIC = b"LCKVST01"
# model identity (32) + token count (4), then the tokens, then the state's length (8), the state and a
# sha256 of everything before it (32)
HEADER = struct.Struct("<32sI")
LENGTH = struct.Struct("<Q")
DIGEST_BYTES = 32
# Bytes the disk writer hashes and writes at a time: between two pieces it waits while a request
# holds the model, so a request that arrives mid-write waits at most one piece.
WRITE_PIECE = 4 * 1024 * 1024
# Bytes hashed from each end of the model file for its identity: enough to tell quantizations and
# fine-tunes apart, cheap at start-up even for multi-GB files.
IDENTITY_SPAN = 8 * 1024 * 1024


def common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def longest_prefix(candidates, tokens, whole=False):
    """(the candidate sharing the longest prefix with `tokens`, that prefix's length); of equals, the
    shortest, which has the least to cut back. `whole`: only candidates that are all a prefix of
    `tokens`, for memories that cannot be cut back (a sliding window, a recurrent state).

    >>> longest_prefix([(1, 2, 3, 4, 5), (1, 2, 3, 9)], (1, 2, 3, 7))
    ((1, 2, 3, 9), 3)
    >>> longest_prefix([(1, 2, 3, 4, 5), (1, 2)], (1, 2, 3, 4, 7), whole=True)
    ((1, 2), 2)
    """
    best, best_key = None, (0, 0)
    for saved in candidates:
        key = (common_prefix(saved, tokens), -len(saved))
        if key[0] and key > best_key and (not whole or key[0] == len(saved)):
            best, best_key = saved, key
    return best, best_key[0]


def model_identity(path):
    """A digest of a model file's size and both ends: states of another model never match."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(struct.pack("<Q", size))
    with open(path, "rb") as f:
        digest.update(f.read(IDENTITY_SPAN))
        f.seek(max(0, size - IDENTITY_SPAN))
        digest.update(f.read(IDENTITY_SPAN))
    return digest.digest()


class StateCache:
    """Saved KV states of sequence 0 in RAM, keyed by the tokens they hold, least recently used out
    once their bytes exceed the budget. Where the memory can be cut back anywhere (`cuts_back`), a
    state whose tokens are a prefix of a newer one is dropped: the newer one serves every request the
    older one could. Where it cannot (a sliding window, a recurrent state), the older one is a
    checkpoint the newer one cannot stand in for, and stays."""

    def __init__(self, budget, cuts_back=True):
        self.budget = budget
        self._cuts_back = cuts_back
        self._entries = OrderedDict()  # tokens -> ctypes buffer from llama_state_seq_get_data
        self._bytes = 0

    def longest_prefix(self, tokens):
        return longest_prefix(self._entries, tokens, whole=not self._cuts_back)

    def get(self, tokens):
        self._entries.move_to_end(tokens)
        return self._entries[tokens]

    def put(self, tokens, data):
        for saved in [s for s in self._entries if s == tokens or (self._cuts_back and s == tokens[:len(s)])]:
            self._drop(saved)
        self._entries[tokens] = data
        self._bytes += len(data)
        while self._bytes > self.budget:
            self._drop(next(iter(self._entries)))

    def _drop(self, tokens):
        self._bytes -= len(self._entries.pop(tokens))

    def __len__(self):
        return len(self._entries)

    def __contains__(self, tokens):
        return tokens in self._entries


class DiskStates:
    """Prompt states in a folder, one file each, least recently used (by mtime) out past the budget."""

    def __init__(self, folder, budget, identity, idle=None, cuts_back=True):
        self.budget = budget
        self._cuts_back = cuts_back  # as StateCache's
        self._identity = identity
        # set while the model is idle: the writer works only then (None: always)
        self._idle = idle
        self._folder = folder
        self._index = {}  # tokens -> file path, for this model's files
        self._lock = threading.Lock()  # guards _index: the writer thread adds and evicts
        self._writes = queue.Queue(maxsize=1)  # one state waits at most: memory, not disk, is scarce
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".probe-{os.getpid()}")
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as exc:
            log.warning("prompt cache folder %s is not writable (%s): running without the disk cache",
                        folder, exc.strerror)
            self._folder = None
            return
        self._scan()
        threading.Thread(target=self._write_loop, daemon=True).start()

    @property
    def enabled(self):
        return self._folder is not None

    def longest_prefix(self, tokens):
        with self._lock:
            saved_tokens = list(self._index)
        return longest_prefix(saved_tokens, tokens, whole=not self._cuts_back)

    def get(self, tokens):
        """The state stored for `tokens`, or None (a bad file is removed)."""
        with self._lock:
            path = self._index.get(tokens)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                raw = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(raw)
            data = self._parse(raw, tokens)
            os.utime(path)  # recently used
            return data
        except (OSError, ValueError) as exc:
            self._discard(path, str(exc))
            return None

    def put(self, tokens, data):
        """Write in the background; a state still waiting to be written is replaced."""
        with self._lock:
            known = tokens in self._index
        if not self.enabled or known or LENGTH.size + len(data) > self.budget:
            return
        try:
            self._writes.get_nowait()
            self._writes.task_done()  # the replaced state counts as handled, or flush() would wait forever
        except queue.Empty:
            pass
        self._writes.put((tokens, data))

    def flush(self):
        """Wait until the waiting write is done (tests, shutdown)."""
        self._writes.join()

    def _write_loop(self):
        """Never ends while the process runs: a failed write turns the disk tier off, and later saves
        are dropped by `put`, so `flush` always has a reader to wait on."""
        while True:
            tokens, data = self._writes.get()
            try:
                if self.enabled:
                    self._write(tokens, data)
            except OSError as exc:
                log.warning("could not write a prompt state (%s): running without the disk cache", exc.strerror)
                self._folder = None
            except Exception:
                log.exception("the prompt state writer failed: running without the disk cache")
                self._folder = None
            finally:
                self._writes.task_done()

    def _write(self, tokens, data):
        name = hashlib.sha256(self._identity + struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:32]
        path = os.path.join(self._folder, name + ".kv")
        digest = hashlib.sha256()
        tmp = path + f".tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                for part in (MAGIC, HEADER.pack(self._identity, len(tokens)),
                             struct.pack(f"<{len(tokens)}i", *tokens), LENGTH.pack(len(data)),
                             *_pieces(memoryview(data).cast("B"))):
                    if self._idle is not None:
                        # hashing and writing hundreds of MB takes a core; llama.cpp's threads wait
                        # for each other, so a core taken from one slows them all: write between requests
                        self._idle.wait()
                    digest.update(part)
                    f.write(part)
                f.write(digest.digest())
            os.replace(tmp, path)
        except OSError:
            _remove_quietly(tmp)
            raise
        with self._lock:
            self._index[tokens] = path
        self._evict()

    def _parse(self, raw, expect_tokens):
        """The state in a file's bytes, after checking everything about them; a ctypes view of
        `raw`, not a copy (a state is hundreds of MB)."""
        identity, count = _header(raw)
        if identity != self._identity:
            raise ValueError("a state of another model")
        start = len(MAGIC) + HEADER.size + 4 * count
        if len(raw) < start + LENGTH.size + DIGEST_BYTES:
            raise ValueError("truncated")
        tokens = struct.unpack_from(f"<{count}i", raw, len(MAGIC) + HEADER.size)
        (length,) = LENGTH.unpack_from(raw, start)
        end = start + LENGTH.size + length
        if len(raw) != end + DIGEST_BYTES or hashlib.sha256(memoryview(raw)[:end]).digest() != raw[end:]:
            raise ValueError("truncated or corrupt")
        if tokens != expect_tokens:
            raise ValueError("holds other tokens than its index says")
        return (ctypes.c_uint8 * length).from_buffer(raw, start + LENGTH.size)

    def _scan(self):
        """Index this model's files by their tokens, from their headers (states are read on use)."""
        for name in os.listdir(self._folder):
            path = os.path.join(self._folder, name)
            if ".kv.tmp-" in name:
                _remove_quietly(path)  # a write that never finished
            if not name.endswith(".kv"):
                continue
            try:
                with open(path, "rb") as f:
                    identity, count = _header(f.read(len(MAGIC) + HEADER.size))
                    if identity != self._identity:
                        continue  # another model's state: left for that model
                    raw_tokens = f.read(4 * count)
                    if len(raw_tokens) != 4 * count:
                        raise ValueError("truncated")
                with self._lock:
                    self._index[struct.unpack(f"<{count}i", raw_tokens)] = path
            except (OSError, ValueError) as exc:
                self._discard(path, str(exc))

    def _evict(self):
        files = []
        for name in os.listdir(self._folder):
            if name.endswith(".kv"):
                try:
                    stat = os.stat(os.path.join(self._folder, name))
                    files.append((stat.st_mtime, stat.st_size, os.path.join(self._folder, name)))
                except OSError:
                    pass
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget:
                break
            total -= size
            self._forget_path(path)
            _remove_quietly(path)

    def _discard(self, path, reason):
        log.warning("removing prompt-state file %s: %s", os.path.basename(path), reason)
        self._forget_path(path)
        _remove_quietly(path)

    def _forget_path(self, path):
        with self._lock:
            for tokens in [t for t, indexed in self._index.items() if indexed == path]:
                del self._index[tokens]


def _pieces(view, size=WRITE_PIECE):
    return (view[i:i + size] for i in range(0, len(view), size))


def _header(raw):
    """(model identity, token count) from a file's first bytes; ValueError when it is not one of ours."""
    if len(raw) < len(MAGIC) + HEADER.size or raw[:len(MAGIC)] != MAGIC:
        raise ValueError("not a prompt-state file")
    return HEADER.unpack_from(raw, len(MAGIC))


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass
