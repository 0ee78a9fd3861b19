"""Scoring's own checks and columns: token ids against the vocabulary at its exact bounds,
and the types of the columns tokenizing adds."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ezmia.data.datasets import ROW_INDEX
from ezmia.data.text import load_tokenizer
from ezmia.engines.scoring import check_token_range, tokenize_rows
from ezmia.errors import ModelError


def rows(*sequences: list[int]) -> pa.Table:
    return pa.table(
        {
            ROW_INDEX: pa.array(range(10, 10 + len(sequences)), pa.int64()),
            "input_ids": pa.array(sequences, pa.list_(pa.int32())),
        }
    )


@pytest.mark.parametrize(
    "sequences",
    [
        ([0, 1, 9], [5]),  # the lowest and the highest id of a 10-token vocabulary
        ([], [9]),
        ([],),  # no tokens at all
    ],
)
def test_token_ids_inside_the_vocabulary_pass(sequences):
    check_token_range(rows(*sequences), vocab_size=10)


@pytest.mark.parametrize(
    ("sequences", "row", "bad"),
    [
        (([0, 1], [3, 10, 11]), 11, 10),  # one past the highest id, in the second row
        (([10], [3]), 10, 10),
        (([2, -1],), 10, -1),
    ],
)
def test_token_ids_outside_the_vocabulary_name_the_row_and_the_id(sequences, row, bad):
    with pytest.raises(ModelError) as err:
        check_token_range(rows(*sequences), vocab_size=10)
    assert str(err.value).startswith(f"source row {row}: token id {bad} is outside")
    assert "(ids 0 to 9)" in str(err.value)


def test_the_out_of_range_message_says_what_is_wrong_and_how_to_fix_it():
    with pytest.raises(ModelError) as err:
        check_token_range(rows([1, 2], [0, 10, -3]), vocab_size=10)
    assert str(err.value) == (
        "source row 11: token id 10 is outside the models' vocabulary (ids 0 to 9): the "
        "tokenizer does not match the models; use the tokenizer they were trained with"
    )


def test_an_unknown_vocabulary_size_checks_nothing():
    check_token_range(rows([10**6, -5]), vocab_size=None)


def test_tokenized_columns_have_the_scores_types(models):
    tokenizer = load_tokenizer(models.tokenizer)
    table = tokenize_rows(pa.table({"text": ["Return the", None]}), tokenizer, max_length=8)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("truncated").type == pa.bool_()
    assert table.schema.field("zlib_size").type == pa.int64()
    assert table.schema.field("text_sha256").type == pa.string()
    assert table.column("input_ids").to_pylist() == [
        tokenizer("Return the", add_special_tokens=False)["input_ids"],
        [],
    ]
    assert table.column("text_sha256").to_pylist()[1] is None


@pytest.mark.parametrize("texts", [[], [None, None]], ids=["no rows", "no texts"])
def test_tokenized_columns_keep_their_types_without_values_to_infer_them_from(models, texts):
    tokenizer = load_tokenizer(models.tokenizer)
    table = tokenize_rows(pa.table({"text": pa.array(texts, pa.string())}), tokenizer, 8)
    assert table.schema == pa.schema(
        {
            "text": pa.string(),
            "input_ids": pa.list_(pa.int32()),
            "truncated": pa.bool_(),
            "zlib_size": pa.int64(),
            "text_sha256": pa.string(),
        }
    )
