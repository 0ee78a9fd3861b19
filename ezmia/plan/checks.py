"""Refusals before anything loads, from configs, tokenizer files and safetensors headers: unsafe
or incomplete checkpoints, adapters that do not fit their reference, and a target and reference
that would not score the same token ids.
"""

from __future__ import annotations

import filecmp
import fnmatch
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ezmia.data.text import load_tokenizer
from ezmia.errors import ModelError
from ezmia.plan.fetch import HEADER, HEADER_LISTING, PICKLE_WEIGHTS, SAFE_WEIGHTS, matching_files

if TYPE_CHECKING:
    from ezmia.plan.models import ModelPlan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
TOKENIZER_EXTRA_FILES = ("special_tokens_map.json", "merges.txt", "added_tokens.json")
ADAPTER_SAFE_WEIGHTS = "adapter_model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_FIX = "convert them to safetensors or pass --allow-pickle if you trust the source"


def check_checkpoint(path: Path, *, allow_pickle: bool, trust_remote_code: bool) -> bool:
    """Refuse unsafe or incomplete checkpoints; return True when ``path`` is an adapter."""
    is_adapter = (path / "adapter_config.json").exists()
    if not is_adapter and not (path / "config.json").exists():
        raise ModelError(f"{path}: neither config.json nor adapter_config.json; not a checkpoint")
    # the safetensors the loaders read first: without them peft (and vLLM's LoRA loader) reads
    # adapter_model.bin, even beside a safetensors file of another name
    safe = (ADAPTER_SAFE_WEIGHTS,) if is_adapter else SAFE_WEIGHTS
    if not _weights(path, safe):
        if not _weights(path, PICKLE_WEIGHTS):
            raise ModelError(
                f"{path}: no weights found (expected {safe[0]}); is the checkpoint complete?"
            )
        if not allow_pickle:
            raise ModelError(
                f"{path}: no {safe[0]}, only pickle-based weights (.bin/.pt), which can run code "
                f"when loaded; {PICKLE_FIX}"
            )
    if not (allow_pickle or is_adapter):
        _refuse_pickle_shards(path)
    config_file = path / ("adapter_config.json" if is_adapter else "config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{config_file}: unreadable JSON ({err})") from err
    if config.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{config_file}: declares custom code (auto_map); pass --trust-remote-code only if "
            "you trust this checkpoint"
        )
    _check_tokenizer_files(path)
    kernel = _hub_kernel(config)
    if kernel and not trust_remote_code:
        raise ModelError(
            f"{config_file}: asks for the hub kernel {kernel!r}, code transformers would "
            "download and run; remove the key, or pass --trust-remote-code only if you trust it"
        )
    weight_shapes(path)  # refuses truncated or corrupt safetensors before anything loads
    return is_adapter


