"""The GPT family (GPT-1, GPT-2, GPT-3 style) as a native transformers model.

Reads top to bottom: attention masks, attention, MLP, block, GPTPreTrainedModel, GPTModel, GPTForCausalLM,
then the task heads. The speed and memory helpers (the training loss without logits, recomputation in
backward, one-row CPU matmuls, and `Linear` / `Dropout`: `nn.Linear` / `nn.Dropout` with faster CPU kernels)
are in `ops.py`.
Parameter names follow OpenAI's GPT-2 (`wte`, `wpe`, `h.N.attn.c_attn`, `ln_f`, ...), stored as
`nn.Linear` (out, in); GPT-2's `Conv1D` checkpoints are (in, out), so loading them is a key copy plus a
transpose (see `conversion.py`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.utils import logging

from .configuration_gpt import GPTConfig
from .ops import Dropout, Linear, causal_lm_loss, one_row_matmuls, recompute_in_backward

logger = logging.get_logger(__name__)

# transformers renamed the outputs' `past_key_values` field to `cache` in 5.24; follow whichever is installed.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

_ACTIVATIONS = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),  # GPT-2's (and GPT-1's released code's) tanh GELU
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def check_token_ids(ids: torch.Tensor, limit: int, name: str) -> None:
    """Raise a clear error for ids an embedding lookup would fail on deep inside (or on a GPU, assert on)."""
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {ids.dtype}.")
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one read back from a GPU, not two
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds {bad}, outside [0, {limit - 1}]: check the tokenizer matches the model.")


def last_token_index(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_token_id: int | None, T: int
) -> torch.Tensor | int:
    """Index of each row's last real token: from the mask, else the last non-pad id, else T - 1."""
    if attention_mask is not None:
        real = attention_mask.bool()
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return T - 1
    positions = torch.arange(T, device=real.device)
    return (positions * real).argmax(-1)  # (B,)


def cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """`cache`, or else `past_key_values`, its name before transformers 5.24 (and deprecated from then on, with the
    same warning as transformers' own models give)."""
    if past_key_values is None:
        return cache
    if _CACHE_FIELD == "cache" and not torch.compiler.is_compiling():  # (a compiled graph cannot warn)
        warnings.warn("`past_key_values` is deprecated; pass `cache` instead.", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def as_returned(output, return_dict: bool | None, config: GPTConfig):
    """transformers' convention: the `ModelOutput`, or its tuple (None fields left out) when `return_dict`, or
    else `config.return_dict`, is False (torch.jit.trace, for one, needs tuples)."""
    keep = return_dict if return_dict is not None else config.return_dict
    return output if keep else output.to_tuple()


class AttentionMasks:
    """Builds, once per forward and per kind, the boolean masks (True = may attend) the blocks share.

    Query i (0-based within this call) sits at cache slot `past + i`; key j at slot j. A key is visible
    when it is not in the future, is not padding, lies in the same packed document, is allowed by the
    caller's own 4-D mask if one was given, and, for "local" layers, lies within the window. Returns None
    where causality is the only rule and needs no mask (no padding, packing or caller's mask; every key within
    the window): with no past, SDPA's own `is_causal` path; for one new token on a cache holding exactly the
    tokens seen so far (dynamic-cache decoding), every key is visible.
    """

    def __init__(
        self,
        key_padding: torch.Tensor | None,
        past: int | torch.Tensor,
        q_len: int,
        window: int,
        documents: torch.Tensor | None = None,
        custom: torch.Tensor | None = None,
    ) -> None:
        self.key_padding = key_padding  # (B, past + T) or (B, static cache length) bool; None: nothing padded
        self.documents = documents  # (B, T) index of the packed document of each token, or None
        self.custom = custom  # (B|1, 1, T, past + T) bool given by the caller, or None
        # `past` is a 0-d tensor for static caches. It is only ever added to, never read back into Python,
        # so a compiled decoding step has no data-dependent branch.
        self.past, self.q_len, self.window = past, q_len, window
        self._built: dict = {}

    def slots(self, device: torch.device) -> torch.Tensor:
        """(T,) cache slot of each query: past + arange(T)."""
        if "slots" not in self._built:
            self._built["slots"] = self.past + torch.arange(self.q_len, device=device)
        return self._built["slots"]

    def get(self, kind: str, k_len: int, device: torch.device) -> torch.Tensor | None:
        # Every layer of one forward sees the same cache length, so the kind alone names the mask (a key
        # length would be a symbolic int under torch.export, which cannot be hashed).
        if kind not in self._built:
            self._built[kind] = self._build(kind, k_len, device)
        return self._built[kind]

    def _build(self, kind: str, k_len: int, device: torch.device) -> torch.Tensor | None:
        T = self.q_len
        plain = self.key_padding is None and self.documents is None and self.custom is None
        # (a static cache's `past` is a tensor, and its keys run on past the tokens seen: it always gets a mask)
        exact = isinstance(self.past, int) and k_len == self.past + T and (self.past == 0 or T == 1)
        if plain and exact and (kind == "global" or self.window >= k_len):
            return None
        q_slot = self.slots(device)[:, None]  # (T, 1)
        k_slot = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        mask = k_slot <= q_slot
        if kind == "local":
            mask = mask & (q_slot - k_slot < self.window)
        mask = mask[None, None]  # (1, 1, T, Tk)
        if self.key_padding is not None:
            mask = mask & over_keys(self.key_padding, k_len)[:, None, None, :]  # (B, 1, T, Tk)
            # A query that is itself padding sees nothing; let it see itself so softmax stays finite.
            # Its output is never used, and real tokens never attend to it.
            mask = mask | (q_slot == k_slot)[None, None]
        if self.documents is not None:  # padding-free packing: no attention across document boundaries
            docs = self.documents
            same = docs[:, None, :, None] == docs[:, None, None, :]  # (B, 1, T, T)
            # Documents come only without a past, so keys 0..T-1 are this call's tokens.
            mask = mask & over_keys(same, k_len)  # (B, 1, T, Tk)
        if self.custom is not None:
            mask = mask & over_keys(self.custom, k_len)  # (B|1, 1, T, Tk)
        return mask


def over_keys(mask: torch.Tensor, k_len: int) -> torch.Tensor:
    """A boolean mask whose last dim runs over key slots, cut or padded (with False) to the `k_len` slots the
    attention sees: a static cache is longer than the tokens seen so far, and its further slots are empty."""
    if mask.shape[-1] < k_len:
        mask = F.pad(mask, (0, k_len - mask.shape[-1]), value=False)
    return mask[..., :k_len]


class GPTAttention(nn.Module):
    """Multi-head causal self-attention, dense or locally banded."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.kind = config.layer_attention(layer_idx)
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        masks: AttentionMasks,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)  # (B, T, 3, nh, hs): q, k, v side by side
        # (unbinding the q/k/v dim itself keeps backward's stack of the three gradients contiguous)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, nh, T, hs)
        if cache is not None:
            # The slot positions are passed for caches (static ones on older transformers) that need them.
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": masks.slots(x.device)})  # (B, nh, Tk, hs)
        mask = masks.get(self.kind, k.shape[2], x.device)  # (B|1, 1, T, Tk) or None = plain causal

        dropout = self.config.attn_pdrop if self.training else 0.0
        weights = None
        # Written out so the attention probabilities can be returned. Also on CPU where SDPA is slower: with
        # attention dropout (no fused kernel; its fallback makes several more passes over (B, nh, T, Tk)), and for
        # a bf16 decoding step of several rows, where oneDNN's batched matmuls take a third of SDPA's time (at
        # batch 1 SDPA is the faster, as `one_row_matmuls` turns oneDNN off there).
        bf16_decoding = T == 1 and B > 1 and q.dtype == torch.bfloat16 and not torch.compiler.is_compiling()
        written_out = x.device.type == "cpu" and (dropout > 0 or bf16_decoding)
        if output_attentions or self.config._attn_implementation == "eager" or written_out:
            # Each pass over the (B, nh, T, Tk) scores costs as much as a block's small matmuls, so there are few:
            # the 1/sqrt(hs) scale goes on q, the mask is added in place (nothing for backward to undo), and the
            # dropout's 1/(1-p) goes on the (B, nh, T, hs) output.
            scores = (q * (1 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)  # (B, nh, T, Tk)
            if mask is None and T > 1:  # plain causal (no past here); a single new token without a mask sees all
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                min_value = torch.finfo(scores.dtype).min
                scores += torch.zeros(mask.shape, dtype=scores.dtype, device=x.device).masked_fill_(~mask, min_value)
            # Softmax in the scores' dtype: low-precision kernels accumulate in fp32 and round once.
            weights = probs = F.softmax(scores, dim=-1)
            if dropout > 0:
                # Dropout written out, so that backward rebuilds the dropped probabilities from `probs` (kept for
                # the softmax's gradient) and `drop` (for the dropout's) rather than storing them too.
                # (torch.rand is about twice as fast as bernoulli_ on CPU)
                drop = torch.rand(probs.shape, device=probs.device) < dropout
                kept = torch.where(drop, 0.0, probs)  # (masked_fill would copy, then fill)
                with recompute_in_backward(kept, lambda: torch.where(drop, 0.0, probs)):
                    y = (kept @ v) * (1 / (1 - dropout))  # (B, nh, T, hs)
                weights = kept / (1 - dropout) if output_attentions else None
            else:
                y = weights @ v  # (B, nh, T, hs)
        else:
            # No mask: causal over this call's tokens, or a single new token that sees every key
            causal = mask is None and bool(T > 1)  # (bool: torch.jit.trace hands out sizes as tensors)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y)), weights


class GPTMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.act = _ACTIVATIONS[config.activation_function]()
        self.c_proj = Linear(inner, config.n_embd)
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C)
        a = self.act(h)
        # Backward keeps h for the activation's gradient; c_proj's weight gradient gets `a` rebuilt from it.
        with recompute_in_backward(a, lambda: self.act(h)):
            y = self.c_proj(a)
        return self.dropout(y)


class GPTBlock(GradientCheckpointingLayer):
    """One transformer block. GPT-2/3 normalise before each sub-layer ("pre"), GPT-1 after the residual add ("post")."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPTMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        masks: AttentionMasks,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            a, weights = self.attn(self.ln_1(x), masks, cache, output_attentions)
            x = x + a
            x = x + self.mlp(self.ln_2(x))
        else:
            a, weights = self.attn(x, masks, cache, output_attentions)
            x = self.ln_1(x + a)
            x = self.ln_2(x + self.mlp(x))
        return x, weights


class GPTPreTrainedModel(PreTrainedModel):
    config_class = GPTConfig
    config: GPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPTBlock"]
    _supports_sdpa = True
    _can_compile_fullgraph = True
    # Old GPT-2 / GPT-1 checkpoints carry causal-mask buffers; masks are built on the fly here.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$", r"\.attn\.masked_bias$"]

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the source (it looks for its AttentionInterface); GPTAttention reads
        # config._attn_implementation on every call, so `set_attn_implementation("eager" | "sdpa")` takes effect.
        return True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, (GPTAttention, GPTMLP)):
            # GPT-2 paper, sec. 2.3: scale the residual projections by 1/sqrt(N), N = 2 residual adds per block.
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load our own folders as usual, and also GPT-2 / OpenAI-GPT checkpoints (converted on the fly)."""
        from .conversion import foreign_checkpoint_to_ours  # conversion imports this module

        converted = foreign_checkpoint_to_ours(pretrained_model_name_or_path, kwargs)
        if converted is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        config, state_dict = converted
        if model_args or isinstance(kwargs.get("config"), GPTConfig):
            config = kwargs.pop("config", config)
        else:
            kwargs.pop("config", None)
        return super().from_pretrained(None, *model_args, config=config, state_dict=state_dict, **kwargs)


class GPTModel(GPTPreTrainedModel):
    """The transformer without a head: token + position embeddings, blocks, optional final LayerNorm."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPTBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon) if config.final_norm else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            input_ids: (B, T) token ids; only the new tokens when `cache` holds the earlier ones.
            attention_mask: (B, past + T), 1 for real tokens and 0 for padding (left or right); or a full
                (B, 1, T, past + T) mask of which keys each query may see (bool, or additive floats).
            position_ids: (B, T); by default derived from `attention_mask` (so left padding is harmless),
                else `past + arange(T)`.
            cache: a transformers `Cache` (dynamic or static) holding the keys/values of earlier tokens.
                `past_key_values` is accepted as its older name (with a deprecation warning from transformers 5.24).
            inputs_embeds: (B, T, C) instead of `input_ids`.
            token_type_ids: (B, T) ids embedded with the token embedding and added, as in transformers' GPT-2.
        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` (B, T, C), the cache, and optionally
            `hidden_states` (n_layer + 1 of (B, T, C)) and `attentions` (n_layer of (B, nh, T, Tk)).
        """
        cfg = self.config
        cache = cache_argument(cache, past_key_values)
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        use_cache = use_cache if use_cache is not None else (cfg.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputation would write the cache twice
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None:
            check_token_ids(input_ids, cfg.vocab_size, "input_ids")
            inputs_embeds = self.wte(input_ids)
        B, T = inputs_embeds.shape[:2]
        if T == 0:
            raise ValueError("Empty input: `input_ids` / `inputs_embeds` must hold at least one token per row.")
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        past = cache.get_seq_length() if cache is not None else 0  # int, or a 0-d tensor for static caches
        compiling = torch.compiler.is_compiling()  # then skip the checks that read tensors into Python
        if position_ids is None and not compiling and past + T > cfg.n_positions:
            raise ValueError(
                f"Input of {past + T} tokens (including {past} cached) is longer than the model's {cfg.n_positions} "
                "positions (config.n_positions). Crop the input to its last n_positions tokens, or evaluate long "
                "texts with a sliding window (`hf-gpt eval-ppl --stride`)."
            )
        # A static cache may also take the mask padded to its full length (what generate() passes it, so
        # every decoding step has the same shapes).
        widths = (int(past) + T, cache.get_max_length() if cache is not None else -1) if not compiling else ()
        if attention_mask is not None and widths:
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
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
                raise ValueError(
                    f"position_ids has shape {tuple(position_ids.shape)}; expected ({B}, {T}) or (1, {T})."
                )
            check_token_ids(position_ids, cfg.n_positions, "position_ids")

        key_padding = custom = None
        if attention_mask is not None and attention_mask.dim() == 4:
            # The caller's full mask (e.g. several continuations sharing one prefix): True / 1 = may attend, or
            # the additive float form transformers' models take (0 = may attend, a large negative = may not).
            custom = attention_mask == 0 if attention_mask.is_floating_point() else attention_mask.bool()
        elif attention_mask is not None:
            key_padding = attention_mask.bool()
            if not compiling and key_padding.all():
                key_padding = None  # all ones: the fast causal path applies
        slots = past + torch.arange(T, device=inputs_embeds.device)  # (T,) cache slots of the new tokens
        positions_given = position_ids is not None
        if position_ids is None:
            if key_padding is not None:
                # Count only real tokens, so a left-padded row gets the positions it would have alone.
                position_ids = (key_padding.long().cumsum(-1) - 1).clamp(min=0).index_select(1, slots)
            else:
                position_ids = slots[None]  # (1, T)
        x = inputs_embeds + self.wpe(position_ids)  # (B, T, C)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)
        x = self.drop(x)
        documents = None
        # A static cache's length is a 0-d tensor, which a compiled graph cannot branch on; there only an int 0
        # counts as no past (packed documents come in training batches, which have no cache).
        no_past = isinstance(past, int) and past == 0 if compiling else int(past) == 0
        if positions_given and attention_mask is None and no_past and T > 1:
            # Padding-free packed batches (e.g. TRL's packing) give no mask but restart position_ids at 0
            # for each document; each document must attend only to itself. (A traced graph cannot test the
            # values, so it always takes the document mask, which is the plain causal one for a single document.)
            starts = position_ids.expand(B, T) == 0
            if compiling or starts[:, 1:].any():
                documents = starts.long().cumsum(-1)  # (B, T)
        masks = AttentionMasks(key_padding, past, T, cfg.local_window, documents, custom)

        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                all_hidden += (x,)
            x, weights = block(x, masks, cache, output_attentions)
            if output_attentions:
                all_attn += (weights,)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden += (x,)
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=all_hidden,
            attentions=all_attn,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
        return as_returned(out, return_dict, cfg)


class GPTForCausalLM(GPTPreTrainedModel, GenerationMixin):
    """GPTModel with a language-model head (tied to the input embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.transformer = GPTModel(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """
        Args:
            As `GPTModel.forward`, plus
            labels: (B, T) targets; the model shifts them by one. -100 is ignored.
            logits_to_keep: compute logits only for the last `n` positions (0 = all), or for the
                positions a 1-D index tensor names.
            **kwargs: handed to the loss (Trainer's `num_items_in_batch` makes gradient accumulation exact).
        Returns:
            `CausalLMOutputWithPast` with `logits` (B, T', vocab_size) and `loss` when labels are given.
            In training mode with labels (and grad enabled), `logits` is None: the loss is computed
            without them.
        """
        with one_row_matmuls(input_ids if input_ids is not None else inputs_embeds, self.dtype):
            out = self.transformer(
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache_argument(cache, past_key_values),
                inputs_embeds=inputs_embeds,
                token_type_ids=token_type_ids,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            h = out.last_hidden_state  # (B, T, C)
            if labels is not None and labels.shape != h.shape[:2]:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)}; expected {tuple(h.shape[:2])} like input_ids "
                    "(the model shifts them by one itself; use -100 for positions to ignore)."
                )
            # A training step needs only the loss: take it straight from h a chunk at a time (`causal_lm_loss`),
            # so the (B, T, vocab) logits are never made and `logits` is None, as with transformers' Liger
            # kernels. In eval mode (Trainer.evaluate / predict) or without grad, logits come back as usual.
            loss_only = (
                labels is not None
                and self.training
                and torch.is_grad_enabled()
                and isinstance(logits_to_keep, int)
                and logits_to_keep == 0
                and set(kwargs) <= {"num_items_in_batch"}
            )
            logits = loss = None
            if loss_only:
                loss = causal_lm_loss(h, self.lm_head.weight, labels, kwargs.get("num_items_in_batch"))
            else:
                keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
                logits = self.lm_head(h[:, keep, :])  # (B, T', vocab)
                if labels is not None:
                    loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
        )
        return as_returned(result, return_dict, self.config)

    @staticmethod
    def create_masks_for_generate(
        attention_mask: torch.Tensor | None = None, cache: Cache | None = None, **kwargs
    ) -> torch.Tensor | None:
        """generate() would turn the 2-D mask into a 4-D one for static caches; our forward builds its own.
        For a static cache, the 2-D mask is padded to the cache's length, so that every decoding step has the
        same shapes and a compiled forward (CUDA graphs) is reused rather than rebuilt."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        max_len = cache.get_max_length() if isinstance(cache, Cache) else -1
        if attention_mask is None or attention_mask.dim() != 2 or max_len <= attention_mask.shape[1]:
            return attention_mask
        return F.pad(attention_mask, (0, max_len - attention_mask.shape[1]), value=0)


class GPTHeadModel(GPTPreTrainedModel):
    """Shared plumbing of the task heads: the transformer, the optional auxiliary LM loss of GPT-1
    (sec. 3.2: L3 = L2 + lambda * L1, lambda = `config.aux_lm_weight`), and input reshaping."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.transformer = GPTModel(config)
        # Tied to the input embedding, so it adds no parameters; used only for the auxiliary LM loss.
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def aux_lm_loss(self, h: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None):
        """lambda * next-token loss of the task input itself (padding ignored), or None when off."""
        if self.config.aux_lm_weight == 0 or input_ids is None:
            return None
        labels = input_ids.masked_fill(attention_mask == 0, -100) if attention_mask is not None else input_ids
        logits = self.lm_head(h[:, :-1]).float()  # (N, T-1, vocab): token t predicts token t+1
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return self.config.aux_lm_weight * loss


class GPTForSequenceClassification(GPTHeadModel):
    """Classification / regression from the last real token (GPT-1 sec. 3.3, transformers' GPT-2 head).

    GPT-1's similarity tasks encode both orders of a pair and add the two representations: pass
    `input_ids` of shape (B, V, T) and the V views are pooled and summed before the linear head.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """
        Args:
            input_ids: (B, T), or (B, V, T) for V views whose pooled states are summed.
            attention_mask: same shape as input_ids; the last 1 of each row is the pooled token.
            labels: (B,) class ids, (B,) floats for regression (num_labels 1), or (B, num_labels) multi-label.
        Returns:
            `SequenceClassifierOutputWithPast` with `logits` (B, num_labels).
        """
        views = input_ids.shape[1] if input_ids is not None and input_ids.dim() == 3 else 1
        flat = lambda t: t.flatten(0, 1) if t is not None and views > 1 else t  # noqa: E731  (B*V, T)
        input_ids, attention_mask, position_ids = flat(input_ids), flat(attention_mask), flat(position_ids)
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=flat(token_type_ids),
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        h = out.last_hidden_state  # (B*V, T, C)
        idx = last_token_index(input_ids, attention_mask, self.config.pad_token_id, h.shape[1])
        pooled = h[torch.arange(h.shape[0], device=h.device), idx]  # (B*V, C)
        logits = self.score(pooled.view(-1, views, pooled.shape[-1]).sum(1))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
            aux = self.aux_lm_loss(h, input_ids, attention_mask)
            loss = loss if aux is None else loss + aux
        output = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return as_returned(output, return_dict, self.config)


class GPTForMultipleChoice(GPTHeadModel):
    """One score per choice from each choice's last real token (GPT-1 sec. 3.3; the multiple-choice
    head of transformers' `GPT2DoubleHeadsModel`), softmax over choices, optional auxiliary LM loss."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.multiple_choice_head = nn.Linear(config.n_embd, 1)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mc_token_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> MultipleChoiceModelOutput:
        """
        Args:
            input_ids: (B, K, T), one row per choice (`s context $ answer_k e`).
            attention_mask: (B, K, T).
            mc_token_ids: (B, K) index of the token to score in each choice; default the last real token.
            labels: (B,) index of the right choice.
        Returns:
            `MultipleChoiceModelOutput` with `logits` (B, K).
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        B, K = ref.shape[:2]
        flat = lambda t: t.flatten(0, 1) if t is not None else None  # noqa: E731  (B*K, ...)
        input_ids, attention_mask, position_ids = flat(input_ids), flat(attention_mask), flat(position_ids)
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=flat(inputs_embeds),
            token_type_ids=flat(token_type_ids),
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        h = out.last_hidden_state  # (B*K, T, C)
        if mc_token_ids is not None:
            idx = mc_token_ids.reshape(-1)
        else:
            idx = last_token_index(input_ids, attention_mask, self.config.pad_token_id, h.shape[1])
        pooled = h[torch.arange(h.shape[0], device=h.device), idx]  # (B*K, C)
        logits = self.multiple_choice_head(self.dropout(pooled)).view(B, K)  # (B, K)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
            aux = self.aux_lm_loss(h, input_ids, attention_mask)
            loss = loss if aux is None else loss + aux
        output = MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return as_returned(output, return_dict, self.config)


class GPTForTokenClassification(GPTPreTrainedModel):
    """A label per token (transformers' `GPT2ForTokenClassification`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPTModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        """labels: (B, T) class ids, -100 ignored. Returns `logits` (B, T, num_labels)."""
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return as_returned(output, return_dict, self.config)


class GPTForQuestionAnswering(GPTPreTrainedModel):
    """Extractive QA: start and end logits per token (transformers' `GPT2ForQuestionAnswering`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.transformer = GPTModel(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput:
        """start_positions / end_positions: (B,). Returns `start_logits`, `end_logits` (B, T)."""
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        output = QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return as_returned(output, return_dict, self.config)


__all__ = [
    "GPTPreTrainedModel",
    "GPTModel",
    "GPTForCausalLM",
    "GPTForSequenceClassification",
    "GPTForMultipleChoice",
    "GPTForTokenClassification",
    "GPTForQuestionAnswering",
]
