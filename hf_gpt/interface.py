"""The model's boundary, which `modeling_gpt.py` calls and its reader may skip: the checks that turn bad input into a
clear error (instead of a failure deep inside, or a silently wrong result), the attention masks of each layer type as
transformers' `masking_utils` makes them for the attention implementation in use, and the names transformers changed
between releases.

`modeling_gpt.py` imports it relatively, so `save_pretrained` copies it beside the model code and a folder loaded with
`trust_remote_code=True` has it too.
"""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_gpt import LAYER_TYPES

if TYPE_CHECKING:
    from .configuration_gpt import GPTConfig

# transformers renamed the outputs' `past_key_values` field to `cache` in 5.24; follow whichever is installed.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# ... and masking_utils' argument for it.
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """`cache`, or else `past_key_values`, its name before transformers 5.24 (and deprecated from then on, with the
    same warning as transformers' own models give)."""
    if past_key_values is None:
        return cache
    if _CACHE_FIELD == "cache" and not torch.compiler.is_compiling():  # (a compiled graph cannot warn)
        warnings.warn("`past_key_values` is deprecated; pass `cache` instead.", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def check_inputs(
    config: GPTConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | dict | None,
    position_ids: torch.Tensor | None,
    cache: Cache | None,
    output_attentions: bool | None = None,
) -> None:
    """Raise a clear error for inputs that would otherwise fail deep inside (or silently give wrong results). Under
    torch.compile only the checks that read no tensor into Python run."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    implementation = config._attn_implementation
    wants_attentions = config.output_attentions if output_attentions is None else output_attentions
    if wants_attentions and implementation not in (None, "eager", "sdpa"):
        # Only the written-out attention has probabilities to return; the masks of SDPA (and ours) suit it, not those
        # of flash (2-D padding), flex (a BlockMask) or paged attention.
        raise ValueError(
            f"output_attentions=True needs attn_implementation 'eager' or 'sdpa', not {implementation!r}: "
            "load the model with attn_implementation='eager' (or call model.set_attn_implementation('eager'))."
        )
    if input_ids is not None:
        lo, hi = _integer_range(input_ids, "input_ids")
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(
                f"input_ids holds {lo if lo < 0 else hi}, outside [0, {config.vocab_size - 1}]: check the tokenizer "
                "matches the model."
            )
    given, name, dims = (input_ids, "input_ids", 2) if input_ids is not None else (inputs_embeds, "inputs_embeds", 3)
    if given.dim() != dims:
        raise ValueError(f"{name} has shape {tuple(given.shape)}; expected (batch, tokens{', n_embd' * (dims == 3)}).")
    B, T = given.shape[:2]
    if T == 0:
        raise ValueError("Empty input: `input_ids` / `inputs_embeds` must hold at least one token per row.")
    if torch.compiler.is_compiling():
        return
    # Tokens already in the cache: an int, or a 0-d tensor for static caches. (The paged cache of continuous
    # batching holds many sequences and always comes with position_ids; it has no single length.)
    past = cache.get_seq_length() if isinstance(cache, Cache) else 0
    if position_ids is None and past + T > config.n_positions:
        raise ValueError(
            f"Input of {past + T} tokens (including {past} cached) is longer than the model's {config.n_positions} "
            "positions (config.n_positions). Crop the input to its last n_positions tokens, or evaluate long "
            "texts with a sliding window (`hf-gpt eval-ppl --stride`)."
        )
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected ({B}, {T}) or (1, {T}).")
        lo, hi = _integer_range(position_ids, "position_ids")
        n = config.n_positions
        if lo < 0:
            raise ValueError(f"position_ids holds {lo}; positions count from 0.")
        if hi >= n:  # the input is longer than the model can read; say so, and what to pass instead
            raise ValueError(
                f"position_ids reaches {hi}, but the model has {n} positions (0-{n - 1}, config.n_positions): the "
                f"input is longer than the model's context. In generate(), the prompt plus the new tokens must fit in "
                f"{n}: lower max_new_tokens (or max_length), or crop the prompt to its last tokens."
            )
    if attention_mask is None or isinstance(attention_mask, dict) or not isinstance(cache, Cache | None):
        return  # (masks made for the paged cache of continuous batching span all its sequences)
    # A static cache may also take the mask padded to its full length.
    widths = (int(past) + T, cache.get_max_length() if isinstance(cache, Cache) else -1)
    shape = tuple(attention_mask.shape)
    if len(shape) == 4:
        fits = shape[0] in (1, B) and shape[1:3] == (1, T) and shape[3] in widths
    else:
        fits = len(shape) == 2 and shape[0] == B and shape[1] in widths
    if not fits:
        raise ValueError(
            f"attention_mask has shape {shape}; expected (batch, past + new tokens) = ({B}, {widths[0]}): "
            f"one 0/1 entry per cached and new token (or a full mask of shape ({B}, 1, {T}, {widths[0]}))."
        )


def check_labels(labels: torch.Tensor | None, hidden: torch.Tensor) -> None:
    """Language-model labels are one per input token, (B, T) like the hidden states (B, T, C)."""
    if labels is not None and labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}; expected {tuple(hidden.shape[:2])} like input_ids "
            "(the model shifts them by one itself; use -100 for positions to ignore)."
        )


def _integer_range(ids: torch.Tensor, name: str) -> tuple[int, int]:
    """The smallest and largest of integer `ids` ((0, 0) if there are none, or under torch.compile, which cannot read
    them into Python); a TypeError for floats or booleans."""
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {ids.dtype}.")
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return 0, 0
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one read back from a GPU, not two
    return lo, hi


def layer_masks(
    config: GPTConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | dict | None,
    cache: Cache | None,
    past: int | torch.Tensor,
    position_ids: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """The mask of each layer type ("full_attention", "sliding_attention") in the form the attention implementation
    takes (transformers' `masking_utils`: None where causality alone rules, a 4-D mask for SDPA / eager, a BlockMask for
    flex, the 2-D padding for flash), following the padding, the cache (its length and, for local layers, its window),
    and padding-free packed documents (`position_ids` as the caller gave them, restarting at 0, with no
    `attention_mask`)."""
    if isinstance(attention_mask, dict):  # already made per layer type (continuous batching, static caches)
        return attention_mask
    if attention_mask is not None and attention_mask.dim() == 4:
        # The caller's full mask. A static cache holds more slots than tokens seen so far: the empty ones after
        # them may not be attended to.
        max_len = cache.get_max_length() if isinstance(cache, Cache) else -1
        if max_len > attention_mask.shape[-1]:
            fill = False if attention_mask.dtype == torch.bool else torch.finfo(attention_mask.dtype).min
            attention_mask = F.pad(attention_mask, (0, max_len - attention_mask.shape[-1]), value=fill)
        mask = attention_mask if attention_mask.is_floating_point() else attention_mask.bool()
        return dict.fromkeys(LAYER_TYPES.values(), mask)
    args = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    if isinstance(cache, Cache) and not torch.compiler.is_compiling() and int(past) == 0:
        if not cache.is_compileable:
            # An empty dynamic cache sizes the masks as no cache would; passed as None, it lets masking_utils find
            # padding-free packed documents (it looks only where there is no cache).
            cache = None
        elif attention_mask is None and position_ids is not None and inputs_embeds.shape[1] > 1:
            # Into an empty static cache, packed documents are ours to find; its empty slots belong to none.
            docs = find_packed_sequence_indices(position_ids.expand(inputs_embeds.shape[0], -1))
            if docs is not None:
                docs = F.pad(docs, (0, cache.get_max_length() - docs.shape[1]), value=-1)
                args["and_mask_function"] = packed_sequence_mask_function(docs)
    args.update({_MASK_CACHE_ARG: cache, "position_ids": position_ids})
    masks = {"full_attention": create_causal_mask(**args)}
    if config.sliding_window is not None:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
    return masks
