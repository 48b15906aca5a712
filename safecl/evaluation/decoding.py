"""Greedy decoding for checks: the shared prompt prefix computed once, ended rows dropped.

A check sends n prompts through one chat template, so every prompt opens with the same tokens
(SmolLM2: the template's system turn and the user opening, 22 of the 43 tokens of an AdvBench
prompt), and most answers are decided by the judge long before ``max_new_tokens``.
``model.generate`` recomputes the shared tokens for every prompt and steps every row of a
batch until its last row ends. :func:`greedy_decode` instead:

1. runs the longest common token prefix ``P`` of all prompts once and copies its key/value
   cache into each batch (at most ``len(shortest prompt) - 1`` tokens, so every row still
   has a token of its own to run);
2. runs the rest of each prompt in chunks of ``prefill_rows`` prompts of similar length
   (longest first), each padded only to its own longest, and joins the chunks' caches for
   decoding. A row's layout is ``[front pads][P][pads][rest of prompt]``: attention mask 0 on
   every pad and position ids counted over unmasked tokens only, so every row sees the keys
   and positions it would see alone;
3. after each forward takes the argmax of the last position's logits (greedy), appends it,
   and ends a row at an EOS token, at ``max_new_tokens``, or when ``finished`` says so (asked
   once per step for all rows still going: the judge has decided, the verdict cannot change);
4. drops ended rows from the batch, the cache and the mask (compaction) once at least a
   quarter of the rows still in it have ended, so late steps run on the rows still going;
   new keys and values are written into room reserved up front (no copy of the cache per
   step, as ``DynamicLayer``'s concatenation makes).

Cost, per prompt: (prompt tokens - P) prefill tokens + the tokens until the judge decides,
against prompt tokens + the longest answer of the batch for ``model.generate``.

Invariants:
- Row by row the tokens are those of unbatched greedy ``model.generate`` (tested on a tiny
  Llama against batch size 1 and against ``model.generate`` batched, with and without early
  stops): an ended row's tokens are never extended, a running row's inputs never include
  another row's tokens.
- The returned lists hold the new tokens only, the EOS token included when one ended the row
  (as ``model.generate`` returns them), in the order of ``prompts``.

Only what this module can reproduce exactly is taken: :func:`supported` says no (and the
caller uses ``model.generate``) for sampling, beams, logits processors that change a greedy
argmax (repetition penalty, n-gram bans, forced or suppressed tokens, min length), encoder-
decoder models, and models without ``attention_mask``/``position_ids``/cache arguments; and a
cache other than full-attention ``DynamicCache`` layers (sliding-window or linear-attention
layers) raises :class:`UnsupportedCache` at the first forward, before any row is decoded, and
the caller falls back.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers < 4.56 keeps per-layer lists in DynamicCache: model.generate serves it
    DynamicLayer = None

# Generation-config fields whose non-default value changes a greedy argmax (logits processors).
_GREEDY_NEUTRAL = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "num_beams": (None, 1), "stop_strings": (None,), "constraints": (None,),
    "force_words_ids": (None,), "penalty_alpha": (None,), "diversity_penalty": (None, 0.0),
}


def supported(model) -> bool:
    """True when :func:`greedy_decode` gives exactly what greedy ``model.generate`` gives."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    gen = getattr(model, "generation_config", None)
    for key, neutral in _GREEDY_NEUTRAL.items():
        if gen is not None and getattr(gen, key, None) not in neutral:
            return False
    params = _forward_params(model)
    return {"attention_mask", "position_ids"} <= params and bool({"cache", "past_key_values"} & params)


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens all prompts share at their start, leaving each at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _plain_dynamic(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return (DynamicLayer is not None and type(cache) is DynamicCache and layers is not None
            and all(type(layer) in (DynamicLayer, _GrowingLayer) for layer in layers))


def _require_plain(cache) -> None:
    if not _plain_dynamic(cache):
        raise UnsupportedCache(type(cache).__name__)


class _GrowingLayer(DynamicLayer or object):
    """A ``DynamicLayer`` that writes new keys/values into room reserved up front.

    ``DynamicLayer.update`` concatenates, copying the whole layer every step; this one writes
    the new slots in place and hands out a view of the filled part: the same values, so
    attention computes the same numbers (2-4% of a decode step at 128-256 rows on the CPU)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        B, H, n, _ = keys.shape
        self.room_k = keys.new_empty((B, H, room, keys.shape[-1]))
        self.room_v = values.new_empty((B, H, room, values.shape[-1]))
        self.room_k[:, :, :n], self.room_v[:, :, :n] = keys, values
        self.n, self.device, self.is_initialized = n, keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.room_k[:, :, :self.n], self.room_v[:, :, :self.n]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.n + key_states.shape[-2]
        self.room_k[:, :, self.n:end] = key_states
        self.room_v[:, :, self.n:end] = value_states
        self.n = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.room_k, self.room_v = self.room_k[indices], self.room_v[indices]
        self._views()


def _growing_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], room: int) -> DynamicCache:
    """A ``DynamicCache`` holding ``kv`` in :class:`_GrowingLayer` layers of ``room`` slots."""
    cache = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in kv])
    cache.layers = [_GrowingLayer(k, v, room) for k, v in kv]
    return cache


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _cache_of(out):
    """The cache a forward returned (``cache`` from transformers 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class UnsupportedCache(RuntimeError):
    """The model's cache is not a plain ``DynamicCache``; use ``model.generate``."""


def greedy_decode(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    eos_token_ids: set[int],
    pad_token_id: int,
    finished: Callable[[list[int], list[list[int]]], list[bool]] | None = None,
    on_row_done: Callable[[int], None] | None = None,
    prefill_rows: int = 16,
) -> list[list[int]]:
    """New tokens of each prompt under greedy decoding (see the module docstring).

    Args:
        prompts: token ids of each prompt (chat template applied), at least one token each.
        batch_size: rows decoded together; rows are batched longest first.
        eos_token_ids: tokens that end a row (kept in its output).
        pad_token_id: the id written into pad slots (masked, never attended to).
        finished: ``finished(indices, new_tokens)`` -> one bool per listed row (prompt index
            ``indices[j]``, its new tokens so far ``new_tokens[j]``); True ends the row after
            its latest token. Called once per step with every row that has not ended otherwise.
        on_row_done: called with the number of rows that just ended (a progress bar).
        prefill_rows: rows per prompt forward (each padded only to its own longest prompt;
            their caches are then joined for decoding, padded in front).

    Raises:
        UnsupportedCache: the model returned a cache this decoder cannot copy or shrink
            (raised before any row is decoded).
    """
    decoder = _Decoder(model, prompts, pad_token_id)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            state = decoder.prefill(rows, prefill_rows)
            decoder.decode(state, rows, max_new_tokens, eos_token_ids, finished, on_row_done, outputs)
    return outputs


class _Decoder:
    """The model, the shared prefix's cache and how this model's forward is called."""

    def __init__(self, model, prompts: list[list[int]], pad_token_id: int):
        self.model, self.prompts, self.pad_id = model, prompts, pad_token_id
        self.device = next(model.parameters()).device
        params = _forward_params(model)
        self.keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.P = common_prefix_length(prompts)
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if self.P:
            with torch.no_grad():
                prefix = _cache_of(model(input_ids=torch.tensor([prompts[0][:self.P]], device=self.device),
                                         use_cache=True))
            _require_plain(prefix)
            self.prefix_kv = [(layer.keys, layer.values) for layer in prefix.layers]

    def _forward(self, ids, mask, positions, cache, last_only: bool):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kw: cache}, **(self.keep_kw if last_only else {}))
        return out.logits[:, -1].argmax(dim=-1), _cache_of(out)

    def prefill(self, rows: list[int], chunk: int):
        """Run the prompts of ``rows`` (longest first) in chunks; one joined state for decoding:
        (next tokens, per-layer (K, V), mask, last positions). Layout of a row:
        ``[front pads][P][pads][suffix]``, every pad masked."""
        P, device = self.P, self.device
        parts = []
        for start in range(0, len(rows), chunk):
            suffixes = [self.prompts[i][P:] for i in rows[start:start + chunk]]
            b, S = len(suffixes), max(len(x) for x in suffixes)
            ids = torch.full((b, S), self.pad_id, dtype=torch.long)
            mask = torch.zeros((b, P + S), dtype=torch.long)
            mask[:, :P] = 1
            for r, x in enumerate(suffixes):
                ids[r, S - len(x):] = torch.tensor(x, dtype=torch.long)
                mask[r, P + S - len(x):] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)[:, P:]
            cache = None
            if self.prefix_kv is not None:
                cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1).contiguous(),
                                                      v.expand(b, -1, -1, -1).contiguous()) for k, v in self.prefix_kv])
            nxt, cache = self._forward(ids.to(device), mask.to(device), positions.to(device), cache, last_only=True)
            _require_plain(cache)  # made by the model when there is no shared prefix
            parts.append((nxt, [(layer.keys, layer.values) for layer in cache.layers], mask.to(device),
                          positions[:, -1:].to(device)))
        width = max(m.shape[1] for _, _, m, _ in parts)

        def front(t, dim_from_end):  # pad the sequence axis at the front up to ``width``
            missing = width - t.shape[-dim_from_end]
            if not missing:
                return t
            pad = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return torch.nn.functional.pad(t, pad)

        n_layers = len(parts[0][1])
        kv = [(torch.cat([front(p[1][l][0], 2) for p in parts]), torch.cat([front(p[1][l][1], 2) for p in parts]))
              for l in range(n_layers)]
        return (torch.cat([p[0] for p in parts]), kv, torch.cat([front(p[2], 1) for p in parts]),
                torch.cat([p[3] for p in parts]))

    def decode(self, state, rows, max_new_tokens, eos_ids, finished, on_row_done, outputs) -> None:
        """Greedy steps from a prefilled state until every row of ``rows`` has ended."""
        nxt, kv, mask, last_pos = state
        cache = _growing_cache(kv, mask.shape[1] + max_new_tokens)
        del kv
        live = list(range(len(rows)))  # batch position -> index into rows
        ended: set[int] = set()
        for step in range(max_new_tokens):
            if step:
                mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=self.device)], dim=1)
                last_pos = last_pos + 1
                nxt, cache = self._forward(nxt[:, None], mask, last_pos, cache, last_only=False)
            tokens = nxt.tolist()
            asked = []
            before = len(ended)
            for b, r in enumerate(live):
                if r in ended:
                    continue
                i = rows[r]
                outputs[i].append(tokens[b])
                if tokens[b] in eos_ids or len(outputs[i]) >= max_new_tokens:
                    ended.add(r)
                elif finished is not None:
                    asked.append(r)
            if asked:
                verdicts = finished([rows[r] for r in asked], [outputs[rows[r]] for r in asked])
                ended.update(r for r, done in zip(asked, verdicts) if done)
            if len(ended) > before and on_row_done is not None:
                on_row_done(len(ended) - before)
            still = [b for b, r in enumerate(live) if r not in ended]
            if not still:
                return
            if len(live) - len(still) >= max(1, len(live) // 4):  # compact: drop ended rows
                keep = torch.tensor(still, device=self.device)
                cache.batch_select_indices(keep)
                mask, nxt, last_pos = mask[keep], nxt[keep], last_pos[keep]
                live = [live[b] for b in still]
