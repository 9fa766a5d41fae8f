"""hf_gpt: the GPT family (GPT-1, GPT-2, GPT-3 style) as a native Hugging Face transformers model.

Importing the package registers the classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` returns a `GPTForCausalLM` for any folder we wrote.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_gpt import PRESETS, GPTConfig
from .conversion import CheckpointError, export_to_transformers
from .embeddings import embed, mean_pool
from .modeling_gpt import (
    GPTForCausalLM,
    GPTForMultipleChoice,
    GPTForQuestionAnswering,
    GPTForSequenceClassification,
    GPTForTokenClassification,
    GPTModel,
    GPTPreTrainedModel,
)
from .perplexity import sliding_window_perplexity
from .tokenization import gpt2_tokenizer, load_tokenizer, save_with_tokenizer

__version__ = "0.1.0"

AUTO_CLASSES = {
    AutoModel: GPTModel,
    AutoModelForCausalLM: GPTForCausalLM,
    AutoModelForSequenceClassification: GPTForSequenceClassification,
    AutoModelForMultipleChoice: GPTForMultipleChoice,
    AutoModelForTokenClassification: GPTForTokenClassification,
    AutoModelForQuestionAnswering: GPTForQuestionAnswering,
}

AutoConfig.register(GPTConfig.model_type, GPTConfig, exist_ok=True)
GPTConfig.register_for_auto_class()
for auto_class, model_class in AUTO_CLASSES.items():
    auto_class.register(GPTConfig, model_class, exist_ok=True)
    # save_pretrained then writes `auto_map` and copies the model code, so a folder loads with
    # trust_remote_code=True where hf_gpt is not installed.
    model_class.register_for_auto_class(auto_class.__name__)

__all__ = [
    "GPTConfig",
    "PRESETS",
    "GPTPreTrainedModel",
    "GPTModel",
    "GPTForCausalLM",
    "GPTForSequenceClassification",
    "GPTForMultipleChoice",
    "GPTForTokenClassification",
    "GPTForQuestionAnswering",
    "gpt2_tokenizer",
    "load_tokenizer",
    "save_with_tokenizer",
    "export_to_transformers",
    "CheckpointError",
    "sliding_window_perplexity",
    "embed",
    "mean_pool",
    "__version__",
]
