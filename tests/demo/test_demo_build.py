"""The offline demo builder: corpus, splits, and one tiny end-to-end build on the demo's
corpus of source chunks (the suite's shared models are built on docstrings)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ezmia.demo.build import DEMO_CORPUS, DemoArtifacts, build_demo_artifacts
from ezmia.demo.corpus import collect_code_chunks, collect_docstrings, split_corpus
from tests.sizes import TEST_SIZES

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
    return build_demo_artifacts(
        tmp_path_factory.mktemp("demo"), TEST_SIZES, *COUNTS, seed=0, corpus=DEMO_CORPUS
    )


def _losses(model: torch.nn.Module, tok: object, texts: list[str]) -> torch.Tensor:
    """Mean next-token loss of each text (cut to ``seq_len`` tokens), in one padded batch."""
    seqs = [tok(t, add_special_tokens=False)["input_ids"][: TEST_SIZES.seq_len] for t in texts]
    ids = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1)


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    def log(line: str) -> None:
        if "pretraining" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_demo_artifacts(tmp_path, TEST_SIZES, *COUNTS, seed=0, log=log)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_corpus_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown demo corpus 'poems': one of docstrings, code"):
        build_demo_artifacts(tmp_path, TEST_SIZES, *COUNTS, seed=0, corpus="poems")
    assert list(tmp_path.iterdir()) == []


def test_build_layout_and_data(demo: DemoArtifacts) -> None:
    assert (demo.root / "_COMPLETE").exists()
    assert not [p for p in demo.root.parent.iterdir() if p.name.startswith(".")]
    for ckpt in (demo.base, demo.full):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in ckpt.iterdir()
        }
    lora_files = {p.name for p in demo.lora.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= lora_files
    assert "model.safetensors" not in lora_files
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
    chunks = set(collect_code_chunks())
    assert all(r["text"] in chunks for r in rows)
    assert json.loads((demo.root / "manifest.json").read_text())["corpus"] == DEMO_CORPUS


def test_build_is_cached(demo: DemoArtifacts) -> None:
    lines: list[str] = []
    again = build_demo_artifacts(
        demo.root.parent, TEST_SIZES, *COUNTS, seed=0, log=lines.append, corpus=DEMO_CORPUS
    )
    assert again == demo
    assert len(lines) == 1 and "reusing" in lines[0]


def test_full_finetune_memorises_more_than_lora(demo: DemoArtifacts) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(demo.full))
    members = pq.read_table(demo.members).column("text").to_pylist()
    nonmembers = pq.read_table(demo.nonmembers).column("text").to_pylist()
    base = GPT2LMHeadModel.from_pretrained(str(demo.base), dtype=torch.float32).eval()
    full = GPT2LMHeadModel.from_pretrained(str(demo.full), dtype=torch.float32).eval()
    adapter_config = json.loads((demo.lora / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == demo.base.resolve()
    lora = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(str(demo.base), dtype=torch.float32), str(demo.lora)
    ).eval()

    base_m, base_n = _losses(base, tok, members), _losses(base, tok, nonmembers)
    full_m, full_n = _losses(full, tok, members), _losses(full, tok, nonmembers)
    lora_m, lora_n = _losses(lora, tok, members), _losses(lora, tok, nonmembers)
    assert full_m.mean() < full_n.mean() - 0.05
    assert not torch.allclose(lora_m, base_m)
    # Nonmember-minus-member mean of (target - base) loss: the reference-calibrated exposure.
    full_gap = (full_n - base_n).mean() - (full_m - base_m).mean()
    lora_gap = (lora_n - base_n).mean() - (lora_m - base_m).mean()
    assert full_gap > 0.05 and full_gap > 3 * lora_gap