def _check_tokenizer_files(path: Path) -> None:
    """Refuse tokenizer settings that would run code or load a model: a tokenizer's own code
    (``auto_map`` in tokenizer_config.json; ezmia loads tokenizers without it), and a
    ``tokenizer_class`` (tokenizer_config.json or config.json) naming a transformers class that
    is not a tokenizer: AutoTokenizer would call its ``from_pretrained``, and a model class
    loads the folder's weights, pickle ones included."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            settings = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue  # absent or unreadable: the loaders say why
        if not isinstance(settings, dict):
            continue
        if name == "tokenizer_config.json" and settings.get("auto_map"):
            raise ModelError(
                f"{path / name}: the tokenizer ships its own code (auto_map), which ezmia never "
                "runs; use a tokenizer without it, e.g. the base model's"
            )
        value = settings.get("tokenizer_class")
        if value is not None and not (isinstance(value, str) and _is_tokenizer_class(value)):
            raise ModelError(
                f"{path / name}: tokenizer_class {value!r} is not a tokenizer class (loading "
                "it would load a model, pickle weights included); set it to the tokenizer's "
                "class, e.g. PreTrainedTokenizerFast, or remove the key"
            )


def _is_tokenizer_class(name: str) -> bool:
    """Whether ``name`` and its fast or slow twin (AutoTokenizer tries both) are tokenizer
    classes, or names transformers does not know (it then falls back to its own choice)."""
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    for variant in {name, name.removesuffix("Fast"), f"{name}Fast"}:
        found = tokenizer_class_from_name(variant)
        if found is None or type(found).__name__ == "DummyObject":
            continue  # unknown, or a tokenizer lacking its backend (transformers says so)
        if not (isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase)):
            return False
    return True


KERNEL_KEYS = ("attn_implementation", "_attn_implementation", "experts_implementation")


def _hub_kernel(config: object) -> str | None:
    """A hub repository (``org/name``) that a config, or any config nested in it, names as its
    attention or experts implementation: transformers fetches such kernels and runs them."""
    if isinstance(config, list):
        return next(filter(None, map(_hub_kernel, config)), None)
    if not isinstance(config, dict):
        return None
    for key, value in config.items():
        if key in KERNEL_KEYS:  # a name, or one per sub-config
            named = value.values() if isinstance(value, dict) else [value]
            if found := next((v for v in named if isinstance(v, str) and "/" in v), None):
                return found
        elif found := _hub_kernel(value):
            return found
    return None


def _refuse_pickle_shards(path: Path) -> None:
    """Refuse a ``model.safetensors.index.json`` naming a shard that is not a safetensors
    file: transformers loads every shard it names, such a one with ``torch.load``."""
    index = path / SAFE_INDEX
    if not index.is_file():
        return
    try:
        shards = json.loads(index.read_text())["weight_map"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(f"{index}: unreadable weight_map ({err}); save the model again") from err
    for shard in shards:
        if not (isinstance(shard, str) and fnmatch.fnmatch(shard, "*.safetensors")):
            raise ModelError(
                f"{index}: weight_map names the shard {shard!r}, not a safetensors file; "
                f"transformers would load it with pickle, which can run code: {PICKLE_FIX}"
            )


def weight_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape in the checkpoint's safetensors files (headers only)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, list[int]] = {}
    for file in _weights(path, SAFE_WEIGHTS):
        if not file.exists():
            shapes.update(_header_shapes(file))
            continue
        try:
            with safe_open(str(file), framework="numpy") as handle:
                names = handle.keys()  # noqa: SIM118 - a safetensors handle is not a dict
                shapes.update({k: handle.get_slice(k).get_shape() for k in names})
        except (SafetensorError, OSError) as err:
            raise ModelError(
                f"{file}: corrupt or truncated safetensors file ({err}); download or save the "
                "checkpoint again"
            ) from err
    return shapes


def _weights(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The weight files of a checkpoint directory: those present, and in a planning directory
    (``resolve_model_dir(weights=False)``) those its S3 listing names (a safetensors file's
    header stands in for it)."""
    present = matching_files(path, patterns)
    if not (path / HEADER_LISTING).exists():
        return present
    names = [rel for rel, *_ in json.loads((path / HEADER_LISTING).read_text())]
    listed = [
        path / n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in patterns)
    ]
    return sorted(set(present) | set(listed))


def _header_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header saved beside where the file would be; refuses a
    header that is not JSON or whose tensors extend past the file's listed size."""
    saved = json.loads(file.with_name(file.name + HEADER).read_text())
    try:
        header = json.loads(saved["header"])
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ModelError(
            f"{file}: corrupt safetensors header ({err}); upload the checkpoint again"
        ) from err
    if 8 + saved["length"] + end != saved["size"]:
        raise ModelError(
            f"{file}: corrupt or truncated safetensors file (its header describes "
            f"{8 + saved['length'] + end} bytes, the object has {saved['size']}); upload the "
            "checkpoint again"
        )
    return shapes


def check_adapter_fits(adapter_dir: Path, reference_dir: Path) -> None:
    """Refuse a LoRA adapter that does not match the reference exactly, before loading (peft
    would only warn and drop what does not fit): every adapter tensor must belong to a module
    of the reference, its LoRA matrices must fit that module's weight, and any other tensor
    (``modules_to_save``) must have the reference tensor's shape."""
    adapter = weight_shapes(adapter_dir)
    base = weight_shapes(reference_dir)
    config = json.loads((reference_dir / "config.json").read_text())
    tied = config.get("tie_word_embeddings", True)  # an output head tied to the embeddings
    for key, shape in sorted(adapter.items()):
        name = key.removeprefix("base_model.model.")
        module, lora, part = name.partition(".lora_")
        if not lora:
            problem = _tensor_mismatch(name, shape, base, tied)
        else:
            problem = _lora_mismatch(module, part, key, adapter, base)
        if problem:
            raise ModelError(
                f"{adapter_dir}: the adapter does not fit reference {reference_dir}: {problem}; "
                "pass the base model it was trained on as --reference"
            )


def _in_reference(name: str, base: dict[str, list[int]]) -> list[int] | None:
    """The shape of ``name`` in the reference, with or without its first path segment."""
    return next((base[c] for c in (name, name.partition(".")[2]) if c in base), None)


def _tensor_mismatch(
    name: str, shape: list[int], base: dict[str, list[int]], tied: bool
) -> str | None:
    found = _in_reference(name, base)
    if found is None and tied and name.endswith("lm_head.weight"):
        return None  # the reference stores its tied output head as the input embedding
    if found is None:
        return f"tensor {name} does not exist in the reference"
    return None if found == shape else f"tensor {name} is {shape} but {found} in the reference"


