"""GPT-2 and OpenAI-GPT (GPT-1) checkpoints into hf_gpt.

transformers' `GPT2*` / `OpenAIGPT*` classes store the four projection matrices as `Conv1D` weights of
shape (in, out); ours are `nn.Linear` (out, in), so those four are transposed. GPT-1 names its
embeddings `tokens_embed` / `positions_embed`. Old checkpoints also carry the causal-mask buffers
`attn.bias` / `attn.masked_bias`, which are dropped. Everything else is a key copy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers.utils import cached_file

from .configuration_gpt import GPTConfig

# Parameters stored as Conv1D (in, out) in GPT-2 / GPT-1 checkpoints.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # not c_attn.bias
# Heads outside the shared transformer, copied as they are.
HEAD_PREFIXES = ("lm_head.", "score.", "classifier.", "qa_outputs.", "multiple_choice_head.")
FOREIGN_MODEL_TYPES = ("gpt2", "openai-gpt")
# GPT-1's released code maps "gelu" to the tanh approximation (transformers' `gelu_new`).
GPT1_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}
# Config fields that carry over unchanged from either family.
SHARED_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "layer_norm_epsilon",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "id2label",
    "label2id",
    "problem_type",
)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_config_dict(path_or_id: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any] | None:
    """config.json of a local folder or Hub repo as a dict, or None when there is none."""
    file = cached_file(str(path_or_id), "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if file is None:
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def config_from_foreign(cfg: dict[str, Any]) -> GPTConfig:
    """Translate a GPT2Config / OpenAIGPTConfig dict into a GPTConfig, refusing what we cannot express."""
    model_type = cfg.get("model_type")
    kwargs = {k: cfg[k] for k in SHARED_FIELDS if k in cfg}
    if model_type == "gpt2":
        if cfg.get("add_cross_attention"):
            raise ValueError(
                "This GPT-2 checkpoint uses cross-attention (add_cross_attention=True), which hf_gpt does not implement."
            )
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
            raise ValueError(
                "This GPT-2 checkpoint changes the attention scaling (scale_attn_by_inverse_layer_idx / "
                "scale_attn_weights), which hf_gpt does not implement."
            )
        kwargs.update(n_inner=cfg.get("n_inner"), activation_function=cfg.get("activation_function", "gelu_new"))
        kwargs.update(norm_position="pre", final_norm=True)
    elif model_type == "openai-gpt":
        afn = cfg.get("afn", "gelu")
        if afn not in GPT1_ACTIVATIONS:
            raise ValueError(
                f"OpenAI-GPT checkpoint uses activation {afn!r}; hf_gpt supports {list(GPT1_ACTIVATIONS)}."
            )
        kwargs.update(activation_function=GPT1_ACTIVATIONS[afn], norm_position="post", final_norm=False)
        kwargs.setdefault("bos_token_id", None)
        kwargs.setdefault("eos_token_id", None)
    else:
        raise ValueError(
            f"Expected a GPT-2 or OpenAI-GPT config (model_type 'gpt2' / 'openai-gpt'), got {model_type!r}."
        )
    return GPTConfig(**kwargs)


def load_state_dict_files(path_or_id: str | os.PathLike, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: safetensors (single or sharded) preferred, else `.bin` with weights_only."""
    from safetensors.torch import load_file

    def get(name: str) -> str | None:
        return cached_file(str(path_or_id), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    for index_name, loader in ((SAFE_INDEX, load_file), (BIN_INDEX, _load_bin)):
        index = get(index_name)
        if index is not None:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_file = get(shard)
                if shard_file is None:
                    raise FileNotFoundError(f"{index_name} in {path_or_id} names shard {shard!r}, which is missing.")
                state.update(loader(shard_file))
            return state
    for name, loader in ((SAFE_WEIGHTS, load_file), (BIN_WEIGHTS, _load_bin)):
        file = get(name)
        if file is not None:
            return loader(file)
    raise FileNotFoundError(
        f"No weights found in {path_or_id}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}."
    )


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    # weights_only=True: a pickle that would need to run code is refused instead of executed.
    return torch.load(file, map_location="cpu", weights_only=True)


def state_dict_from_foreign(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Rename and transpose a GPT-2 / OpenAI-GPT state dict into our layout, keyed as GPTForCausalLM's."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(MASK_BUFFER_SUFFIXES):
            continue
        if key.startswith(HEAD_PREFIXES):
            out[key] = tensor
            continue
        base = key.removeprefix("transformer.")  # checkpoints of the bare model have no prefix
        if model_type == "openai-gpt":
            base = base.replace("tokens_embed.", "wte.").replace("positions_embed.", "wpe.")
        if base.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t().contiguous()
        out["transformer." + base] = tensor
    return out


def foreign_checkpoint_to_ours(
    path_or_id: str | os.PathLike | None, kwargs: dict[str, Any]
) -> tuple[GPTConfig, dict[str, torch.Tensor]] | None:
    """(config, state dict) when `path_or_id` holds a GPT-2 / OpenAI-GPT checkpoint, else None.

    Hub arguments (`revision`, `token`, `cache_dir`, ...) are read from `kwargs`, not removed.
    """
    if path_or_id is None or kwargs.get("state_dict") is not None:
        return None
    hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    hub_kwargs = {k: kwargs[k] for k in hub_keys if k in kwargs}
    try:
        cfg = read_config_dict(path_or_id, **hub_kwargs)
    except OSError:
        return None  # let transformers give its usual error for a missing folder or repo
    if cfg is None or cfg.get("model_type") not in FOREIGN_MODEL_TYPES:
        return None
    config = config_from_foreign(cfg)
    state = state_dict_from_foreign(load_state_dict_files(path_or_id, **hub_kwargs), cfg["model_type"])
    return config, state
