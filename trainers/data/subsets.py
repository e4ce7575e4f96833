"""Subsets of a split: seeded and class-balanced, never "the first N" (class-sorted sources such as image
folders would give the first classes only)."""
from __future__ import annotations

import numpy as np

from trainers.seeding import derive_seed


def balanced_subset(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices of `count` samples of `labels`, as even across classes as the classes allow, in increasing order.

    Each class is shuffled (from `seed`), then the classes are dealt round-robin: the k-th draw of every class
    comes before any class's (k+1)-th, so a class smaller than its share gives all it has and the others fill
    in. The same (labels, count, seed) always give the same subset; a larger `count` extends a smaller one's.
    """
    labels = np.asarray(labels)
    if count >= labels.shape[0]:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(derive_seed(seed, "subset"))
    rank_in_class = np.empty(labels.shape[0], dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank_in_class[rng.permutation(members)] = np.arange(members.shape[0])
    # Ties (the same rank in several classes) are broken by a random order of the classes, per round.
    tie_break = rng.random(labels.shape[0])
    chosen = np.lexsort((tie_break, rank_in_class))[:count]
    return np.sort(chosen)
