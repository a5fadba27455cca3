"""What one request costs in memory while it runs: its KV cache and its prefill's working memory.

Admission decides before a single array is allocated, so both figures come
from the model's config.json and the entry's KV options (``kv_shape``), times
the tokens the request can reach (``request_need``), with the prompt counted by
the model's own tokenizer and chat template (``prompt_tokens``). Once the model
is loaded, what each layer's cache holds comes from the model itself
(cache_plan.py: hybrid, linear-attention and sliding-window layers counted for
what they keep); the config formula, every layer full attention or its
configured window, is the fallback. Pure apart from reading the model's files;
engine/mlx.py keeps what touches handlers.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_hub.config import ModelConfig
from mlx_hub.engine.base import RequestNeed
from mlx_hub.engine.cache_plan import STEP, CachePlan, kv_blocks, quantized_bytes
from mlx_hub.engine.model_files import config_json, model_folder, native_context_length

log = logging.getLogger(__name__)

#: The KV cache grows in blocks of this many tokens (mlx-lm's ``KVCache.step``; cache_plan's ``STEP``).
KV_STEP = STEP
#: mlx-lm's ``generate_step`` prefills in chunks of this many tokens (upstream passes no other).
PREFILL_STEP = 2048
#: Working bytes per prompt token in a chunk, in units of the activation dtype: about 20
#: copies of the hidden state (projections, RoPE, residuals) and 2 of the MLP's
#: intermediate. Fitted to MLX 0.32 CPU measurements of llama and qwen2 shapes (tests/test_memory.py).
HIDDEN_COPIES = 20
INTERMEDIATE_COPIES = 2
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: While a request runs, upstream's prompt cache copies its KV twice: a checkpoint of the prompt once it
#: is prefilled, and the whole sequence when it ends. The copies stay in the prompt cache (counted there,
#: as the model's bytes) once the request is over; until then the request's reservation carries them.
PROMPT_CACHE_COPIES = 2


@dataclass(frozen=True)
class KVShape:
    """What a model's request memory depends on, read once from its config.json and entry."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int
    context: int | None  # the most tokens a request can reach (context_length, else the model's own)
    windows: tuple[int | None, ...]  # per layer: None for full attention, else the cache's size bound
    kv_bits: int | None = None
    kv_group_size: int = 64
    prefill_step: int = PREFILL_STEP
    cache_copies: int = 0  # copies of a request's KV that upstream's prompt cache takes while it runs
    plan: CachePlan | None = None  # what each layer's cache holds, read from the loaded model

    def kv_bytes_per_token(self) -> int:
        """K and V of one token in one layer."""
        if self.kv_bits is None:
            return 2 * self.kv_heads * self.head_dim * self.dtype_bytes
        return (
            2
            * self.kv_heads
            * quantized_bytes(self.head_dim, self.kv_bits, self.kv_group_size, self.dtype_bytes)
        )


