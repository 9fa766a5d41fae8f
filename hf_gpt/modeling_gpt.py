"""The GPT family (GPT-1, GPT-2, GPT-3 style) as a native transformers model.

In transformers' order: attention, MLP, block, GPTPreTrainedModel, GPTModel, GPTForCausalLM, the task heads. Parameter
names follow OpenAI's GPT-2 (`wte`, `wpe`, `h.N.attn.c_attn`, `ln_f`, ...), stored as `nn.Linear` (out, in); GPT-2's
`Conv1D` checkpoints are (in, out), so loading one is a key copy plus a transpose (`conversion.py`, which also gives
`from_pretrained` its GPT-2 / OpenAI-GPT path). `ops.py` holds the speed and memory helpers (`Linear` and `Dropout` are
`nn.Linear` and `nn.Dropout` with faster CPU kernels), `interface.py` the input checks, the attention masks of each
layer type (from transformers' `masking_utils`) and what differs between transformers releases.
"""

import math
from contextlib import nullcontext
from typing import Unpack

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import AttentionInterface
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_gpt import GPTConfig
from .conversion import LoadsGPT2Checkpoints
from .interface import _CACHE_FIELD, cache_argument, check_inputs, check_labels, layer_masks
from .ops import Dropout, Linear, causal_lm_loss, one_row_matmuls, recompute_in_backward

_ACTIVATIONS = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),  # GPT-2's (and GPT-1's released code's) tanh GELU
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    output_attentions: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention written out: softmax(q k^T * scaling + mask) v, q (B, nh, T, hs) against k, v (B, nh, Tk, hs).

    `attention_mask` is (B|1, 1, T, Tk), boolean (True = may attend) or additive floats, as `masking_utils` makes
    them; None means causal over this call's tokens (a single query sees every key). Returns the output (B, T, nh, hs)
    and the probabilities (B, nh, T, Tk) after dropout; None for them with dropout and not `output_attentions`.
    """
    T, Tk = query.shape[2], key.shape[2]
    # Few passes over the (B, nh, T, Tk) scores (each costs as much as a block's small matmuls): the scale goes on q,
    # and the mask is added in place.
    scores = (query * scaling) @ key.transpose(-2, -1)  # (B, nh, T, Tk)
    if attention_mask is None and T > 1:
        attention_mask = torch.ones(T, Tk, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        min_value = torch.finfo(scores.dtype).min
        if attention_mask.dtype == torch.bool:
            scores += torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
                ~attention_mask, min_value
            )
        else:  # additive; clamped so that a mask made in a wider dtype cannot overflow to -inf here
            scores += attention_mask.clamp(min=min_value).to(scores.dtype)
    probs = F.softmax(scores, dim=-1)  # in the scores' dtype: low-precision kernels accumulate in fp32
    if dropout == 0:
        return (probs @ value).transpose(1, 2), probs  # (B, T, nh, hs)
    # (torch.rand is about twice as fast as bernoulli_ on CPU; the same draw whether or not weights are returned)
    drop = torch.rand(probs.shape, device=probs.device) < dropout
    if output_attentions:
        weights = torch.where(drop, 0.0, probs) * (1 / (1 - dropout))
        return (weights @ value).transpose(1, 2), weights
    # Backward rebuilds the dropped probabilities from `probs` and `drop` (which it keeps anyway) rather than store
    # them too; 1/(1-p) goes on the output, a smaller tensor than the probabilities.
    kept = torch.where(drop, 0.0, probs)
    with recompute_in_backward(kept, lambda: torch.where(drop, 0.0, probs)):
        y = (kept @ value) * (1 / (1 - dropout))
    return y.transpose(1, 2), None


def sdpa_or_written_out_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """ "sdpa" for this model: transformers' SDPA, except on CPU where attention written out is faster (measured in
    docs/speed.md): with attention dropout, which SDPA has no fused CPU kernel for, in bf16 training, whose SDPA
    backward is slow on CPU, and bf16 decoding of several rows. Both take SDPA's masks (`masking_utils.sdpa_mask`)."""
    bf16 = query.dtype == torch.bfloat16
    bf16_training = bf16 and torch.is_grad_enabled() and query.requires_grad
    bf16_decoding_rows = bf16 and query.shape[2] == 1 and query.shape[0] > 1
    written_out = dropout > 0 or bf16_training or bf16_decoding_rows
    if query.device.type == "cpu" and not torch.compiler.is_compiling() and written_out:
        y, _ = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, False)
        return y, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


