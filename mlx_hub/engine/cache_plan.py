"""What each layer of a loaded model keeps per request, read from the model's own caches.

config.json says how many layers and KV heads a model has, but not what each
layer's cache holds: a hybrid model's linear-attention and Mamba layers
(olmo_hybrid, qwen3_next, bailing_hybrid, nemotron_h...) keep a fixed-size
state (mlx-lm's ``ArraysCache``/``MambaCache``), sliding-window layers a
``RotatingKVCache`` bounded by its window, and a looped model (nanbeige) one
cache per loop and layer. The config formula (reservation.kv_shape) counts
every layer as full attention, overestimating such models many times over.

At load, ``measure`` builds the caches exactly as upstream does
(``make_prompt_cache(model, max_kv_size=context_length)``: the model's own
``make_cache`` where it has one), runs one token through them, and reads what
each layer kept: K and V bytes per token and the window of a growing layer,
the bytes of a fixed state. ``CachePlan.kv_bytes`` then gives a request's cache
at any length without another forward pass. Duck-typed on the cache objects, so
mlx-vlm's cache classes read the same as mlx-lm's.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: KVCache and RotatingKVCache grow in blocks of this many tokens (mlx-lm's ``step``).
STEP = 256

GROW, WINDOW, STATE = "grow", "window", "state"


def kv_blocks(tokens: int) -> int:
    """``tokens`` rounded up to whole blocks: what a growing cache has allocated for them."""
    return -(-tokens // STEP) * STEP


def quantized_bytes(dim: int, bits: int, group_size: int, dtype_bytes: int) -> int:
    """One head's K (or V) of one token once mlx-lm quantizes the cache (``kv_bits``): packed
    values plus a scale and a bias per group."""
    return dim * bits // 8 + 2 * (dim // group_size) * dtype_bytes


@dataclass(frozen=True)
class LayerCache:
    """One cache of a model: a growing KV, a bounded window of KV, or a fixed state."""

    kind: str  # GROW, WINDOW or STATE
    token_bytes: int = 0  # K and V of one token (GROW, WINDOW)
    state_bytes: int = 0  # what a STATE cache holds, whatever the length
    window: int = 0  # a WINDOW's bound in tokens
    kv_heads: int = 0
    k_dim: int = 0
    v_dim: int = 0
    dtype_bytes: int = 2

    def quantized_token_bytes(self, bits: int, group_size: int) -> int:
        """K and V of one token once mlx-lm quantizes the cache (``kv_bits``)."""
        return self.kv_heads * sum(
            quantized_bytes(d, bits, group_size, self.dtype_bytes) for d in (self.k_dim, self.v_dim)
        )

    def held(self, prompt: int, reach: int, prefill_step: int) -> int:
        """Tokens a GROW or WINDOW cache holds at its largest over a request.

        A growing cache: every token, in 256-token blocks. A window: at most its
        bound once decoding, but while prefilling, mlx-lm's ``RotatingKVCache``
        concatenates a whole chunk onto what it keeps (up to ``window - 1 + chunk``).
        """
        if self.kind == GROW:
            return kv_blocks(reach)
        decoding = min(kv_blocks(reach), self.window)
        # mlx-lm prefills all but the last prompt token, which the first decode step takes.
        prefilled = prompt - 1
        prefilling = (
            min(prefilled, self.window - 1 + min(prefilled, prefill_step)) if prompt > self.window else 0
        )
        return max(decoding, prefilling)


@dataclass(frozen=True)
class CachePlan:
    """Every cache a model makes for one sequence, in order."""

    layers: tuple[LayerCache, ...]

    @property
    def grows(self) -> bool:
        """Whether some cache grows with every token (a full-attention layer)."""
        return any(layer.kind == GROW for layer in self.layers)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Per attention layer (fixed states left out): None for full attention, else the window."""
        return tuple(None if c.kind == GROW else c.window for c in self.layers if c.kind != STATE)

    def kv_bytes(
        self,
        prompt: int,
        reach: int,
        *,
        prefill_step: int,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ) -> int:
        """One sequence's cache bytes at its largest: a prompt of ``prompt`` tokens run to ``reach``.

        ``kv_bits`` quantizes the growing caches (mlx-lm cannot quantize a rotating one).
        """
        total = 0
        for layer in self.layers:
            if layer.kind == STATE:
                total += layer.state_bytes
                continue
            per_token = layer.token_bytes
            if kv_bits is not None and layer.kind == GROW:
                per_token = layer.quantized_token_bytes(kv_bits, kv_group_size)
            total += per_token * layer.held(prompt, reach, prefill_step)
        return total


