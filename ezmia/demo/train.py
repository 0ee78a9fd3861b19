"""Train a tiny GPT-2 from scratch and fine-tune it (full and LoRA), all offline on CPU."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer
from torch.nn.utils.rnn import pad_sequence
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ezmia.data.text import load_tokenizer
from ezmia.plan.checks import TOKENIZER_EXTRA_FILES, TOKENIZER_FILES

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ModelSizes:
    """Model shape and training schedule of a demo build."""

    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    pretrain_epochs: int
    finetune_epochs: int
    pretrain_lr: float
    full_lr: float
    lora_lr: float
    batch_size: int
    n_positions: int = 128
    seq_len: int = 128
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05


DEMO_SIZES = ModelSizes(
    vocab_size=2048,
    n_layer=4,
    n_embd=128,
    n_head=4,
    pretrain_epochs=2,
    finetune_epochs=5,
    pretrain_lr=3e-3,
    full_lr=1e-3,
    lora_lr=2e-3,
    batch_size=16,
)


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a HF fast tokenizer."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size, min_frequency=0, show_progress=False, special_tokens=[EOS]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bpe.to_str()),
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    out_dir = Path(out_dir)
    tok.save_pretrained(out_dir)  # never used to encode: no truncation/padding state baked in
    return out_dir


def encode(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    return tok(list(texts), add_special_tokens=False)["input_ids"]


def _collate(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and labelled -100."""
    rows = [torch.tensor(seq, dtype=torch.long) for seq in seqs]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train_loop(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int,
) -> float:
    """The one training loop: AdamW, linear warmup and decay, gradient clipping at 1.

    Returns the mean loss of the last epoch.
    """
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = epochs * math.ceil(len(seqs) / batch_size)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, (total - s) / (total - warmup + 1))
    )
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        order = torch.randperm(len(seqs), generator=order_rng).tolist()
        for start in range(0, len(order), batch_size):
            batch = _collate([seqs[i] for i in order[start : start + batch_size]], pad_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    return sum(losses) / max(1, len(losses))


def save_checkpoint(model: torch.nn.Module, tokenizer_dir: Path, out_dir: Path) -> Path:
    """``save_pretrained`` (safetensors) plus the tokenizer files, copied verbatim."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES + TOKENIZER_EXTRA_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy2(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir


def train_base(
    texts: Sequence[str], tokenizer_dir: Path, sizes: ModelSizes, out_dir: Path, seed: int
) -> Path:
    """Pretrain a GPT-2 from scratch on ``texts`` (EOS-joined, cut into ``seq_len`` chunks).

    ``out_dir`` becomes a complete checkpoint: config, ``model.safetensors``, tokenizer.
    """
    tok = load_tokenizer(tokenizer_dir)
    eos = tok.eos_token_id
    stream = [t for ids in encode(tok, texts) for t in [*ids, eos]]
    n = sizes.seq_len
    chunks = [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=sizes.n_positions,
        n_embd=sizes.n_embd,
        n_layer=sizes.n_layer,
        n_head=sizes.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    train_loop(
        model,
        chunks,
        epochs=sizes.pretrain_epochs,
        lr=sizes.pretrain_lr,
        batch_size=sizes.batch_size,
        pad_id=eos,
        seed=seed,
    )
    return save_checkpoint(model, tokenizer_dir, out_dir)


def set_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    """Point ``adapter_config.json``'s ``base_model_name_or_path`` at absolute ``base_dir``."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(Path(base_dir).resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def finetune(
    base_dir: Path, texts: Sequence[str], sizes: ModelSizes, out_dir: Path, seed: int, lora: bool
) -> Path:
    """Fine-tune the base on ``texts``, each cut to ``seq_len`` tokens, no special tokens: all
    of it, or a LoRA adapter on ``c_attn``/``c_proj``.

    ``out_dir`` becomes a complete checkpoint (config, ``model.safetensors``, tokenizer), or
    for LoRA only the adapter (``adapter_config.json``, ``adapter_model.safetensors``) plus
    tokenizer files, the adapter config naming the absolute ``base_dir``.
    """
    torch.manual_seed(seed)
    model = GPT2LMHeadModel.from_pretrained(str(Path(base_dir).resolve()), dtype=torch.float32)
    if lora:
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=sizes.lora_r,
            lora_alpha=sizes.lora_alpha,
            lora_dropout=sizes.lora_dropout,
            target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True,
        )
        model = get_peft_model(model, config)
    tok = load_tokenizer(base_dir)
    seqs = [ids[: sizes.seq_len] for ids in encode(tok, texts) if len(ids) >= 2]
    train_loop(
        model,
        seqs,
        epochs=sizes.finetune_epochs,
        lr=sizes.lora_lr if lora else sizes.full_lr,
        batch_size=sizes.batch_size,
        pad_id=tok.pad_token_id,
        seed=seed,
    )
    save_checkpoint(model, base_dir, out_dir)
    if lora:
        (Path(out_dir) / "README.md").unlink(missing_ok=True)  # peft's empty model card
        set_adapter_base(out_dir, base_dir)
    return Path(out_dir)
