"""GPTConfig: one configuration for GPT-1, GPT-2 and GPT-3 style models, plus the published sizes as data.

Field names follow transformers' `GPT2Config` so that a GPT-2 config translates field for field; the
`attribute_map` answers transformers' standard names (`hidden_size`, `num_hidden_layers`, ...).
Architecture variants are flags, never separate classes:

- `norm_position`: "pre" (GPT-2/3: LayerNorm before attention and MLP) or "post" (GPT-1: after the
  residual add).
- `final_norm`: a LayerNorm after the last block (GPT-2/3 yes, GPT-1 no).
- `attention_pattern` + `local_window`: per-layer dense ("global") or locally banded ("local") causal
  attention, cycled over the layers (GPT-3: alternating, "similar to the Sparse Transformer"). The config also
  answers transformers' names for the same thing, `layer_types` ("full_attention" / "sliding_attention", one per
  layer) and `sliding_window`, which caches, `masking_utils` and serving engines read; either spelling may be
  passed to `GPTConfig(...)`.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

# The tensor-parallel style `base_model_tp_plan` names for c_attn (see there): transformers' "packed_colwise" splits a
# weight packed from two blocks (an MLP's gate and up), which would hand a device parts of two of q, k, v.
try:
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, PackedColwiseParallel
except ImportError:  # transformers without tensor parallelism: the plan is never applied
    pass
else:
    ALL_PARALLEL_STYLES.register("packed_colwise_qkv", PackedColwiseParallel(split_factor=3))

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "swish")
NORM_POSITIONS = ("pre", "post")
ATTENTION_KINDS = ("global", "local")
# Our attention kinds under transformers' layer-type names (what DynamicCache, masking_utils and vLLM read).
LAYER_TYPES = {"global": "full_attention", "local": "sliding_attention"}
KINDS = {name: kind for kind, name in LAYER_TYPES.items()}  # and back

# Every Auto class the package registers, written into each saved config so a folder loads with
# trust_remote_code=True through any of them where hf_gpt is not installed.
AUTO_MAP = {
    "AutoConfig": "configuration_gpt.GPTConfig",
    "AutoModel": "modeling_gpt.GPTModel",
    "AutoModelForCausalLM": "modeling_gpt.GPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_gpt.GPTForSequenceClassification",
    "AutoModelForMultipleChoice": "modeling_gpt.GPTForMultipleChoice",
    "AutoModelForTokenClassification": "modeling_gpt.GPTForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_gpt.GPTForQuestionAnswering",
}

# Presets as data. Each entry cites where its numbers come from.
_GPT2 = dict(vocab_size=50257, n_positions=1024, activation_function="gelu_new", norm_position="pre", final_norm=True)
_GPT3 = dict(
    vocab_size=50257,
    n_positions=2048,
    activation_function="gelu_new",
    norm_position="pre",
    final_norm=True,
    attention_pattern=["global", "local"],
    local_window=256,
)
PRESETS: dict[str, dict[str, Any]] = {
    # Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training", sec. 4.1:
    # 12 layers, 768 wide, 12 heads, 3072 inner, 512 positions, 40,000 BPE merges (vocab 40,478 as released).
    # Post-LayerNorm, no final LayerNorm. The released code's "gelu" is the tanh approximation.
    "gpt1": dict(
        vocab_size=40478,
        n_positions=512,
        n_embd=768,
        n_layer=12,
        n_head=12,
        activation_function="gelu_new",
        norm_position="post",
        final_norm=False,
        bos_token_id=None,
        eos_token_id=None,
    ),
    # Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", Table 2, with the head
    # counts of the released checkpoints (openai-community/gpt2*): 12/16/20/25 heads of 64.
    "gpt2": dict(_GPT2, n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(_GPT2, n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(_GPT2, n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(_GPT2, n_embd=1600, n_layer=48, n_head=25),
    # Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (n_layers, d_model, n_heads,
    # d_head; n_ctx 2048 for all). Dense and locally banded attention alternate (sec. 2.1); the paper does
    # not give the band width, 256 is GPT-Neo's choice for the same design.
    "gpt3-small": dict(_GPT3, n_embd=768, n_layer=12, n_head=12),  # 125M, d_head 64
    "gpt3-medium": dict(_GPT3, n_embd=1024, n_layer=24, n_head=16),  # 350M, d_head 64
    "gpt3-large": dict(_GPT3, n_embd=1536, n_layer=24, n_head=16),  # 760M, d_head 96
    # Table 2.1 lists 24 heads x 128 = 3072, which contradicts d_model 2048. d_model fixes the parameter
    # count (1.3B), so we keep it and use 16 heads of 128 = 2048 (the d_head the table gives).
    "gpt3-xl": dict(_GPT3, n_embd=2048, n_layer=24, n_head=16),  # 1.3B
    "gpt3-2.7b": dict(_GPT3, n_embd=2560, n_layer=32, n_head=32),  # 2.7B, d_head 80
    "gpt3-6.7b": dict(_GPT3, n_embd=4096, n_layer=32, n_head=32),  # 6.7B, d_head 128
    # Table 2.1 lists d_model 5140 with 40 heads x 128 = 5120; 5140 is not divisible by 40. We take
    # 5120 (= 40 x 128), which gives 12.85B parameters, within 1.2% of the table's 13.0B.
    "gpt3-13b": dict(_GPT3, n_embd=5120, n_layer=40, n_head=40),  # 13B
    "gpt3-175b": dict(_GPT3, n_embd=12288, n_layer=96, n_head=96),  # 175B, d_head 128
}
# The figure each preset's paper gives, for documentation and tests.
PAPER_PARAMS: dict[str, float] = {
    "gpt1": 117e6,
    "gpt2": 124e6,
    "gpt2-medium": 355e6,
    "gpt2-large": 774e6,
    "gpt2-xl": 1.5e9,
    "gpt3-small": 125e6,
    "gpt3-medium": 350e6,
    "gpt3-large": 760e6,
    "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13.0e9,
    "gpt3-175b": 175.0e9,
}


class GPTConfig(PretrainedConfig):
    """Configuration of an hf_gpt model.

    Args:
        vocab_size: number of token ids.
        n_positions: number of learned positions (the longest input).
        n_embd: width of the residual stream.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide `n_embd`.
        n_inner: MLP hidden width (default `4 * n_embd`).
        activation_function: one of `ACTIVATIONS` ("gelu_new" is GPT-2's tanh GELU).
        resid_pdrop, embd_pdrop, attn_pdrop: dropout probabilities.
        layer_norm_epsilon: LayerNorm epsilon.
        initializer_range: std of the normal initialisation.
        norm_position: "pre" (GPT-2/3) or "post" (GPT-1).
        final_norm: LayerNorm after the last block.
        attention_pattern: list of "global"/"local", cycled over the layers.
        local_window: how many most recent positions (itself included) a "local" layer attends to.
        layer_types, sliding_window: transformers' names for the two above ("full_attention" /
            "sliding_attention", one per layer; the window); given instead of them, they set them.
        bos_token_id, eos_token_id: default to the last id, as GPT-2's <|endoftext|> (50256).
        pad_token_id: the id the task heads treat as padding when no attention_mask is given (GPT-2 has none).
        aux_lm_weight: task heads add this times the language-model loss on their inputs (GPT-1 sec. 3.2,
            lambda = 0.5 in the paper; 0 turns it off).
        classifier_dropout: dropout before the token-classification head (as transformers' GPT-2).
        tie_word_embeddings: share the input embedding with the LM head.
    """

    model_type = "hf_gpt"
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "intermediate_size": "n_inner",
    }
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # How transformers (`from_pretrained(..., tp_plan="auto")`) shards the blocks over devices. c_attn holds q, k and
    # v stacked along its output ([q; k; v], each n_embd wide): "packed_colwise_qkv" (registered above,
    # transformers' packed_colwise for three blocks, not two) gives each device the same heads of all three.
    base_model_tp_plan = {
        "h.*.attn.c_attn": "packed_colwise_qkv",
        "h.*.attn.c_proj": "rowwise",
        "h.*.mlp.c_fc": "colwise",
        "h.*.mlp.c_proj": "rowwise",
    }
    # Pipeline stages: the embeddings before the blocks, the final LayerNorm after (inputs and outputs of each).
    base_model_pp_plan = {
        "wte": (["input_ids"], ["inputs_embeds"]),
        "wpe": (["position_ids"], ["position_embeds"]),
        "drop": (["hidden_states"], ["hidden_states"]),
        "h": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "ln_f": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        activation_function: str = "gelu_new",
        resid_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        norm_position: str = "pre",
        final_norm: bool = True,
        attention_pattern: list[str] | None = None,
        local_window: int = 256,
        aux_lm_weight: float = 0.0,
        classifier_dropout: float = 0.1,
        use_cache: bool = True,
        bos_token_id: int | None | str = "last",
        eos_token_id: int | None | str = "last",
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        **kwargs: Any,
    ) -> None:
        if layer_types is not None:  # transformers' spelling of attention_pattern (one entry per layer)
            unknown = sorted(set(layer_types) - set(KINDS))
            if unknown:
                raise ValueError(f"GPTConfig.layer_types may hold only {sorted(KINDS)}, got {unknown}.")
            if len(layer_types) != n_layer:
                raise ValueError(f"GPTConfig.layer_types has {len(layer_types)} entries; expected n_layer = {n_layer}.")
            attention_pattern = [KINDS[name] for name in layer_types]
        if sliding_window is not None:  # transformers' spelling of local_window
            local_window = sliding_window
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.norm_position = norm_position
        self.final_norm = final_norm
        self.attention_pattern = list(attention_pattern) if attention_pattern is not None else ["global"]
        self.local_window = local_window
        self.aux_lm_weight = aux_lm_weight
        self.classifier_dropout = classifier_dropout
        self.use_cache = use_cache
        # GPT-2's <|endoftext|> (50256) is the last id of its vocabulary; by default follow that rule.
        bos_token_id = vocab_size - 1 if bos_token_id == "last" else bos_token_id
        eos_token_id = vocab_size - 1 if eos_token_id == "last" else eos_token_id
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        # Before transformers' own check of layer_types, so that its error names our field. (Only this field: the
        # others may still change below, where transformers applies aliases such as hidden_size.)
        self.validate_attention_pattern()
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that does not describe a buildable model."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "local_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}.")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(
                f"GPTConfig.n_inner must be a positive integer or None (= 4 * n_embd), got {self.n_inner!r}."
            )
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head among the divisors of n_embd, e.g. {_divisors_near(self.n_embd, self.n_head)}."
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation_function {self.activation_function!r} is unknown; choose one of {ACTIVATIONS}."
            )
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"GPTConfig.norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}.")
        self.validate_attention_pattern()
        if self.aux_lm_weight < 0:
            raise ValueError(f"GPTConfig.aux_lm_weight must be >= 0, got {self.aux_lm_weight!r}.")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"GPTConfig.{name} must be a probability in [0, 1), got {p!r}.")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}.")

    def validate_attention_pattern(self) -> None:
        if not self.attention_pattern or any(kind not in ATTENTION_KINDS for kind in self.attention_pattern):
            raise ValueError(
                f"GPTConfig.attention_pattern must be a non-empty list of {ATTENTION_KINDS}, got {self.attention_pattern!r}."
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_attention(self, layer_idx: int) -> str:
        """ "global" or "local" for block `layer_idx` (the pattern repeats over the layers)."""
        return self.attention_pattern[layer_idx % len(self.attention_pattern)]

    @property
    def layer_types(self) -> list[str]:
        """One entry per layer, "full_attention" or "sliding_attention": the pattern in transformers' names."""
        # (an unknown kind passes through unchanged, for validate() to name)
        return [LAYER_TYPES.get(self.layer_attention(i), self.layer_attention(i)) for i in range(self.n_layer)]

    @layer_types.setter
    def layer_types(self, value: list[str]) -> None:
        self.attention_pattern = [KINDS.get(t, t) for t in value]

    @property
    def sliding_window(self) -> int | None:
        """The local layers' window (each query sees itself and the `sliding_window - 1` keys before it, the
        semantics of transformers' masks and caches), or None when every layer is dense."""
        return self.local_window if "local" in self.attention_pattern else None

    @sliding_window.setter
    def sliding_window(self, value: int | None) -> None:
        # (what transformers' tests do to a config: a window for the local layers, or None for none)
        if value is None:
            self.attention_pattern = ["global"]
        else:
            self.local_window = value

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A config for a published size: `GPTConfig.from_preset("gpt2-medium", n_positions=512)`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}. Known presets: {', '.join(PRESETS)}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


def _divisors_near(n: int, target: int) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divisors, key=lambda d: abs(d - target))[:3]


__all__ = ["GPTConfig", "PRESETS", "PAPER_PARAMS", "ACTIVATIONS"]
