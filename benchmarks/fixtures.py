"""Benchmark models and data, built offline: random-init checkpoints of real architectures,
a BPE tokenizer trained on Python stdlib docstrings, and those docstrings as the texts.

Each model gets a base (the reference), a full fine-tune target (the base with every weight
perturbed by 2%) and a LoRA adapter target (r=16, random A and B, on the attention and
projection layers) whose config points at the base.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ezmia.demo.corpus import collect_docstrings
from ezmia.demo.train import DEMO_SIZES, set_adapter_base, train_tokenizer
from ezmia.text import load_tokenizer

LORA_RANK = 16
TOKENIZER_VOCAB = 50257


@dataclass(frozen=True)
class ModelSpec:
    """An architecture to benchmark: its config and the modules LoRA adapts."""

    name: str
    family: str
    config: dict
    lora_modules: tuple[str, ...]


SPECS = {
    "gpt2-small": ModelSpec("gpt2-small", "gpt2", {}, ("c_attn", "c_proj")),
    "demo": ModelSpec(
        "demo",
        "gpt2",
        {
            "vocab_size": DEMO_SIZES.vocab_size,
            "n_positions": DEMO_SIZES.n_positions,
            "n_embd": DEMO_SIZES.n_embd,
            "n_layer": DEMO_SIZES.n_layer,
            "n_head": DEMO_SIZES.n_head,
        },
        ("c_attn", "c_proj"),
    ),
    "tiny": ModelSpec(
        "tiny",
        "gpt2",
        {"vocab_size": 1024, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2},
        ("c_attn", "c_proj"),
    ),
    "llama-1b": ModelSpec(
        "llama-1b",
        "llama",
        {
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        },
        ("q_proj", "k_proj", "v_proj", "o_proj"),
    ),
}


@dataclass(frozen=True)
class Fixture:
    """Checkpoint directories of one model, and ``N`` of its FLOPs (see ``measure``)."""

    name: str
    base: Path
    full: Path
    lora: Path
    flop_params: int

    @classmethod
    def at(cls, root: Path, flop_params: int) -> Fixture:
        return cls(root.name, root / "base", root / "full", root / "lora", flop_params)

    def target(self, kind: str) -> Path:
        return {"full": self.full, "lora": self.lora}[kind]


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` stdlib docstrings in a seeded order (repeated when ``n`` exceeds the corpus)."""
    docs = list(collect_docstrings())
    random.Random(seed).shuffle(docs)
    return [docs[i % len(docs)] for i in range(n)]


def tokenizer_dir(workdir: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on all docstrings, cached in ``workdir``."""
    out = workdir / f"tokenizer-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        train_tokenizer(collect_docstrings(), vocab_size, out)
    return out


def _new_model(spec: ModelSpec, tokenizer: Path, device: torch.device, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    classes = {"gpt2": (GPT2Config, GPT2LMHeadModel), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_cls, model_cls = classes[spec.family]
    eos = load_tokenizer(tokenizer).eos_token_id
    config = config_cls(**spec.config, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    with torch.device(device):
        return model_cls(config).to(dtype).eval()


def _save(model, out: Path, tokenizer: Path) -> None:
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            (out / name).write_bytes((tokenizer / name).read_bytes())


@torch.no_grad()
def _perturb(model, scale: float = 0.02) -> None:
    for param in model.parameters():
        param.mul_(1 + scale * torch.randn_like(param))


def build(
    name: str, workdir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Fixture:
    """Base, full fine-tune and LoRA adapter of ``SPECS[name]`` under ``workdir/name``."""
    from peft import LoraConfig, get_peft_model

    from benchmarks.measure import flop_params

    spec, root = SPECS[name], workdir / name
    meta = root / "fixture.json"
    if meta.exists():
        return Fixture.at(root, json.loads(meta.read_text())["flop_params"])
    tokenizer = tokenizer_dir(workdir, min(TOKENIZER_VOCAB, spec.config.get("vocab_size", 50257)))
    torch.manual_seed(0)
    model = _new_model(spec, tokenizer, torch.device(device), dtype)
    _save(model, root / "base", tokenizer)
    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=list(spec.lora_modules),
        init_lora_weights=False,
    )
    adapted = get_peft_model(model, lora)
    _save(adapted, root / "lora", tokenizer)
    set_adapter_base(root / "lora", root / "base")
    model = adapted.unload()
    _perturb(model)
    _save(model, root / "full", tokenizer)
    fixture = Fixture.at(root, flop_params(model))
    meta.write_text(json.dumps({"flop_params": fixture.flop_params}))
    return fixture
