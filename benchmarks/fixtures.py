"""Benchmark models and data, built offline: random-init checkpoints of real architectures,
a BPE tokenizer trained on Python stdlib docstrings, and those docstrings as the texts.

Each model gets a base (the reference: random init, then a few training steps on docstrings
the benchmark never scores), a full fine-tune target (the base trained further on the first
``MEMBERS`` benchmark texts) and a LoRA adapter target (r=16 on the attention and projection
layers, A and B initialised randomly, then trained on the same texts with the base frozen)
whose config points at the base. Training matters for the score
comparison, not for speed: against a random-init reference the log-prob shifts are tiny
(~0.03 nats) next to the log-probs themselves (~-11), so any fp32 path's EZ scores carry a
relative error of ~1e-5 that no implementation can remove; trained checkpoints have shifts of
the size real fine-tunes show, and EZ scores that separate members from non-members.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ezmia.data.text import load_tokenizer
from ezmia.demo.corpus import collect_docstrings
from ezmia.demo.train import (
    DEMO_SIZES,
    encode,
    save_checkpoint,
    set_adapter_base,
    train_loop,
    train_tokenizer,
)

LORA_RANK = 16
TOKENIZER_VOCAB = 50257
MEMBERS = 32
PRETRAIN_TEXTS = 200
RECIPE = 3  # bump when the checkpoints change, so cached fixtures are rebuilt


@dataclass(frozen=True)
class Training:
    """Steps of the demo's training loop (AdamW, linear decay) on 128-token batches: the base's
    pretraining, the target's fine-tune."""

    pretrain_steps: int = 6
    finetune_steps: int = 2
    learning_rate: float = 2e-3
    batch_size: int = 8
    max_length: int = 128


@dataclass(frozen=True)
class ModelSpec:
    """An architecture to benchmark: its config and the modules LoRA adapts."""

    name: str
    family: str
    config: dict
    lora_modules: tuple[str, ...]
    training: Training = Training()


# Small models learn less per step: more steps (cheap at their size) give them shifts like
# GPT-2 small's.
SMALL_MODEL_TRAINING = Training(pretrain_steps=60, finetune_steps=4, learning_rate=6e-3)

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
        SMALL_MODEL_TRAINING,
    ),
    "tiny": ModelSpec(
        "tiny",
        "gpt2",
        {"vocab_size": 1024, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2},
        ("c_attn", "c_proj"),
        SMALL_MODEL_TRAINING,
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


def shuffled_docstrings(seed: int = 0) -> list[str]:
    """Every stdlib docstring of the corpus, in a seeded order."""
    docs = list(collect_docstrings())
    random.Random(seed).shuffle(docs)
    return docs


def texts(n: int, seed: int = 0, min_chars: int = 0) -> list[str]:
    """The first ``n`` of ``shuffled_docstrings`` (repeated when ``n`` exceeds the corpus); with
    ``min_chars``, each text joins the next docstrings until it is at least that long."""
    docs = itertools.cycle(shuffled_docstrings(seed))
    out = []
    for _ in range(n):
        text = next(docs)
        while len(text) < min_chars:
            text += "\n\n" + next(docs)
        out.append(text)
    return out


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


def _train(model, tokenizer, texts: list[str], steps: int, training: Training) -> None:
    """``steps`` batches of ``texts`` through the demo's training loop (one epoch), on the
    parameters that require grad; leaves ``model`` frozen in eval mode."""
    cycled = [texts[i % len(texts)] for i in range(steps * training.batch_size)]
    seqs = [ids[: training.max_length] for ids in encode(tokenizer, cycled)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_loop(model, seqs, epochs=1, lr=training.learning_rate,
               batch_size=training.batch_size, pad_id=pad_id, seed=0)  # fmt: skip
    model.requires_grad_(False)


def build(
    name: str,
    workdir: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Fixture:
    """Base, full fine-tune and LoRA adapter of ``SPECS[name]`` under ``workdir/name``."""
    from peft import LoraConfig, get_peft_model

    from benchmarks.measure import flop_params

    spec, root = SPECS[name], workdir / name
    training = spec.training
    meta = root / "fixture.json"
    if meta.exists() and json.loads(meta.read_text()).get("recipe") == RECIPE:
        return Fixture.at(root, json.loads(meta.read_text())["flop_params"])
    tokenizer = tokenizer_dir(workdir, min(TOKENIZER_VOCAB, spec.config.get("vocab_size", 50257)))
    torch.manual_seed(0)
    model = _new_model(spec, tokenizer, torch.device(device), dtype)
    docs = shuffled_docstrings()
    text_tokenizer = load_tokenizer(tokenizer)
    _train(model, text_tokenizer, docs[-PRETRAIN_TEXTS:], training.pretrain_steps, training)
    save_checkpoint(model, tokenizer, root / "base")
    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=list(spec.lora_modules),
        init_lora_weights=False,
    )
    adapted = get_peft_model(model, lora)  # freezes all but the adapter
    _train(adapted, text_tokenizer, docs[:MEMBERS], training.finetune_steps, training)
    save_checkpoint(adapted, tokenizer, root / "lora")
    set_adapter_base(root / "lora", root / "base")
    model = adapted.unload().requires_grad_(True)
    _train(model, text_tokenizer, docs[:MEMBERS], training.finetune_steps, training)
    save_checkpoint(model, tokenizer, root / "full")
    fixture = Fixture.at(root, flop_params(model))
    meta.write_text(json.dumps({"flop_params": fixture.flop_params, "recipe": RECIPE}))
    return fixture