# transformers' way for a model to replace one of its attention functions (`AttentionInterface`): an instance of its
# own, whose entries override the library-wide ones for this model only; every other implementation (eager, flex,
# flash, paged, those serving engines register) is transformers'. (transformers' and vLLM's checks look for the name.)
ALL_ATTENTION_FUNCTIONS = AttentionInterface()
ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_or_written_out_attention


class GPTAttention(nn.Module):
    """Multi-head causal self-attention, dense or locally banded, through transformers' `AttentionInterface`."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.local_window if self.layer_type == "sliding_attention" else None
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        # (-1 heads: under tensor parallelism this device holds only some of them)
        qkv = self.c_attn(x).view(B, T, 3, -1, self.head_dim)  # (B, T, 3, nh, hs): q, k, v side by side
        # (unbinding the q/k/v dim itself keeps backward's stack of the three gradients contiguous)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, nh, T, hs)
        if cache is not None:
            # (`kwargs` go along: the paged cache of continuous batching reads its indices from them)
            k, v = cache.update(k, v, self.layer_idx, kwargs)  # (B, nh, Tk, hs)

        # Only the written-out attention has probabilities to return (`check_inputs` made sure its masks suit it).
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        y, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attn_dropout.p if self.training else 0.0,
            sliding_window=self.sliding_window,
            output_attentions=output_attentions,
            **kwargs,
        )
        y = y.reshape(B, T, -1)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y)), weights


# The MLP rebuilds its activation in backward instead of keeping it (one (B, T, 4C) tensor less per block) in models
# at least this wide. GPT-2 small trains with half transformers' activation memory for an activation call that is a
# few % of its step; at width 128 the activation is a far larger share of a step (bf16, 12 x 64 tokens: 47.7 vs
# 43.4 ms per step with and without) while the memory saved is under 1 MB per block.
RECOMPUTE_ACTIVATION_MIN_WIDTH = 256


class GPTMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.act = _ACTIVATIONS[config.activation_function]()
        self.c_proj = Linear(inner, config.n_embd)
        self.dropout = Dropout(config.resid_pdrop)
        self.recompute = config.n_embd >= RECOMPUTE_ACTIVATION_MIN_WIDTH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C)
        a = self.act(h)
        # Wide models: backward keeps h for the activation's gradient; c_proj's weight gradient gets `a` rebuilt from it.
        with recompute_in_backward(a, lambda: self.act(h)) if self.recompute else nullcontext():
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
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            a, weights = self.attn(self.ln_1(x), attention_mask, cache, output_attentions, **kwargs)
            x = x + a
            x = x + self.mlp(self.ln_2(x))
        else:
            a, weights = self.attn(x, attention_mask, cache, output_attentions, **kwargs)
            x = self.ln_1(x + a)
            x = self.ln_2(x + self.mlp(x))
        return x, weights


class GPTPreTrainedModel(LoadsGPT2Checkpoints, PreTrainedModel):
    """Weight initialisation and what transformers needs to know of the model. `from_pretrained` also takes GPT-2 and
    OpenAI-GPT checkpoints, converted as they load (`LoadsGPT2Checkpoints`, in conversion.py)."""

    config_class = GPTConfig
    config: GPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPTBlock"]
    # Attention goes through transformers' AttentionInterface and masks through masking_utils, so every
    # implementation transformers has (and those serving engines register, such as vLLM's) can be used.
    _supports_attention_backend = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    # Old GPT-2 / GPT-1 checkpoints carry causal-mask buffers; masks are built on the fly here.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$", r"\.attn\.masked_bias$"]

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

    @can_return_tuple
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
        past_key_values: Cache | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
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
            `hidden_states` (n_layer + 1 of (B, T, C)) and `attentions` (n_layer of (B, nh, T, Tk)); its tuple
            with `return_dict=False` (or `config.return_dict` False), as every forward here.
        """
        cfg = self.config
        cache = cache_argument(cache, past_key_values)
        check_inputs(cfg, input_ids, inputs_embeds, attention_mask, position_ids, cache, output_attentions)
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        use_cache = use_cache if use_cache is not None else (cfg.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputation would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        # Tokens already in the cache: an int, or a 0-d tensor for static caches. (The paged cache of continuous
        # batching holds many sequences and always comes with position_ids; it has no single length.)
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        T = inputs_embeds.shape[1]

        # Packed documents are found in the caller's positions (restarting at 0), never in the ones derived here.
        given_positions = position_ids
        if position_ids is None:
            slots = past + torch.arange(T, device=inputs_embeds.device)  # (T,) cache slots of the new tokens
            if attention_mask is not None and attention_mask.dim() == 2:
                # Count only real tokens, so a left-padded row gets the positions it would have alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, slots)
            else:
                position_ids = slots[None]  # (1, T)
        x = inputs_embeds + self.wpe(position_ids)  # (B, T, C)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)
        x = self.drop(x)
        masks = layer_masks(cfg, inputs_embeds, attention_mask, cache, past, given_positions)  # per layer type

        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                all_hidden += (x,)
            x, weights = block(x, masks[block.attn.layer_type], cache, output_attentions, **kwargs)
            if output_attentions:
                all_attn += (weights,)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden += (x,)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=all_hidden,
            attentions=all_attn,
            **{_CACHE_FIELD: cache if use_cache else None},
        )


