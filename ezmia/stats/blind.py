"""The blind baseline: how well the texts alone, without any model, tell members from
non-members. A split whose two sides differ in source, date or style is distinguishable by
anything, so every attack's figures on it are inflated (Das, Zhang and Tramer 2024; Duan et
al. 2024). Hashed word 1-2-grams and a logistic regression, cross-fitted so that every row
is scored by a model that never saw it. Pure computation, no I/O; texts are never kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

from ezmia.stats.metrics import bootstrap_intervals, point_metrics

AUC_LIMIT = 0.6  # a blind AUC above this, with its interval above 0.5, flags the split
FOLDS = 5
FEATURES = 2**18
MAX_ROWS = 100_000  # a larger audit is judged on a seeded random sample of about this size


def text_features(texts: Sequence[str | None]) -> sparse.csr_matrix:
    """Hashed word 1-2-gram features of each text (stateless: computed a chunk at a time)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(
        ngram_range=(1, 2), n_features=FEATURES, alternate_sign=False, norm="l2"
    )
    return vectorizer.transform([t or "" for t in texts])


def blind_scores(features: sparse.csr_matrix, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out-of-fold member probabilities from the text features alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = min(FOLDS, int(labels.sum()), int((~labels).sum()))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    model = LogisticRegression(C=1.0, solver="liblinear")
    return cross_val_predict(model, features, labels, cv=split, method="predict_proba")[:, 1]


def blind_baseline(
    features: sparse.csr_matrix, labels: np.ndarray, bootstrap_rounds: int, seed: int = 0
) -> dict[str, object] | None:
    """The blind classifier's AUC with a 95% bootstrap interval and whether it flags the
    split; ``None`` when a class has fewer than 2 rows."""
    labels = np.asarray(labels, dtype=bool)
    if min(labels.sum(), (~labels).sum()) < 2:
        return None
    scores = blind_scores(features, labels, seed)
    auc = point_metrics(labels, scores)["auc"]
    interval = bootstrap_intervals(labels, scores, bootstrap_rounds, seed).get("auc")
    return {
        "auc": auc,
        "auc_ci95": interval,
        "n": int(len(labels)),
        "limit": AUC_LIMIT,
        "distinguishable": bool(auc > AUC_LIMIT and (interval is None or interval[0] > 0.5)),
    }