def _int(section: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = section.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_shape(entry: ModelConfig, plan: CachePlan | None = None) -> KVShape | None:
    """The request-memory shape of a language model entry; None where it is not one the hub can read.

    Layers, heads, KV heads and head dim come from config.json (a VLM's
    ``text_config`` too); the dtype from ``torch_dtype`` (quantized weights still
    compute in it). Sliding-window layers (``layer_types``, or gemma's
    ``sliding_window_pattern``) keep at most ``sliding_window`` tokens, and
    ``context_length`` makes every layer a rotating cache of that size, as
    upstream builds it (``make_prompt_cache(max_kv_size=context_length)``).
    A loaded model's ``plan`` replaces the layer count and windows for its KV.
    """
    if entry.model_type not in ("lm", "multimodal"):
        return None

    data = config_json(entry.model_path)
    if data is None:
        return None
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    layers = _int(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(text, "num_attention_heads", "n_head")
    hidden = _int(text, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        return None
    kv_heads = _int(text, "num_key_value_heads") or heads
    head_dim = _int(text, "head_dim") or hidden // heads
    dtype = str(text.get("torch_dtype") or data.get("torch_dtype") or "float16")

    native = native_context_length(entry.model_path)
    windows: list[int | None] = [None] * layers
    window = _int(text, "sliding_window")
    if window is not None:
        kinds = text.get("layer_types")
        pattern = _int(text, "sliding_window_pattern")
        if isinstance(kinds, list) and len(kinds) == layers:
            windows = [window if "sliding" in str(k) else None for k in kinds]
        elif pattern is not None:
            windows = [window if (i + 1) % pattern else None for i in range(layers)]
    if entry.context_length is not None:
        windows = [min(w or entry.context_length, entry.context_length) for w in windows]
    return KVShape(
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=hidden,
        intermediate=_int(text, "intermediate_size", "n_inner") or 4 * hidden,
        vocab=_int(text, "vocab_size") or 0,
        dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
        context=native if entry.context_length is None else entry.context_length,
        windows=tuple(windows),
        kv_bits=entry.kv_bits,
        kv_group_size=entry.kv_group_size,
        prefill_step=max(PREFILL_STEP, entry.batch_prefill_step_size),
        cache_copies=PROMPT_CACHE_COPIES if entry.prompt_cache_size > 0 else 0,
        plan=plan,
    )


def _windows(shape: KVShape) -> tuple[int | None, ...]:
    """The attention layers' windows (None: full attention); the plan's once the model is loaded."""
    return shape.windows if shape.plan is None else shape.plan.windows


def _kv(shape: KVShape, prompt_tokens: int, reach: int) -> int:
    """One sequence's cache bytes at ``reach`` tokens: the loaded model's plan, else the config formula."""
    if shape.plan is not None:
        return shape.plan.kv_bytes(
            prompt_tokens,
            reach,
            prefill_step=shape.prefill_step,
            kv_bits=shape.kv_bits,
            kv_group_size=shape.kv_group_size,
        )
    per_token = shape.kv_bytes_per_token()
    return sum(
        per_token * (kv_blocks(reach) if w is None else min(kv_blocks(reach), w)) for w in shape.windows
    )


def request_need(shape: KVShape | None, prompt_tokens: int, max_tokens: int) -> RequestNeed:
    """What one request reserves: its KV cache at the most tokens it can reach, plus one prefill chunk.

    KV: per layer K and V for every token the request can reach (prompt plus
    ``max_tokens``, capped by the context), in mlx-lm's 256-token blocks, or at
    most a sliding or rotating layer's bound, or a fixed state's bytes (the
    shape's ``plan``, once the model is loaded); times one plus the copies
    upstream's prompt cache takes while the request runs (``PROMPT_CACHE_COPIES``). Prefill: the worst chunk of
    ``prefill_step`` tokens, whose attention scores (heads x chunk x keys in the
    activation dtype, plus a one-byte causal mask) dominate at long prompts,
    and its activations (``HIDDEN_COPIES``/``INTERMEDIATE_COPIES`` per token).
    With no shape (not a language model, or an unreadable config) the need is 0.
    """
    prompt_tokens, max_tokens = max(prompt_tokens, 0), max(max_tokens, 0)
    reach = prompt_tokens + max_tokens
    if shape is None:
        return RequestNeed(prompt_tokens, max_tokens, reach, 0, 0)
    windows = _windows(shape)
    if shape.context is not None and any(w is None for w in windows):
        reach = min(reach, shape.context)
    kv = _kv(shape, prompt_tokens, reach)
    # Prefill: every chunk but the prompt's last token, which the first decode step takes.
    worst, done, left = 0, 0, max(prompt_tokens - 1, 0)
    bound = max((w for w in windows if w is not None), default=None)
    full = any(w is None for w in windows)
    while left > 0:
        chunk = min(shape.prefill_step, left)
        keys = done + chunk if full or bound is None else min(done, bound) + chunk
        scores = chunk * keys * (shape.heads * shape.dtype_bytes + 1) if windows else 0  # no attention: none
        activations = (
            chunk
            * shape.dtype_bytes
            * (HIDDEN_COPIES * shape.hidden + INTERMEDIATE_COPIES * shape.intermediate)
        )
        worst = max(worst, scores + activations)
        done, left = done + chunk, left - chunk
    decode = 2 * shape.vocab * 4  # one step's float32 logits and log-probabilities
    return RequestNeed(prompt_tokens, max_tokens, reach, kv * (1 + shape.cache_copies), max(worst, decode))


#: New tokens reserved for a request that sets no ``max_tokens`` on an entry without
#: ``default_max_tokens``. Upstream lets such a request run to the context; reserving all of it
#: would refuse every open-ended request on a long-context model, so the hub reserves this
#: many and MLX's memory limit (set from the budget) stands behind what goes beyond.
OPEN_ENDED_TOKENS = 4096
#: Prompt tokens allowed for each image or audio clip a request carries (a data URL is not text).
MEDIA_TOKENS = 1024


def default_max_tokens(entry: ModelConfig) -> int:
    """The ``max_tokens`` reserved for a request that leaves it out: the entry's default, else
    ``OPEN_ENDED_TOKENS`` (or the context, when that is shorter)."""
    if entry.default_max_tokens is not None:
        return entry.default_max_tokens

    context = entry.context_length or native_context_length(entry.model_path)
    return min(context, OPEN_ENDED_TOKENS) if context else OPEN_ENDED_TOKENS


class PromptCounter:
    """The hub's own copies of the entries' tokenizers, loaded once per folder and template.

    Never upstream's copy, which its worker thread uses: a Rust tokenizer shared
    between threads can fail "Already borrowed". One per engine, so two hubs in
    one process count with copies of their own.
    """

    def __init__(self) -> None:
        self._tokenizers: dict[tuple[str, str | None], Any] = {}
        self._locks: dict[tuple[str, str | None], threading.Lock] = {}
        self._lock = threading.Lock()

    def tokenizer(self, entry: ModelConfig) -> tuple[Any, threading.Lock] | None:
        """The tokenizer for ``entry`` and the lock to use it under; None where none can be loaded."""
        key = (entry.model_path, entry.chat_template_file)
        with self._lock:
            if key in self._tokenizers:
                found = self._tokenizers[key]
                return None if found is None else (found, self._locks[key])
        tokenizer = _load_tokenizer(entry)
        with self._lock:
            found = self._tokenizers.setdefault(key, tokenizer)
            lock = self._locks.setdefault(key, threading.Lock())
        return None if found is None else (found, lock)


def _load_tokenizer(entry: ModelConfig) -> Any:
    folder = model_folder(entry.model_path)
    if folder is None:
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=entry.trust_remote_code)
        if entry.chat_template_file:
            tokenizer.chat_template = Path(entry.chat_template_file).read_text(encoding="utf-8")
        return tokenizer
    except Exception as exc:  # counting falls back to a bound; the load reports real problems
        log.debug("model '%s': no tokenizer to count prompts with (%s)", entry.name, exc)
        return None


#: Tokens a chat template adds per message (role markers, separators) when it cannot be rendered here.
TEMPLATE_TOKENS_PER_MESSAGE = 8


def _texts(value: Any) -> list[str]:
    """Every string inside a request's messages or prompt, in order, less data URLs (see ``_media``)."""
    if isinstance(value, str):
        return [] if value.startswith("data:") else [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def _media(value: Any) -> int:
    """How many images or audio clips a request carries (content parts and data URLs)."""
    if isinstance(value, str):
        return int(value.startswith("data:"))
    if isinstance(value, dict):
        if value.get("type") in ("image", "image_url", "input_image", "input_audio"):
            return 1
        return sum(_media(v) for v in value.values())
    if isinstance(value, list):
        return sum(_media(v) for v in value)
    return 0


def _system_first(data: dict[str, Any]) -> list[Any] | None:
    """The chat a template renders: an Anthropic ``system`` or a Responses ``instructions`` as the
    first message (neither is in ``messages``), then the messages themselves."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return None
    system = [t for key in ("system", "instructions") for t in _texts(data.get(key))]
    return [{"role": "system", "content": "\n".join(system)}, *messages] if system else messages


def prompt_tokens(entry: ModelConfig, data: dict[str, Any], counter: PromptCounter) -> int:
    """The prompt tokens of a request body, counted with the model's own tokenizer and chat template.

    Exact where it can be: the hub's copy of the tokenizer renders ``messages``
    (and ``tools``, with a ``system``/``instructions`` field first) through the
    chat template as upstream does; each image or audio clip adds ``MEDIA_TOKENS``. Where the
    template cannot take the body (content parts, odd roles), the text of every
    string is tokenized plus ``TEMPLATE_TOKENS_PER_MESSAGE`` per message; without
    any tokenizer, UTF-8 bytes bound it (a byte-level BPE token is at least one
    byte). Blocking (a first use loads the tokenizer): run it in a worker thread.
    """
    messages = _system_first(data)
    parts = _texts(messages) + _texts(data.get("prompt")) + _texts(data.get("input"))
    parts += [json.dumps(data["tools"])] if data.get("tools") else []
    overhead = TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 1) if isinstance(messages, list) else 0
    overhead += MEDIA_TOKENS * _media([messages, data.get("input")])
    found = counter.tokenizer(entry)
    if found is None:
        return sum(len(p.encode()) for p in parts) + overhead
    tokenizer, lock = found
    with lock:
        if isinstance(messages, list) and getattr(tokenizer, "chat_template", None):
            try:
                ids = tokenizer.apply_chat_template(
                    messages, tools=data.get("tools") or None, add_generation_prompt=True, tokenize=True
                )
                if hasattr(ids, "keys"):  # transformers 5 answers a BatchEncoding
                    ids = ids["input_ids"]
                return len(ids) + MEDIA_TOKENS * _media(messages)
            except Exception:
                pass
        return sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in parts) + overhead


def requested_max_tokens(entry: ModelConfig, data: dict[str, Any]) -> int:
    """The request's own ``max_tokens`` (or ``max_completion_tokens``/``max_output_tokens``), else the default."""
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default_max_tokens(entry)


def estimate_request(
    entry: ModelConfig, data: dict[str, Any] | None, counter: PromptCounter, plan: CachePlan | None = None
) -> RequestNeed:
    """One request's reservation from its JSON body: prompt tokens + max_tokens through ``request_need``,
    with the loaded model's cache ``plan`` where there is one."""
    shape = kv_shape(entry, plan)
    if shape is None or data is None:
        return RequestNeed(0, 0, 0, 0, 0)
    return request_need(shape, prompt_tokens(entry, data, counter), requested_max_tokens(entry, data))
