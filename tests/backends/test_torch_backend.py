"""The PyTorch backend: exact statistics, invariance to batching and order, shared-base
adapters equal to merged models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ezmia.backends.torch import TorchBackend, length_batches
from ezmia.data.text import load_tokenizer, tokenize
from ezmia.plan.models import merged_adapter_dir, plan_models
from ezmia.stats.scores import score_sequence
from tests.reference_ez import naive_ez


@pytest.fixture(scope="module")
def sequences(models):
    import pyarrow.parquet as pq

    texts = pq.read_table(models.eval).column("text").to_pylist()[:24]
    tokenizer = load_tokenizer(models.base)
    return tokenize(tokenizer, [*texts, "", "a"], max_length=64).input_ids


@pytest.fixture(scope="module")
def full_backend(models):
    return TorchBackend(plan_models(str(models.full), str(models.base)), batch_size=4)


def _padded_cost(lengths, batches, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in batches)


def _cheapest_partition(lengths, max_rows, overhead):
    """Brute force: every split of the longest-first order into runs of at most ``max_rows``."""
    ordered = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = None
    for cuts in itertools.product((False, True), repeat=len(ordered) - 1):
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), len(ordered)]
        batches = [ordered[a:b] for a, b in itertools.pairwise(bounds)]
        if max(map(len, batches)) <= max_rows:
            cost = _padded_cost(lengths, batches, overhead)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_length_batches_pad_least_for_their_overhead(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 130, int(rng.integers(1, 11))).tolist()
    max_rows, overhead = int(rng.integers(1, 6)), int(rng.choice([0, 1, 32, 500]))
    batches = length_batches(lengths, max_rows, overhead)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= max_rows for b in batches)
    order = [i for b in batches for i in b]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert _padded_cost(lengths, batches, overhead) == _cheapest_partition(
        lengths, max_rows, overhead
    )


def test_length_batches_stay_full_when_a_pass_costs_more_than_any_padding():
    lengths = [128] * 5 + [60, 59, 20, 3, 3, 2]
    batches = length_batches(lengths, 4, 2**40)
    assert len(batches) == 3  # the fewest passes, then the least padding among them
    assert _padded_cost(lengths, batches, 0) == 3 * 128 + 4 * 128 + 4 * 20
    assert len(length_batches(lengths, 4, 32)) == 5
    assert length_batches([], 4, 32) == []


def test_scores_match_an_independent_implementation(full_backend, sequences):
    for ids, stats in zip(sequences, full_backend.token_stats(sequences), strict=True):
        expected, status = naive_ez(full_backend.target, full_backend.reference, ids)
        row = score_sequence(stats, len(ids), zlib_size=1)
        assert row["ez_status"] == status
        assert row["ez_score"] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_statistics_do_not_depend_on_batch_size_or_row_order(models, full_backend, sequences):
    other = TorchBackend(plan_models(str(models.full), str(models.base)), batch_size=7)
    order = np.random.default_rng(0).permutation(len(sequences))
    shuffled = other.token_stats([sequences[i] for i in order])
    baseline = full_backend.token_stats(sequences)
    for position, index in enumerate(order):
        a, b = baseline[index], shuffled[position]
        np.testing.assert_allclose(a.lp_target, b.lp_target, atol=1e-6)
        np.testing.assert_allclose(a.lp_reference, b.lp_reference, atol=1e-6)
        assert (a.target_top1 == b.target_top1).all()
        ra, rb = (score_sequence(s, len(sequences[index]), 1) for s in (a, b))
        assert ra["ez_status"] == rb["ez_status"]
        assert ra["ez_score"] == pytest.approx(rb["ez_score"], rel=1e-6, abs=1e-9)


def test_adapter_on_shared_base_equals_the_merged_model(models, sequences, tmp_path):
    plan = plan_models(str(models.lora), str(models.base))
    assert plan.target_is_adapter
    shared = TorchBackend(plan, batch_size=8)
    assert shared.target is shared.reference  # one copy of the base weights
    merged = TorchBackend(plan_models(str(merged_adapter_dir(plan, tmp_path)), str(models.base)))
    for a, b in zip(shared.token_stats(sequences), merged.token_stats(sequences), strict=True):
        np.testing.assert_allclose(a.lp_target, b.lp_target, atol=1e-5)
        np.testing.assert_allclose(a.lp_reference, b.lp_reference, atol=1e-5)


def test_reference_pass_of_an_adapter_target_is_the_plain_base(models, sequences):
    shared = TorchBackend(plan_models(str(models.lora), str(models.base)), batch_size=8)
    base = TorchBackend(plan_models(str(models.base), str(models.base)), batch_size=8)
    for a, b in zip(shared.token_stats(sequences), base.token_stats(sequences), strict=True):
        np.testing.assert_allclose(a.lp_reference, b.lp_target, atol=1e-5)
        assert not np.allclose(a.lp_target, a.lp_reference) or a.n_positions == 0


def test_min_k_pp_statistics_are_the_moments_of_the_next_token_distribution(
    full_backend, sequences
):
    ids = next(s for s in sequences if len(s) > 5)
    stats = full_backend.token_stats([ids])[0]
    with torch.no_grad():
        logp = torch.log_softmax(
            full_backend.target(torch.tensor([ids])).logits[0, :-1].double(), -1
        )
    mu = (logp.exp() * logp).sum(-1)
    sigma = ((logp.exp() * logp.square()).sum(-1) - mu.square()).sqrt()
    np.testing.assert_allclose(stats.mu, mu.numpy(), atol=1e-4)
    np.testing.assert_allclose(stats.sigma, sigma.numpy(), atol=1e-4)


def test_one_model_stages_emit_the_columns_of_the_shared_backend(models, full_backend, sequences):
    """A target stage and a reference stage, each holding one model, emit exactly the columns
    the two-model backend computes; the score stage rebuilds the same statistics."""
    from ezmia.backends.base import stats_from_columns

    plan = plan_models(str(models.full), str(models.base))
    target = TorchBackend(plan, role="target", batch_size=4)
    reference = TorchBackend(plan, role="reference", batch_size=4)
    assert target.reference is None and reference.target is None
    columns = {**target.pass_columns(sequences), **reference.pass_columns(sequences)}
    assert set(columns) == {"lp_target", "target_top1", "mu", "sigma", "lp_reference"}
    for a, b in zip(stats_from_columns(columns), full_backend.token_stats(sequences), strict=True):
        np.testing.assert_allclose(a.lp_target, b.lp_target, atol=1e-9)
        np.testing.assert_allclose(a.lp_reference, b.lp_reference, atol=1e-9)
        np.testing.assert_allclose(a.mu, b.mu, atol=1e-9)
        assert (a.target_top1 == b.target_top1).all()
