"""GPT-2 and OpenAI-GPT (GPT-1) checkpoints into hf_gpt, and hf_gpt models back out to the plain format.

transformers' `GPT2*` / `OpenAIGPT*` classes store the four projection matrices as `Conv1D` weights of
shape (in, out); ours are `nn.Linear` (out, in), so those four are transposed. GPT-1 names its
embeddings `tokens_embed` / `positions_embed`. Old checkpoints also carry the causal-mask buffers
`attn.bias` / `attn.masked_bias`, which are dropped. Everything else is a key copy, in both directions.

Every failure a user can meet with a real folder (no checkpoint, another architecture, a truncated or
unsafe file, weights that do not fit the config) raises `CheckpointError` with what was found and what
was expected. This module is copied next to the model code on `save_pretrained` (modeling_gpt imports
it), so it imports nothing outside transformers' own dependencies.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import cached_file

from .configuration_gpt import GPTConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Parameters stored as Conv1D (in, out) in GPT-2 / GPT-1 checkpoints.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # not c_attn.bias
# Heads outside the shared transformer, copied as they are.
HEAD_PREFIXES = ("lm_head.", "score.", "classifier.", "qa_outputs.", "multiple_choice_head.")
# First key component of the shared transformer's weights, in either family's naming.
BASE_MODULES = ("wte", "wpe", "tokens_embed", "positions_embed", "h", "ln_f")
OURS = "hf_gpt"
FOREIGN_MODEL_TYPES = ("gpt2", "openai-gpt")
# GPT-1's released code maps "gelu" to the tanh approximation (transformers' `gelu_new`).
GPT1_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}
# The way back: OpenAIGPTConfig.afn for each of our activations it can express. Exact (erf) "gelu" has none.
GPT1_AFN = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
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
    "dtype",
)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names what was found and what was expected."""


# ---------------------------------------------------------------------------------------------- reading


def read_config_dict(path_or_id: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any] | None:
    """config.json of a local folder or Hub repo as a dict, or None when there is none."""
    file = cached_file(str(path_or_id), "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if file is None:
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{file} is not valid JSON ({e}); the checkpoint's config is truncated or corrupt."
        ) from e


def describe_model_type(cfg: dict[str, Any]) -> str:
    """ "'bert' (BertForMaskedLM)": a config's model type and architectures, for error messages."""
    archs = cfg.get("architectures") or []
    return f"{cfg.get('model_type')!r}" + (f" ({', '.join(archs)})" if archs else "")


def config_from_foreign(cfg: dict[str, Any]) -> GPTConfig:
    """Translate a GPT2Config / OpenAIGPTConfig dict into a GPTConfig, refusing what we cannot express."""
    model_type = cfg.get("model_type")
    kwargs = {k: cfg[k] for k in SHARED_FIELDS if k in cfg}
    if "dtype" not in kwargs and cfg.get("torch_dtype"):  # the older name of the field
        kwargs["dtype"] = cfg["torch_dtype"]
    if model_type == "gpt2":
        if cfg.get("add_cross_attention"):
            raise CheckpointError(
                "This GPT-2 checkpoint uses cross-attention (add_cross_attention=True), which hf_gpt does not implement."
            )
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
            raise CheckpointError(
                "This GPT-2 checkpoint changes the attention scaling (scale_attn_by_inverse_layer_idx / "
                "scale_attn_weights), which hf_gpt does not implement."
            )
        kwargs.update(n_inner=cfg.get("n_inner"), activation_function=cfg.get("activation_function", "gelu_new"))
        kwargs.update(norm_position="pre", final_norm=True)
    elif model_type == "openai-gpt":
        afn = cfg.get("afn", "gelu")
        if afn not in GPT1_ACTIVATIONS:
            raise CheckpointError(
                f"OpenAI-GPT checkpoint uses activation {afn!r}; hf_gpt supports {list(GPT1_ACTIVATIONS)}."
            )
        kwargs.update(activation_function=GPT1_ACTIVATIONS[afn], norm_position="post", final_norm=False)
        kwargs.setdefault("bos_token_id", None)
        kwargs.setdefault("eos_token_id", None)
    else:
        raise CheckpointError(
            f"Expected a GPT-2 or OpenAI-GPT config (model_type 'gpt2' / 'openai-gpt'), got {describe_model_type(cfg)}."
        )
    try:
        return GPTConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"The {model_type} config does not describe a buildable model: {e}") from e