class GPTForCausalLM(GPTPreTrainedModel, GenerationMixin):
    """GPTModel with a language-model head (tied to the input embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    # (No tensor-parallel plan for lm_head: it shares its weight with wte, which every device holds whole.)
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.transformer = GPTModel(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
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
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """
        Args:
            As `GPTModel.forward`, plus
            labels: (B, T) targets; the model shifts them by one. -100 is ignored.
            logits_to_keep: logits only for the last `n` positions (0 = all), or for those a 1-D index tensor names.
            **kwargs: handed to the loss too (Trainer's `num_items_in_batch` makes gradient accumulation exact).
        Returns:
            `CausalLMOutputWithPast` with `logits` (B, T', vocab_size), and `loss` when labels are given. A training
            step (train mode, grad enabled) with labels gets the loss alone: `logits` is None.
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
                **kwargs,
            )
            h = out.last_hidden_state  # (B, T, C)
            check_labels(labels, h)
            # A training step takes its loss straight from h a chunk at a time (`causal_lm_loss`): the (B, T, vocab)
            # logits are never made, as with transformers' Liger kernels. Evaluation gets logits as usual.
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
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
        )


def rows(t: torch.Tensor | None, dims: int = 3) -> torch.Tensor | None:
    """(B, K, T) as (B*K, T) ((B, K, T, C) embeddings with dims=4): an example's K choices, or views, are rows of their
    own. Anything else is returned as it is."""
    return t.flatten(0, 1) if t is not None and t.dim() == dims else t


class GPTHeadModel(GPTPreTrainedModel):
    """What the task heads share: the transformer (without a cache) over the rows of their input, each row's pooled
    token, and GPT-1's auxiliary LM loss (sec. 3.2: L3 = L2 + lambda * L1, lambda = `config.aux_lm_weight`)."""

    def __init__(self, config: GPTConfig, aux_lm_head: bool = False) -> None:
        super().__init__(config)
        self.transformer = GPTModel(config)
        if aux_lm_head:  # tied to the input embedding (`_tied_weights_keys`), so it adds no parameters
            self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

    def _features(self, input_ids, attention_mask, position_ids, inputs_embeds, token_type_ids, **kwargs):
        """The transformer's output over the input's rows: `last_hidden_state` (B*K, T, C), K = 1 for (B, T) input."""
        return self.transformer(
            rows(input_ids),
            attention_mask=rows(attention_mask),
            position_ids=rows(position_ids),
            inputs_embeds=rows(inputs_embeds, dims=4),
            token_type_ids=rows(token_type_ids),
            use_cache=False,
            return_dict=True,
            **kwargs,
        )

    def _pool(self, h, input_ids, inputs_embeds, attention_mask, index=None) -> torch.Tensor:
        """(B*K, T, C) -> (B, K, C): each row's hidden state at `index` (B, K), by default at its last real token
        (the last 1 of the attention mask, else the last id that is not padding, else the last)."""
        if index is None:
            if attention_mask is not None:
                real = rows(attention_mask).bool()
            elif input_ids is not None and self.config.pad_token_id is not None:
                real = rows(input_ids) != self.config.pad_token_id
            else:
                real = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            index = (torch.arange(h.shape[1], device=real.device) * real).argmax(-1)  # (B*K,)
        pooled = h[torch.arange(h.shape[0], device=h.device), index.reshape(-1)]  # (B*K, C)
        B = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        return pooled.view(B, -1, h.shape[-1])

    def _with_aux_lm_loss(self, loss, h, input_ids, attention_mask) -> torch.Tensor:
        """`loss` plus lambda times the next-token loss of the task input itself (padding ignored), when lambda > 0."""
        if self.config.aux_lm_weight == 0 or input_ids is None:
            return loss
        input_ids, attention_mask = rows(input_ids), rows(attention_mask)
        labels = input_ids.masked_fill(attention_mask == 0, -100) if attention_mask is not None else input_ids
        logits = self.lm_head(h[:, :-1]).float()  # (B*K, T-1, vocab): token t predicts token t+1
        lm_loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return loss + self.config.aux_lm_weight * lm_loss

    @staticmethod
    def _output(output_class: type, out: BaseModelOutputWithPast, **fields):
        """The head's `output_class` with the transformer's hidden states and attentions."""
        return output_class(**fields, hidden_states=out.hidden_states, attentions=out.attentions)