def _lora_mismatch(
    module: str, part: str, key: str, adapter: dict[str, list[int]], base: dict[str, list[int]]
) -> str | None:
    """Why the LoRA tensor ``key`` (``<module>.lora_<part>``) does not fit, or None."""
    weight = _in_reference(f"{module}.weight", base)
    if weight is None or len(weight) < 2:
        return f"module {module} has no weight matrix in the reference (adapter tensor {key})"
    pairs = {"A.weight": "B.weight", "embedding_A": "embedding_B"}
    pair = pairs.get(part) or next((a for a, b in pairs.items() if b == part), None)
    if pair is None:
        return None  # magnitude vectors, LoRA biases: their module exists
    other = key.replace(f".lora_{part}", f".lora_{pair}")
    if other not in adapter:
        return f"module {module} has lora_{part} but no lora_{pair}"
    if part not in pairs:
        return None  # the pair is checked from its A side
    a_shape, b_shape = adapter[key], adapter[other]
    if part == "embedding_A":  # A: rank x vocabulary, B: width x rank
        fits = [a_shape[-1], b_shape[0]] == weight[:2]
    else:  # Linear (out x in) or GPT-2's Conv1D (in x out)
        fits = sorted((a_shape[1], b_shape[0])) == sorted(weight[:2])
    if fits and a_shape[0] == b_shape[1]:
        return None
    return (
        f"module {module} is {a_shape[1]}x{b_shape[0]} in the adapter but "
        f"{weight[0]}x{weight[1]} in the reference"
    )


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, as recorded in its config."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(
            f"{adapter_dir}/adapter_config.json: no base_model_name_or_path; pass --reference"
        )
    return str(base)


def has_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds a tokenizer's files."""
    return any((path / name).exists() for name in TOKENIZER_FILES)


def config_vocab_size(directory: Path) -> int | None:
    """The ``vocab_size`` a checkpoint's config.json declares (a multimodal config's in its
    ``text_config``), if it does."""
    config = json.loads((directory / "config.json").read_text())
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def check_same_vocab(target_dir: Path, reference_dir: Path) -> None:
    """Refuse a full target and a reference whose configs declare different vocabularies."""
    sizes = [config_vocab_size(d) for d in (target_dir, reference_dir)]
    if sizes[0] != sizes[1]:
        raise ModelError(
            f"target {target_dir} has vocab_size {sizes[0]} but reference {reference_dir} has "
            f"{sizes[1]}: EZ-MIA compares the same tokens under both models, so they must "
            "share a tokenizer"
        )


def _same_file(a: Path, b: Path) -> bool:
    """Both absent, or both files with the same bytes."""
    if a.is_file() and b.is_file():
        return filecmp.cmp(a, b, shallow=False)
    return not a.exists() and not b.exists()


def check_same_tokenizer(target_dir: Path, reference_dir: Path) -> None:
    """Refuse two tokenizers with different vocabularies; byte-identical tokenizer files are
    the same tokenizer, without loading either."""
    names = TOKENIZER_FILES + TOKENIZER_EXTRA_FILES
    if all(_same_file(target_dir / name, reference_dir / name) for name in names):
        return
    if load_tokenizer(target_dir).get_vocab() != load_tokenizer(reference_dir).get_vocab():
        raise ModelError(
            f"the tokenizers of target {target_dir} and reference {reference_dir} differ: "
            "EZ-MIA needs both models to score the same token ids"
        )


def vocab_sizes(plan: ModelPlan) -> list[tuple[Path, int]]:
    """The ``vocab_size`` of each scored model's config.json (an adapter scores on its
    reference's), where the config says."""
    dirs = [plan.reference] if plan.target_is_adapter else [plan.target, plan.reference]
    sizes = [(d / "config.json", config_vocab_size(d)) for d in dirs]
    return [(file, size) for file, size in sizes if size is not None]


def check_vocabulary(plan: ModelPlan) -> None:
    """Refuse a tokenizer that can produce token ids (added tokens included) beyond either
    model's vocabulary, before any model loads."""
    vocab = load_tokenizer(plan.tokenizer).get_vocab()
    if not vocab:
        return
    token, top = max(vocab.items(), key=lambda item: item[1])
    source = plan.tokenizer / "tokenizer.json"
    source = source if source.exists() else plan.tokenizer
    for config, size in vocab_sizes(plan):
        if top >= size:
            raise ModelError(
                f"{source}: the tokenizer can produce token ids up to {top} ({token!r}), but "
                f"{config} has vocab_size {size} (ids 0 to {size - 1}): use the tokenizer the "
                "model was trained with, or resize the model's embeddings to the tokenizer "
                "(resize_token_embeddings) and save it again"
            )