def _nbytes(value: Any) -> int:
    """Bytes of every MLX array inside a cache's state (nested lists and tuples)."""
    import mlx.core as mx

    if isinstance(value, mx.array):
        return int(value.nbytes)
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _read(cache: Any) -> list[LayerCache]:
    """The plan of one cache object after a one-token prefill (a CacheList is several)."""
    import mlx.core as mx

    inner = getattr(cache, "caches", None)
    if isinstance(inner, list | tuple):
        return [layer for c in inner for layer in _read(c)]
    keys, values = getattr(cache, "keys", None), getattr(cache, "values", None)
    if isinstance(keys, mx.array) and isinstance(values, mx.array):
        heads, k_dim, v_dim = keys.shape[1], keys.shape[-1], values.shape[-1]
        size = keys.dtype.size
        bound = getattr(cache, "max_size", None) or getattr(cache, "chunk_size", None)
        return [
            LayerCache(
                WINDOW if isinstance(bound, int) else GROW,
                token_bytes=heads * (k_dim + v_dim) * size,
                window=bound if isinstance(bound, int) else 0,
                kv_heads=heads,
                k_dim=k_dim,
                v_dim=v_dim,
                dtype_bytes=size,
            )
        ]
    if keys is not None and not isinstance(keys, mx.array):  # quantized from the start: count its bytes
        return [LayerCache(STATE, state_bytes=_nbytes(getattr(cache, "state", ())))]
    held = getattr(cache, "nbytes", None)
    return [LayerCache(STATE, state_bytes=int(held) if isinstance(held, int) else _nbytes(cache.state))]


def language_model(handler: Any) -> tuple[Any, Any] | None:
    """The text model a handler generates with and its library's ``make_prompt_cache``; None where it
    has none (embeddings, whisper)."""
    inner = getattr(getattr(handler, "model", None), "model", None)
    if inner is None:
        return None
    if getattr(handler, "handler_type", None) == "multimodal" or hasattr(inner, "language_model"):
        from mlx_vlm.models.cache import make_prompt_cache as make_vlm_cache

        return getattr(inner, "language_model", inner), make_vlm_cache
    from mlx_lm.models.cache import make_prompt_cache

    return inner, make_prompt_cache


def measure(model: Any, make_prompt_cache: Any, max_kv_size: int | None) -> CachePlan | None:
    """Run one token through the caches upstream would make, and read what each layer kept.

    Blocking and evaluated here (run it on the load thread). None where the model
    does not take a one-token call with a cache; the config formula stands then.
    """
    import mlx.core as mx

    try:
        caches = make_prompt_cache(model, max_kv_size=max_kv_size)
        mx.eval(model(mx.array([[0]]), cache=caches))
        mx.eval([c.state for c in caches])
        return CachePlan(tuple(layer for c in caches for layer in _read(c)))
    except Exception as exc:  # an unusual model: the config formula is the fallback
        log.info("no cache plan for %s (%s); its requests are estimated from config.json", type(model), exc)
        return None


class PlanMemo:
    """One measurement per model identity and cache size, for every load of that model.

    The probe is a decode step of the whole model: milliseconds on Metal, most of
    a second for a 0.5B model in 16 bits on a CPU, and a JIT model's first request
    waits for it. What it reads follows from the model's architecture and shape,
    which its identity pins (the weight files and KV options, prompt_identity.py),
    not from the loaded object: a model loaded again after an unload (idle, a
    group swap, a budget eviction) and a second entry of a loaded model (weights.py
    hands it the same object) reuse the plan. Per engine; a plan is a few numbers
    per layer, kept for each identity the engine has loaded.
    """

    def __init__(self) -> None:
        self._plans: dict[tuple[str, int | None], CachePlan | None] = {}
        self._lock = threading.Lock()  # loads run one at a time, but a memo should not rely on it

    def handler_plan(self, handler: Any, max_kv_size: int | None, identity: str) -> CachePlan | None:
        """The cache plan of a freshly built handler's model (``identity`` names what it loaded); None where
        there is no text model."""
        try:
            found = language_model(handler)
        except Exception as exc:  # a library without the cache module: the config formula stands
            log.info("no cache plan for %s (%s)", type(handler).__name__, exc)
            return None
        if found is None:
            return None
        key = (identity, max_kv_size)
        with self._lock:
            if key in self._plans:
                return self._plans[key]
        plan = measure(*found, max_kv_size)
        with self._lock:
            self._plans[key] = plan
        return plan
