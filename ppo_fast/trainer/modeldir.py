"""Hugging Face model directories, checked before a command builds anything: a config that loads,
weights that are there and whole, a tokenizer, and for a reward model a trained score head.

transformers would otherwise fail deep in a traceback that names neither the option nor what is
missing (no weights, a truncated ``model.safetensors``, no tokenizer files), or, worse, load a
causal LM as a reward model with a freshly initialised score head and let the run train against
noise. Every check raises a ConfigError naming the option, the directory and what is wrong; none
loads a model's weights (safetensors headers, index files and a ``.bin``'s names only).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from .errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""The weight files transformers loads, in the order it looks for them."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "merges.txt")
"""The usual tokenizer files, named when a directory has none of them."""


def check_model_dir(option: str, path: str, *, weights: bool = True) -> bool:
    """Whether the model directory of ``option`` holds weights. It must hold a config.json that
    transformers reads, and weights that are whole when there are any (required when
    ``weights``)."""
    model_config(option, path)
    return _weights(option, path, required=weights) is not None


def _weights(option: str, path: str, required: bool) -> set[str] | None:
    """:func:`weight_names`; weight files transformers would not load as the model (an adapter's,
    a framework's own) are an error either way, not a directory without weights."""
    names = weight_names(option, path)
    if names is not None:
        return names
    others = sorted(f.name for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf")
                    for f in Path(path).glob(pattern))
    if others:
        raise ConfigError(f"{option}: {path} holds {', '.join(others)} but none of the weight files transformers "
                          f"loads a model from ({', '.join(WEIGHT_FILES)})")
    if required:
        raise ConfigError(f"{option}: {path} holds no weights (none of {', '.join(WEIGHT_FILES)} there)")
    return None


def model_config(option: str, path: str):
    """The directory's model config (AutoConfig)."""
    from transformers import AutoConfig

    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{option}: {path} " + ("is a file, not a model directory" if directory.exists()
                                                  else "does not exist"))
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{option}: {path} is not a Hugging Face model directory (no config.json there)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{option}: {directory / 'config.json'} is not a model config transformers reads "
                          f"({type(exc).__name__}: {exc})") from None


def load_tokenizer(option: str, path: str):
    """The directory's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        present = [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
        if not present:
            raise ConfigError(f"{option}: {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)} there); "
                              "save the model's tokenizer beside it (tokenizer.save_pretrained)") from None
        raise ConfigError(f"{option}: cannot load the tokenizer of {path} (from {', '.join(present)}): "
                          f"{type(exc).__name__}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weight_names(option: str, path: str) -> set[str] | None:
    """The names of the weights in the directory's checkpoint (None: it holds no weight file),
    read from safetensors headers, index files or a ``.bin``'s state dict without loading a
    tensor. A weight file that is truncated or unreadable, or a shard an index names that is
    missing, is an error naming the file."""
    directory = Path(path)
    for name in WEIGHT_FILES:
        file = directory / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(file.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{option}: {file} is not a weight index (a JSON object with a weight_map): "
                                  f"{type(exc).__name__}: {exc}") from None
            for shard in shards:
                if not (directory / shard).is_file():
                    raise ConfigError(f"{option}: {directory / shard} is missing ({file} lists it)")
                _names(option, directory / shard)
            return set(weight_map)
        return _names(option, file)
    return None


def _names(option: str, file: Path) -> set[str]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), "pt") as f:
                return set(f.keys())
        except SafetensorError as exc:
            raise ConfigError(f"{option}: {file} is truncated or not a safetensors file ({file.stat().st_size} "
                              f"bytes; safetensors: {exc}); copy or save it again") from None
    import torch

    # torch.save's zip keeps its directory at the end, so a truncated one does not open; mapped
    # to "meta", its tensors are not read (and an older, unzipped .bin loads the same way).
    try:
        return set(torch.load(file, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(file)))
    except (RuntimeError, OSError, EOFError, ValueError, TypeError) as exc:
        raise ConfigError(f"{option}: {file} is truncated or not a PyTorch checkpoint ({file.stat().st_size} "
                          f"bytes; {type(exc).__name__}: {exc}); copy or save it again") from None


def check_reward_model(option: str, path: str) -> None:
    """The directory holds a reward model: a sequence classifier whose head's weights (those of
    the classifier outside its base model, for any architecture) are all in the checkpoint. A
    causal LM, or a base model, would be given a head of random weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    settings = model_config(option, path)
    names = _weights(option, path, required=True)
    try:
        with torch.device("meta"):  # the parameters' names and shapes, no memory
            skeleton = AutoModelForSequenceClassification.from_config(settings)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{option}: {path} ({settings.model_type}) has no sequence-classification form in "
                          f"transformers to score with ({exc})") from None
    base = f"{skeleton.base_model_prefix}."
    loaded = _as_loaded(skeleton, names)
    missing = [key for key in skeleton.state_dict() if not key.startswith(base) and key not in loaded]
    if missing:
        kind = ", ".join(getattr(settings, "architectures", None) or [settings.model_type])
        raise ConfigError(f"{option}: {path} is not a reward model: its checkpoint ({kind}) has no weights for the "
                          f"score head ({', '.join(missing)}), which would start random and score noise. Train "
                          f"one with ppo-fast rm --model {path} --data PREFERENCES")


def _as_loaded(model, names: set[str]) -> set[str]:
    """The checkpoint's weight names as transformers renames them when it loads them into
    ``model``: its base-model prefix added or dropped, and the architecture's own renamings
    (legacy names, fused experts), so that a head saved under another name is found."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    return {rename_source_key(name, renamings, converters, model.base_model_prefix, expected)[0]
            for name in names} | names


def load_reward_model(option: str, path: str, **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained(path, **kwargs)``, refused when
    transformers initialises any of its weights afresh (missing from the checkpoint): the check
    of the load itself, for what :func:`check_reward_model` could not see beforehand."""
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    fresh = sorted(info["missing_keys"])
    if fresh:
        raise ConfigError(f"{option}: {path} is not a whole reward model: transformers would initialise "
                          f"{len(fresh)} of its weights afresh ({', '.join(fresh[:5])}"
                          f"{', ...' if len(fresh) > 5 else ''}), so its scores would be noise")
    return model