def load_state_dict_files(path_or_id: str | os.PathLike, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: safetensors (single or sharded) preferred, else `.bin` with weights_only."""

    def get(name: str) -> str | None:
        return cached_file(str(path_or_id), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    for index_name, loader in ((SAFE_INDEX, _load_safetensors), (BIN_INDEX, _load_bin)):
        index = get(index_name)
        if index is not None:
            try:
                with open(index, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e!r}); it is truncated or corrupt.") from e
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_file = get(shard)
                if shard_file is None:
                    raise CheckpointError(f"{index_name} in {path_or_id} names shard {shard!r}, which is missing.")
                logger.info("reading shard %s", shard)
                state.update(loader(shard_file))
            return state
    for name, loader in ((SAFE_WEIGHTS, _load_safetensors), (BIN_WEIGHTS, _load_bin)):
        file = get(name)
        if file is not None:
            return loader(file)
    raise CheckpointError(
        f"No weights found in {path_or_id}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}."
    )


def _load_safetensors(file: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{file} ({os.path.getsize(file):,} bytes) is truncated or corrupt and cannot be read: {e}"
        ) from e


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    # weights_only=True: a pickle that would need to run code is refused instead of executed.
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"Refusing to load {file}: it holds pickled objects other than tensors, and unpickling them could run "
                "arbitrary code. Only plain state dicts are read (torch.load(weights_only=True)); re-save the weights "
                "as safetensors in an environment you trust."
            ) from e
        raise CheckpointError(f"{file} is truncated or corrupt and cannot be read: {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{file} ({os.path.getsize(file):,} bytes) is truncated or corrupt and cannot be read: {e}"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{file} is not a state dict (a mapping of names to tensors); a training checkpoint holding one must be "
            "unpacked first."
        )
    return state


def _is_base_key(key: str) -> bool:
    return key.removeprefix("transformer.").split(".")[0] in BASE_MODULES


def state_dict_from_foreign(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Rename and transpose a GPT-2 / OpenAI-GPT state dict into our layout, keyed as GPTForCausalLM's."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(MASK_BUFFER_SUFFIXES):
            continue
        if not _is_base_key(key):
            # GPT2DoubleHeadsModel wraps its multiple-choice Linear in a SequenceSummary module.
            out[key.replace("multiple_choice_head.summary.", "multiple_choice_head.")] = tensor
            continue
        base = key.removeprefix("transformer.")  # checkpoints of the bare model have no prefix
        if model_type == "openai-gpt":
            base = base.replace("tokens_embed.", "wte.", 1).replace("positions_embed.", "wpe.", 1)
        if base.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t().contiguous()
        out["transformer." + base] = tensor
    return out


def state_dict_from_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our own checkpoint keyed as GPTForCausalLM's: a saved GPTModel has no `transformer.` prefix."""
    return {
        ("transformer." + k if _is_base_key(k) and not k.startswith("transformer.") else k): v for k, v in state.items()
    }


def check_weights(config: GPTConfig, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise CheckpointError unless `state` (GPTForCausalLM keys) holds every transformer weight `config`
    needs, each of the shape the config implies. Head weights are left to transformers, which honours
    `ignore_mismatched_sizes`."""
    from .modeling_gpt import GPTModel  # modeling_gpt imports this module

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        expected = {"transformer." + k: tuple(v.shape) for k, v in GPTModel(config).state_dict().items()}
    if config.tie_word_embeddings is False or "lm_head.weight" in state:
        expected["lm_head.weight"] = (config.vocab_size, config.n_embd)
    wrong = [
        (k, tuple(state[k].shape), shape) for k, shape in expected.items() if k in state and state[k].shape != shape
    ]
    if wrong:
        lines = "\n".join(f"  {k}: checkpoint {got}, config {want}" for k, got, want in wrong[:8])
        more = f"\n  ... and {len(wrong) - 8} more" if len(wrong) > 8 else ""
        raise CheckpointError(
            f"The weights in {source} do not match its config (n_embd={config.n_embd}, n_layer={config.n_layer}, "
            f"n_head={config.n_head}, vocab_size={config.vocab_size}, n_positions={config.n_positions}); "
            f"{len(wrong)} tensor(s) have other shapes (as hf_gpt's (out, in) layout):\n{lines}{more}"
        )
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} of the {len(expected)} weights its config needs, e.g. "
            f"{', '.join(missing[:5])}; the checkpoint is incomplete or of another layout."
        )


def load_checkpoint(
    path_or_id: str | os.PathLike, accept: tuple[str, ...] = (OURS, *FOREIGN_MODEL_TYPES), **hub_kwargs: Any
) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """Read and check any GPT checkpoint: (our config, state dict keyed as GPTForCausalLM's, source model_type).

    `accept` lists the model types the caller can use ("hf_gpt", "gpt2", "openai-gpt"); anything else, a
    folder without config.json or weights, a truncated file or weights that do not fit the config raise
    CheckpointError. Hub ids work when online; `hub_kwargs` (`revision`, `token`, ...) go to the download.
    """
    cfg = read_config_dict(path_or_id, **hub_kwargs)
    if cfg is None and not os.path.isdir(path_or_id):
        raise CheckpointError(
            f"{path_or_id} is not a local folder, and no config.json could be fetched for it from the Hub "
            "(offline, or no such repository)."
        )
    if cfg is None:
        raise CheckpointError(
            f"{path_or_id} holds no GPT checkpoint: there is no config.json. Expected a folder written by "
            "save_pretrained (hf_gpt, GPT2LMHeadModel or OpenAIGPTLMHeadModel) or a Hub id such as 'gpt2'."
        )
    model_type = cfg.get("model_type")
    if model_type not in accept:
        raise CheckpointError(
            f"{path_or_id} holds a {describe_model_type(cfg)} checkpoint; expected model_type "
            f"{' or '.join(repr(t) for t in accept)}."
        )
    if model_type == OURS:
        config = GPTConfig.from_dict(cfg)
        state = state_dict_from_ours(load_state_dict_files(path_or_id, **hub_kwargs))
    else:
        config = config_from_foreign(cfg)
        state = state_dict_from_foreign(load_state_dict_files(path_or_id, **hub_kwargs), model_type)
    check_weights(config, state, path_or_id)
    return config, state, model_type


def foreign_checkpoint_to_ours(
    path_or_id: str | os.PathLike | None, kwargs: dict[str, Any]
) -> tuple[GPTConfig, dict[str, torch.Tensor]] | None:
    """(config, state dict) when `path_or_id` holds a GPT-2 / OpenAI-GPT checkpoint, else None (our own
    folders, and paths transformers should report on). A checkpoint of another architecture raises
    CheckpointError rather than being read as ours.

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
    if cfg is None or cfg.get("model_type") in (OURS, None):
        return None
    if cfg["model_type"] not in FOREIGN_MODEL_TYPES:
        raise CheckpointError(
            f"{path_or_id} holds a {describe_model_type(cfg)} checkpoint; hf_gpt loads model_type 'hf_gpt', "
            "'gpt2' or 'openai-gpt'."
        )
    config, state, _ = load_checkpoint(path_or_id, accept=FOREIGN_MODEL_TYPES, **hub_kwargs)
    return config, state


class LoadsGPT2Checkpoints:
    """`from_pretrained` for the model classes: our own folders load as usual, GPT-2 and OpenAI-GPT checkpoints (a
    folder or a Hub id) are converted as they load."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        converted = foreign_checkpoint_to_ours(pretrained_model_name_or_path, kwargs)
        if converted is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        config, state_dict = converted
        if model_args or isinstance(kwargs.get("config"), GPTConfig):
            config = kwargs.pop("config", config)
        else:
            kwargs.pop("config", None)
        return super().from_pretrained(None, *model_args, config=config, state_dict=state_dict, **kwargs)


# ---------------------------------------------------------------------------------------------- writing


def plain_format(config: GPTConfig) -> str:
    """ "gpt2" or "openai-gpt": the plain transformers family that computes exactly what `config` does.

    Raises ValueError saying why when neither does; exporting such a model would load without error and
    compute something else.
    """
    local = [i for i in range(config.n_layer) if config.layer_attention(i) == "local"]
    if local and config.local_window < config.n_positions:  # a band as wide as the context is dense attention
        raise ValueError(
            f"Cannot export to the plain GPT-2 format: layers {local[:6]}{'...' if len(local) > 6 else ''} use local "
            f"attention (attention_pattern={config.attention_pattern}, local_window={config.local_window} < "
            f"n_positions={config.n_positions}); GPT2Config has only dense attention, so the export would attend "
            "to tokens this model never sees."
        )
    if config.norm_position == "pre" and config.final_norm:
        return "gpt2"
    if config.norm_position == "post" and not config.final_norm:
        if config.activation_function not in GPT1_AFN:
            raise ValueError(
                f"Cannot export to the plain OpenAI-GPT format: activation {config.activation_function!r} has no "
                f"OpenAIGPTConfig.afn equivalent (its 'gelu' is the tanh approximation, our 'gelu_new'); "
                f"expressible: {sorted(GPT1_AFN)}."
            )
        if config.n_inner not in (None, 4 * config.n_embd):
            raise ValueError(
                f"Cannot export to the plain OpenAI-GPT format: n_inner={config.n_inner}, but OpenAI-GPT's MLP is "
                f"always 4 * n_embd = {4 * config.n_embd} wide."
            )
        return "openai-gpt"
    raise ValueError(
        f"Cannot export to a plain transformers format: norm_position={config.norm_position!r} with "
        f"final_norm={config.final_norm} is neither GPT-2 ('pre' + final LayerNorm) nor GPT-1 ('post', no final "
        "LayerNorm)."
    )


def foreign_config(config: GPTConfig, family: str, tied: bool, dtype: torch.dtype | None = None) -> PretrainedConfig:
    """The GPT2Config / OpenAIGPTConfig equivalent of `config` (`family` as from `plain_format`)."""
    from transformers import GPT2Config, OpenAIGPTConfig

    common = dict(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        # transformers no longer reads n_ctx, but OpenAI's released configs carry it and llama.cpp's GPT-2
        # converter (convert_hf_to_gguf.py) takes the context length from it.
        n_ctx=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.resid_pdrop,
        embd_pdrop=config.embd_pdrop,
        attn_pdrop=config.attn_pdrop,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),  # set only when a config was given one
        tie_word_embeddings=tied,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
    )
    if family == "gpt2":
        return GPT2Config(
            n_inner=config.n_inner,
            activation_function=config.activation_function,
            architectures=["GPT2LMHeadModel"],
            **common,
        )
    return OpenAIGPTConfig(afn=GPT1_AFN[config.activation_function], architectures=["OpenAIGPTLMHeadModel"], **common)


def state_dict_to_foreign(
    model: torch.nn.Module, family: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict in `family`'s keys and Conv1D layout, whether the LM head is tied to the embedding).

    `model` is a GPTForCausalLM or a GPTModel (which gets GPT-2's usual tied head). Values are exact:
    transposes and renames only, plus the cast to `dtype` when one is given.
    """
    base = model.base_model
    out: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if family == "openai-gpt" and key.startswith(("wte.", "wpe.")):
            key = {"wte": "tokens_embed", "wpe": "positions_embed"}[key[:3]] + key[3:]
        out["transformer." + key] = tensor.detach().to(dtype=dtype).contiguous()
    head = getattr(model, "lm_head", None)
    tied = head is None or head.weight is base.wte.weight or torch.equal(head.weight, base.wte.weight)
    if not tied:
        out["lm_head.weight"] = head.weight.detach().to(dtype=dtype).contiguous()
    return out, tied


def export_to_transformers(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerBase | str | None = "auto",
    max_shard_size: int | str = "5GB",
) -> str:
    """Write `model` (a GPT-2 or GPT-1 variant of ours) as a plain transformers GPT-2 / OpenAI-GPT folder.

    The folder holds config.json, safetensors weights (sharded above `max_shard_size`),
    generation_config.json and, when there is one, the tokenizer, and loads with `GPT2LMHeadModel` /
    `OpenAIGPTLMHeadModel` / `AutoModelForCausalLM` with no custom code. `tokenizer="auto"` writes the
    GPT-2 tokenizer for a GPT-2 model whose vocabulary covers it; None writes none. Returns the family
    ("gpt2" or "openai-gpt"). A model the plain format cannot express raises ValueError (see `plain_format`).
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    from .modeling_gpt import GPTForCausalLM, GPTModel

    if not isinstance(model, (GPTForCausalLM, GPTModel)):
        raise ValueError(
            f"export_to_transformers writes language models; got {type(model).__name__}. Export its "
            "`.transformer`, or a GPTForCausalLM holding the same weights."
        )
    family = plain_format(model.config)
    dtype = dtype or next(model.parameters()).dtype
    state, tied = state_dict_to_foreign(model, family, dtype)
    config = foreign_config(model.config, family, tied, dtype)
    os.makedirs(folder, exist_ok=True)
    # Weights of an earlier save in the same folder would shadow these (a stale index) or mix with them.
    stale = ("model*.safetensors", SAFE_INDEX, "pytorch_model*.bin", BIN_INDEX)
    for old in {f for pattern in stale for f in glob.glob(os.path.join(glob.escape(str(folder)), pattern))}:
        logger.info("removing %s, left by an earlier save", old)
        os.remove(old)
    config.save_pretrained(folder)
    logger.info("writing %d tensors (%.1f MB)", len(state), sum(t.nbytes for t in state.values()) / 1e6)
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    if tokenizer == "auto":
        from .tokenization import default_tokenizer  # the GPT-2 vocabulary, only when it is asked for

        tokenizer = default_tokenizer(model.config) if family == "gpt2" else None
    if tokenizer is not None:
        from .tokenization import save_beside_model

        save_beside_model(tokenizer, config, folder)
    else:
        logger.warning("no tokenizer written to %s; save the model's tokenizer there yourself", folder)
    return family


__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "foreign_checkpoint_to_ours",
    "LoadsGPT2Checkpoints",
    "plain_format",
    "export_to_transformers",
]
