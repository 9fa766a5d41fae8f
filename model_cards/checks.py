"""What makes a folder Hub-ready, checked without the network.

- `registered_auto_map()` / `complete_auto_map(folder)`: transformers writes `auto_map` only for the
  class being saved; a published folder should answer every Auto class hf_gpt registers (AutoModel for
  vLLM's transformers backend, AutoModelForCausalLM, the task heads), and carry the code they name.
- `check_folder(folder)`: errors that would make the folder fail for a Hub user (no weights, `auto_map`
  naming code that is not there, code that imports `hf_gpt`, a tokenizer class transformers lacks) and
  warnings for what is merely missing.
- `validate_card(text, folder)`: the card parses with `huggingface_hub.ModelCard`, carries the metadata
  the Hub uses, its `model-index` reads back through `model_index_to_eval_results`, and every local file
  it links to exists. (`ModelCard.validate` asks the Hub's server, so it is not used here.)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

# Pipeline tags a card may carry (a subset of the Hub's list: the ones hf_gpt's heads map to).
PIPELINE_TAGS = (
    "text-generation",
    "text-classification",
    "token-classification",
    "question-answering",
    "feature-extraction",
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
LEGACY_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
IMPORTS_HF_GPT = re.compile(r"^\s*(from\s+hf_gpt[\s.]|import\s+hf_gpt\b)", re.MULTILINE)
# Markdown links and images whose target is a relative path (not a URL or an anchor).
LOCAL_LINK = re.compile(r"!?\[[^\]]*\]\((?![a-zA-Z][a-zA-Z0-9+.-]*:|#)([^)\s]+)\)")


def _class_ref(cls: type) -> str:
    """`auto_map` spelling of a class: `module_file_stem.ClassName`."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def registered_auto_map() -> dict[str, str]:
    """`auto_map` entries for every Auto class that hf_gpt's classes are registered with."""
    from transformers.models.auto import modeling_auto

    import hf_gpt

    entries = {"AutoConfig": _class_ref(hf_gpt.GPTConfig)}
    # (the Auto classes from their own module: `dir(transformers)` lists the whole lazy package, 0.2-0.3 s)
    for name in sorted(modeling_auto.__all__):
        if not name.startswith("AutoModel"):
            continue
        mapping = getattr(getattr(modeling_auto, name, None), "_model_mapping", None)
        if mapping is None:
            continue
        try:
            entries[name] = _class_ref(mapping[hf_gpt.GPTConfig])
        except (KeyError, AttributeError, ValueError):
            continue
    # Classes registered only through `register_for_auto_class`.
    for obj in vars(hf_gpt).values():
        if isinstance(obj, type) and obj.__module__.startswith("hf_gpt.") and getattr(obj, "_auto_class", None):
            entries.setdefault(obj._auto_class, _class_ref(obj))
    return entries


def _defines(code_file: Path, class_name: str) -> bool:
    pattern = rf"^class {re.escape(class_name)}\b"
    return code_file.is_file() and re.search(pattern, code_file.read_text("utf-8"), re.M) is not None