class GPTForSequenceClassification(GPTHeadModel):
    """Classification / regression from the last real token (GPT-1 sec. 3.3, transformers' GPT-2 head). GPT-1's
    similarity tasks encode both orders of a pair and add the two representations: pass (B, V, T) input."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config, aux_lm_head=True)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        """
        Args:
            input_ids: (B, T), or (B, V, T) for V views whose pooled states are summed.
            attention_mask: same shape as input_ids; the last 1 of each row is the pooled token.
            labels: (B,) class ids, (B,) floats for regression (num_labels 1), or (B, num_labels) multi-label.
        Returns:
            `SequenceClassifierOutputWithPast` with `logits` (B, num_labels).
        """
        out = self._features(input_ids, attention_mask, position_ids, inputs_embeds, token_type_ids, **kwargs)
        pooled = self._pool(out.last_hidden_state, input_ids, inputs_embeds, attention_mask)  # (B, V, C)
        logits = self.score(pooled.sum(1))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
            loss = self._with_aux_lm_loss(loss, out.last_hidden_state, input_ids, attention_mask)
        return self._output(SequenceClassifierOutputWithPast, out, loss=loss, logits=logits)


class GPTForMultipleChoice(GPTHeadModel):
    """One score per choice from each choice's last real token (GPT-1 sec. 3.3; the multiple-choice head of
    transformers' `GPT2DoubleHeadsModel`), softmax over choices."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config, aux_lm_head=True)
        self.multiple_choice_head = nn.Linear(config.n_embd, 1)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mc_token_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultipleChoiceModelOutput:
        """
        Args:
            input_ids: (B, K, T), one row per choice (`s context $ answer_k e`); attention_mask likewise.
            mc_token_ids: (B, K) index of the token to score in each choice; default the last real token.
            labels: (B,) index of the right choice.
        Returns:
            `MultipleChoiceModelOutput` with `logits` (B, K).
        """
        given, dims = (input_ids, 3) if input_ids is not None else (inputs_embeds, 4)
        if given is not None and given.dim() != dims:  # (a (B, T) input would score a single choice, with loss 0)
            raise ValueError(f"Multiple choice takes one row per choice, (B, K, T); got shape {tuple(given.shape)}.")
        out = self._features(input_ids, attention_mask, position_ids, inputs_embeds, token_type_ids, **kwargs)
        pooled = self._pool(out.last_hidden_state, input_ids, inputs_embeds, attention_mask, mc_token_ids)
        logits = self.multiple_choice_head(self.dropout(pooled)).squeeze(-1)  # (B, K)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
            loss = self._with_aux_lm_loss(loss, out.last_hidden_state, input_ids, attention_mask)
        return self._output(MultipleChoiceModelOutput, out, loss=loss, logits=logits)


class GPTForTokenClassification(GPTHeadModel):
    """A label per token (transformers' `GPT2ForTokenClassification`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        """labels: (B, T) class ids, -100 ignored. Returns `logits` (B, T, num_labels)."""
        out = self._features(input_ids, attention_mask, position_ids, inputs_embeds, token_type_ids, **kwargs)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, T, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return self._output(TokenClassifierOutput, out, loss=loss, logits=logits)


class GPTForQuestionAnswering(GPTHeadModel):
    """Extractive QA: start and end logits per token (transformers' `GPT2ForQuestionAnswering`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        """start_positions / end_positions: (B,). Returns `start_logits`, `end_logits` (B, T)."""
        out = self._features(input_ids, attention_mask, position_ids, inputs_embeds, token_type_ids, **kwargs)
        start, end = self.qa_outputs(out.last_hidden_state).unbind(-1)  # (B, T) logits each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start, end, start_positions, end_positions)
        return self._output(QuestionAnsweringModelOutput, out, loss=loss, start_logits=start, end_logits=end)


__all__ = [
    "GPTPreTrainedModel",
    "GPTModel",
    "GPTForCausalLM",
    "GPTForSequenceClassification",
    "GPTForMultipleChoice",
    "GPTForTokenClassification",
    "GPTForQuestionAnswering",
]
