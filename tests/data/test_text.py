"""Tokenizing texts for scoring: truncation at ``max_length``, the zlib size of the kept text,
hashes of the whole text, and texts without tokens (real tokenizer of the test models)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import zlib

import pytest
from tokenizers import processors

from ezmia.data.text import load_tokenizer, text_hash, tokenize
from ezmia.errors import ModelError
from ezmia.plan.checks import check_vocabulary, vocab_sizes
from ezmia.plan.models import ModelPlan

WORDS = " ".join(f"word{i}" for i in range(60))


@pytest.fixture(scope="module")
def tokenizer(models):
    return load_tokenizer(models.tokenizer)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def zsize(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


def kept_prefix(tokenizer, text: str, ids: list[int]) -> str:
    """The shortest prefix of ``text`` that tokenizes to exactly ``ids``."""
    return next(text[:end] for end in range(len(text) + 1) if encode(tokenizer, text[:end]) == ids)


def test_long_text_is_cut_to_max_length_tokens_and_zlib_measures_the_kept_part(tokenizer):
    full = encode(tokenizer, WORDS)
    assert len(full) > 40
    tokens = tokenize(tokenizer, [WORDS], max_length=10)
    assert tokens.input_ids == [full[:10]]
    assert tokens.truncated == [True]
    kept = kept_prefix(tokenizer, WORDS, full[:10])
    assert WORDS.startswith(kept) and len(kept) < len(WORDS) // 3
    assert tokens.zlib_size == [zsize(kept)]
    assert tokens.zlib_size[0] < zsize(WORDS)
    assert tokens.text_sha256 == [hashlib.sha256(WORDS.encode()).hexdigest()]  # whole text


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_truncation_starts_one_token_past_max_length(tokenizer, extra):
    full = encode(tokenizer, WORDS)
    max_length = len(full) - extra
    tokens = tokenize(tokenizer, [WORDS], max_length)
    assert tokens.input_ids == [full[:max_length]]
    assert tokens.truncated == [extra > 0]
    expected = zsize(WORDS) if extra <= 0 else zsize(kept_prefix(tokenizer, WORDS, full[:-1]))
    assert tokens.zlib_size == [expected]


def test_zlib_of_truncated_non_ascii_text_counts_utf8_bytes_of_the_kept_characters(tokenizer):
    text = "é" * 30 + " ünïcödé " * 10
    full = encode(tokenizer, text)
    tokens = tokenize(tokenizer, [text], max_length=len(full) // 2)
    kept = kept_prefix(tokenizer, text, full[: len(full) // 2])
    assert tokens.truncated == [True]
    assert tokens.zlib_size == [zsize(kept)]


def test_texts_without_tokens_give_no_ids_and_zero_zlib_size(tokenizer):
    tokens = tokenize(tokenizer, [None, "", "  \n\t", "x", "Return the"], max_length=8)
    assert tokens.input_ids == [[], [], [], encode(tokenizer, "x"), encode(tokenizer, "Return the")]
    assert [len(ids) for ids in tokens.input_ids] == [0, 0, 0, 1, 2]
    assert tokens.truncated == [False] * 5
    assert tokens.zlib_size == [0, 0, 0, zsize("x"), zsize("Return the")]
    assert tokens.text_sha256[0] is None
    assert tokens.text_sha256[1] == hashlib.sha256(b"").hexdigest()


def test_rows_keep_their_order_around_texts_without_tokens(tokenizer):
    texts = ["", "alpha beta", None, "gamma"]
    tokens = tokenize(tokenizer, texts, max_length=64)
    assert tokens.input_ids == [[], encode(tokenizer, "alpha beta"), [], encode(tokenizer, "gamma")]
    assert tokens.text_sha256 == [text_hash(t) for t in texts]


def test_no_special_tokens_are_added(tokenizer):
    ids = tokenize(tokenizer, ["Return the"], max_length=8).input_ids[0]
    assert ids == tokenizer("Return the", add_special_tokens=False)["input_ids"]
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_text_hash_is_sha256_of_utf8():
    assert text_hash("é") == hashlib.sha256("é".encode()).hexdigest()
    assert text_hash(None) is None


def test_a_tokenizer_is_loaded_once_until_a_file_in_its_folder_changes(models, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(models.tokenizer, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    first = load_tokenizer(folder)
    assert load_tokenizer(folder) is first
    vocab = spec["model"]["vocab"]
    one, other = [word for word, i in vocab.items() if 100 <= i < 1000][:2]
    vocab[one], vocab[other] = vocab[other], vocab[one]
    before = os.stat(folder / "tokenizer.json")
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    assert os.stat(folder / "tokenizer.json").st_size == before.st_size
    os.utime(folder / "tokenizer.json", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    changed = load_tokenizer(folder)
    assert changed is not first
    assert changed.convert_tokens_to_ids(one) == first.convert_tokens_to_ids(other)
    (folder / "notes.txt").write_text("a new file in the folder")
    assert load_tokenizer(folder) is not changed


def test_a_folder_without_a_tokenizer_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def tokenizer_with_extras(models, tmp_path_factory):
    """The test tokenizer saved with a BOS post-processor and a built-in 5-token truncation."""
    tokenizer = copy.deepcopy(load_tokenizer(models.tokenizer))  # the loaded one is shared
    bos = tokenizer.all_special_tokens[0]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    )
    tokenizer.backend_tokenizer.enable_truncation(5)
    path = tmp_path_factory.mktemp("tokenizer-extras")
    tokenizer.save_pretrained(path)
    assert json.loads((path / "tokenizer.json").read_text())["truncation"]["max_length"] == 5
    return load_tokenizer(path)


def test_a_tokenizer_that_adds_special_tokens_does_not_add_them_here(tokenizer_with_extras):
    with_bos = tokenizer_with_extras(WORDS)["input_ids"]
    tokens = tokenize(tokenizer_with_extras, [WORDS], max_length=12)
    assert tokens.input_ids == [with_bos[1:13]]
    assert tokens.input_ids[0][0] != with_bos[0]


def test_a_truncation_saved_in_the_tokenizer_does_not_shorten_rows(tokenizer_with_extras):
    tokens = tokenize(tokenizer_with_extras, [WORDS], max_length=12)
    assert len(tokens.input_ids[0]) == 12 and tokens.truncated == [True]


def test_a_tokenizers_own_code_never_runs_when_it_loads(models, tmp_path):
    """Planning refuses ``auto_map`` in tokenizer_config.json; the loader itself never runs
    that code either (nor asks whether it may): it loads the tokenizer without it."""
    folder = shutil.copytree(models.tokenizer, tmp_path / "tokenizer")
    marker = tmp_path / "ran"
    (folder / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).is_fast  # the declared class is passed over, not imported
    assert not marker.exists()


def test_a_slow_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "ByT5Tokenizer"}')
    with pytest.raises(ModelError, match="fast \\(Rust\\) tokenizer"):
        load_tokenizer(tmp_path)


def test_a_small_model_max_length_in_the_tokenizer_does_not_shorten_rows(models, tmp_path):
    tokenizer = copy.deepcopy(load_tokenizer(models.tokenizer))
    tokenizer.model_max_length = 6
    tokenizer.save_pretrained(tmp_path)
    tokens = tokenize(load_tokenizer(tmp_path), [WORDS], max_length=12)
    assert len(tokens.input_ids[0]) == 12 and tokens.truncated == [True]


def model_dir(root, name: str, config: dict):
    (root / name).mkdir()
    (root / name / "config.json").write_text(json.dumps(config))
    return root / name


def test_vocab_sizes_of_both_models_or_of_an_adapters_base(models, tmp_path):
    target = model_dir(tmp_path, "t", {"vocab_size": 1000})
    reference = model_dir(tmp_path, "r", {"text_config": {"vocab_size": 1200}})
    full = ModelPlan(target, reference, False, models.tokenizer)
    assert vocab_sizes(full) == [(target / "config.json", 1000), (reference / "config.json", 1200)]
    adapter = ModelPlan(target, reference, True, models.tokenizer)
    assert vocab_sizes(adapter) == [(reference / "config.json", 1200)]
    unknown = model_dir(tmp_path, "u", {"model_type": "x"})
    assert vocab_sizes(ModelPlan(target, unknown, False, models.tokenizer)) == [
        (target / "config.json", 1000)
    ]


@pytest.mark.parametrize(("size", "refused"), [(1023, True), (1024, False), (1025, False)])
def test_a_tokenizer_is_refused_exactly_when_its_highest_id_is_outside_a_vocabulary(
    models, tmp_path, size, refused
):
    top = max(load_tokenizer(models.tokenizer).get_vocab().values())
    assert top == 1023  # the test tokenizer's 1024 ids
    small = model_dir(tmp_path, "small", {"vocab_size": size})
    plan = ModelPlan(models.full, small, False, models.tokenizer)
    if not refused:
        check_vocabulary(plan)
        return
    with pytest.raises(ModelError) as err:
        check_vocabulary(plan)
    token = next(t for t, i in load_tokenizer(models.tokenizer).get_vocab().items() if i == 1023)
    assert str(err.value) == (
        f"{models.tokenizer / 'tokenizer.json'}: the tokenizer can produce token ids up to 1023 "
        f"({token!r}), but {small / 'config.json'} has vocab_size 1023 (ids 0 to 1022): use the "
        "tokenizer the model was trained with, or resize the model's embeddings to the "
        "tokenizer (resize_token_embeddings) and save it again"
    )


def test_a_vocabulary_refusal_names_the_tokenizer_folder_without_tokenizer_json(models, tmp_path):
    """A GPT-2 tokenizer saved as vocab.json and merges.txt (no tokenizer.json)."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    load_tokenizer(models.tokenizer).backend_tokenizer.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    small = model_dir(tmp_path, "small", {"vocab_size": 1000})
    with pytest.raises(ModelError, match=f"^{folder}: the tokenizer can produce token ids up to"):
        check_vocabulary(ModelPlan(models.full, small, False, folder))
