"""The offline demo builder: corpus, splits, and one tiny end-to-end build."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ezmia.demo.build import DemoArtifacts, build_demo_artifacts
from ezmia.demo.corpus import collect_docstrings, split_corpus
from ezmia.demo.train import TEST_SIZES

COUNTS = (300, 150, 150)


def test_docstrings_nonempty_long_and_unique() -> None:
    docs = collect_docstrings()
    assert len(docs) > 1000
    assert all(len(d) >= 200 and d == d.strip() for d in docs)
    assert len(set(docs)) == len(docs)
    assert collect_docstrings() == docs
    assert collect_docstrings(min_chars=500) == [d for d in docs if len(d) >= 500]


def test_splits_disjoint_and_deterministic() -> None:
    docs = collect_docstrings()
    a = split_corpus(docs, *COUNTS, seed=0)
    assert (len(a.pretrain), len(a.members), len(a.nonmembers)) == COUNTS
    assert len(set(a.pretrain) | set(a.members) | set(a.nonmembers)) == sum(COUNTS)
    assert split_corpus(docs, *COUNTS, seed=0) == a
    assert split_corpus(docs, *COUNTS, seed=1) != a


def test_split_too_small_names_sizes() -> None:
    with pytest.raises(ValueError, match=r"3 distinct texts, need 6"):
        split_corpus(["a", "b", "c", "c"], 2, 2, 2, seed=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoArtifacts:
    return build_demo_artifacts(tmp_path_factory.mktemp("demo"), TEST_SIZES, *COUNTS, seed=0)


def _mean_loss(model: torch.nn.Module, tok: object, texts: list[str]) -> float:
    losses = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"][: TEST_SIZES.seq_len]
            ids_t = torch.tensor([ids])
            losses.append(model(input_ids=ids_t, labels=ids_t).loss.item())
    return sum(losses) / len(losses)


def test_build_layout_and_data(demo: DemoArtifacts) -> None:
    assert (demo.root / "_COMPLETE").exists()
    assert not [p for p in demo.root.parent.iterdir() if p.name.startswith(".")]
    for ckpt in (demo.base, demo.full):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in ckpt.iterdir()
        }
    assert json.loads((demo.full / "tokenizer.json").read_text())["truncation"] is None
    members = pq.read_table(demo.members).to_pylist()
    nonmembers = pq.read_table(demo.nonmembers).to_pylist()
    evaluation = pq.read_table(demo.eval)
    assert evaluation.column_names == ["id", "text", "is_member"]
    rows = evaluation.to_pylist()
    assert len(members) == COUNTS[1] and len(nonmembers) == COUNTS[2]
    assert sum(r["is_member"] for r in rows) == COUNTS[1] and len(rows) == sum(COUNTS[1:])
    assert {r["id"] for r in rows if r["is_member"]} == {r["id"] for r in members}
    assert not {r["text"] for r in members} & {r["text"] for r in nonmembers}


def test_build_is_cached(demo: DemoArtifacts) -> None:
    lines: list[str] = []
    again = build_demo_artifacts(demo.root.parent, TEST_SIZES, *COUNTS, seed=0, log=lines.append)
    assert again == demo
    assert len(lines) == 1 and "reusing" in lines[0]


def test_full_finetune_memorises_and_adapter_loads(demo: DemoArtifacts) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(demo.full))
    members = pq.read_table(demo.members).column("text").to_pylist()
    nonmembers = pq.read_table(demo.nonmembers).column("text").to_pylist()
    full = GPT2LMHeadModel.from_pretrained(str(demo.full), dtype=torch.float32).eval()
    assert _mean_loss(full, tok, members) < _mean_loss(full, tok, nonmembers) - 0.05

    adapter_config = json.loads((demo.lora / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == demo.base.resolve()
    base = GPT2LMHeadModel.from_pretrained(str(demo.base), dtype=torch.float32)
    lora = PeftModel.from_pretrained(base, str(demo.lora)).eval()
    ids = torch.tensor([tok(members[0], add_special_tokens=False)["input_ids"][:32]])
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        with lora.disable_adapter():
            plain = lora(input_ids=ids).logits
    assert not torch.allclose(adapted, plain)
