"""hf_gpt: the GPT family (GPT-1, GPT-2, GPT-3 style) as a native Hugging Face transformers model.

Importing the package registers the classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` returns a `GPTForCausalLM` for any folder we wrote.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_gpt import PRESETS, GPTConfig
from .modeling_gpt import GPTForCausalLM, GPTModel, GPTPreTrainedModel
from .tokenization import gpt2_tokenizer

__version__ = "0.1.0"

AutoConfig.register(GPTConfig.model_type, GPTConfig, exist_ok=True)
AutoModel.register(GPTConfig, GPTModel, exist_ok=True)
AutoModelForCausalLM.register(GPTConfig, GPTForCausalLM, exist_ok=True)

# save_pretrained writes `auto_map` and copies the model code, so a folder loads with
# trust_remote_code=True where hf_gpt is not installed.
GPTConfig.register_for_auto_class()
GPTModel.register_for_auto_class("AutoModel")
GPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "GPTConfig",
    "PRESETS",
    "GPTPreTrainedModel",
    "GPTModel",
    "GPTForCausalLM",
    "gpt2_tokenizer",
    "__version__",
]