def complete_auto_map(folder: str | Path, out_dir: str | Path | None = None) -> list[str]:
    """Add the missing `auto_map` entries (and code files) to an hf_gpt folder's config.json.

    The completed config.json and any copied code files are written to `out_dir` (default: `folder`).
    Returns the Auto class names added; empty for folders of other model types, or when nothing is missing.
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    import hf_gpt

    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder
    config = json.loads((folder / "config.json").read_text("utf-8"))
    if config.get("model_type") != hf_gpt.GPTConfig.model_type:
        return []
    # The code files a remote-code load needs: the config and modeling modules and what they import relatively.
    package_dir = Path(hf_gpt.__file__).parent
    needed = {package_dir / "configuration_gpt.py", package_dir / "modeling_gpt.py"}
    for module in list(needed):
        needed.update(Path(p) for p in get_relative_import_files(str(module)))
    for source in sorted(needed):
        if not (folder / source.name).is_file():
            shutil.copyfile(source, out / source.name)

    auto_map = dict(config.get("auto_map") or {})
    added = []
    for auto_name, ref in registered_auto_map().items():
        module, class_name = ref.split(".")
        if auto_name not in auto_map and (
            _defines(folder / f"{module}.py", class_name) or _defines(out / f"{module}.py", class_name)
        ):
            auto_map[auto_name] = ref
            added.append(auto_name)
    if added:
        config["auto_map"] = dict(sorted(auto_map.items()))
        # transformers writes config.json with sorted keys and two-space indents; keep that format.
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return added


def _pick(folder: Path, overlay: Path | None, name: str) -> Path:
    """`overlay/name` when it exists (a file about to replace the folder's), else `folder/name`."""
    if overlay is not None and (overlay / name).is_file():
        return overlay / name
    return folder / name


def check_folder(folder: str | Path, overlay: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) for publishing `folder`; files in `overlay` stand in for the folder's own."""
    folder = Path(folder)
    overlay = Path(overlay) if overlay is not None else None
    errors: list[str] = []
    warnings: list[str] = []
    config_file = _pick(folder, overlay, "config.json")
    if not config_file.is_file():
        return [f"{folder}: no config.json (not a save_pretrained folder)"], warnings
    config = json.loads(config_file.read_text("utf-8"))

    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        if any((folder / name).is_file() for name in LEGACY_WEIGHT_FILES):
            warnings.append("weights are in pytorch_model.bin; save with safe_serialization (model.safetensors)")
        else:
            errors.append("no model weights (model.safetensors)")

    auto_map = config.get("auto_map") or {}
    if config.get("model_type") == "hf_gpt":
        architecture = (config.get("architectures") or [""])[0]
        wanted = {"AutoConfig"} | {name for name, ref in auto_map.items() if ref.endswith("." + architecture)}
        if not any(ref.endswith("." + architecture) for ref in auto_map.values()):
            errors.append(f"config.json's auto_map has no entry for {architecture or 'the model class'}")
        for name in sorted(wanted - set(auto_map)):
            errors.append(f"config.json's auto_map lacks {name}")
        try:
            missing = sorted(set(registered_auto_map()) - set(auto_map))
        except ImportError:  # hf_gpt not importable: nothing to compare with
            missing = []
        if missing:
            warnings.append(f"config.json's auto_map lacks {', '.join(missing)} (`hf-gpt card` adds them)")
    for auto_name, ref in sorted(auto_map.items()):
        refs = ref if isinstance(ref, list) else [ref]
        for one in filter(None, refs):
            module, class_name = one.split("--")[-1].rsplit(".", 1)
            if not _defines(_pick(folder, overlay, f"{module}.py"), class_name):
                errors.append(f"auto_map[{auto_name!r}] names {one}, but {module}.py in the folder does not define it")
    code_files = sorted(
        {p.name for p in folder.glob("*.py")} | ({p.name for p in overlay.glob("*.py")} if overlay else set())
    )
    for name in code_files:
        if IMPORTS_HF_GPT.search(_pick(folder, overlay, name).read_text("utf-8")):
            errors.append(f"{name} imports hf_gpt, which a Hub user does not have")

    tok_config_file = folder / "tokenizer_config.json"
    if not tok_config_file.is_file():
        warnings.append("no tokenizer files: AutoTokenizer and pipeline() will not load from this folder")
    else:
        import transformers

        tok_config = json.loads(tok_config_file.read_text("utf-8"))
        tok_class = tok_config.get("tokenizer_class")
        if tok_class and not hasattr(transformers, tok_class) and not tok_config.get("auto_map"):
            errors.append(
                f"tokenizer_class {tok_class} is not in transformers and tokenizer_config.json has no auto_map"
            )
    if (config.get("architectures") or [""])[0].endswith("ForCausalLM") and not (
        folder / "generation_config.json"
    ).is_file():
        warnings.append("no generation_config.json")
    return errors, warnings


def validate_card(text: str, folder: str | Path | None = None, overlay: str | Path | None = None) -> list[str]:
    """Problems with a model card's text (README.md), found offline; empty when it is fit to publish.

    With `folder` (and `overlay`, files about to be added to it), also checks that local links resolve.
    """
    try:
        card = ModelCard(text)
    except Exception as error:  # YAML errors, a metadata block that is not a mapping, a malformed model-index
        return [f"the card does not parse: {error}"]
    problems = []
    data = card.data.to_dict()
    if not text.startswith("---"):
        problems.append("the card has no YAML metadata block")
    if not data.get("license"):
        problems.append("metadata lacks `license`")
    if data.get("library_name") != "transformers":
        problems.append(f"metadata's library_name is {data.get('library_name')!r}, not 'transformers'")
    if data.get("pipeline_tag") is not None and data["pipeline_tag"] not in PIPELINE_TAGS:
        problems.append(f"pipeline_tag {data['pipeline_tag']!r} is not one of {PIPELINE_TAGS}")
    for key in ("tags", "datasets"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            problems.append(f"metadata's {key} must be a list of strings, got {value!r}")
    if "model-index" in data:
        try:
            name, results = model_index_to_eval_results(data["model-index"])
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"model-index cannot be read back: {error!r}")
        else:
            if not name:
                problems.append("model-index has no model name")
            for result in results:
                if not isinstance(result.metric_value, (int, float)) or result.metric_value != result.metric_value:
                    problems.append(f"model-index metric {result.metric_type} has value {result.metric_value!r}")
    if folder is not None:
        for target in LOCAL_LINK.findall(card.text):
            if not _pick(Path(folder), Path(overlay) if overlay else None, target.split("#")[0]).exists():
                problems.append(f"the card links to {target}, which is not in the folder")
    if not card.text.strip():
        problems.append("the card has no text")
    return problems


__all__ = ["registered_auto_map", "complete_auto_map", "check_folder", "validate_card", "PIPELINE_TAGS"]
