"""Deduplication and the grouped train/valid/test split, on 64-bit hashes of the sentences in numpy.

A few bytes per pair whatever the corpus size: the sentences themselves stay in their Arrow shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

_PAIR_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier, so (src, tgt) and (tgt, src) hash differently


def hash_texts(texts: Iterable[str]) -> np.ndarray:
    """64-bit xxh3 hashes of UTF-8 texts: stable across processes and runs (unlike `hash`)."""
    return np.fromiter((xxhash.xxh3_64_intdigest(text.encode("utf-8")) for text in texts), dtype=np.uint64)


def spread_sample(size: int, count: int | None, seed: int) -> np.ndarray:
    """Sorted positions of `count` of `size` rows drawn with `seed` (all of them when `count` is None or not
    smaller): a subset spread over the whole split, not its first rows, which in corpus order are often the
    shortest. The same seed gives the same subset, so scores of successive validations compare."""
    if count is None or count >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=count, replace=False))


def first_occurrences(src_hash: np.ndarray, tgt_hash: np.ndarray) -> np.ndarray:
    """Sorted rows of the first occurrence of each distinct (source, target) pair."""
    _, first = np.unique(src_hash ^ (tgt_hash * _PAIR_MIX), return_index=True)
    first.sort()
    return first


def connected_groups(src_hash: np.ndarray, tgt_hash: np.ndarray) -> np.ndarray:
    """A group label per pair: pairs sharing a source or a target hash (directly or through others) share it.

    Label propagation with pointer jumping over the bipartite graph source-sentence -- target-sentence, all in
    numpy: each round gives both ends of every pair the smaller label and then short-cuts label chains, so the
    rounds grow with the logarithm of a group's diameter, not with the corpus.
    """
    if not len(src_hash):
        return np.zeros(0, dtype=np.int64)
    _, src_node = np.unique(src_hash, return_inverse=True)
    _, tgt_node = np.unique(tgt_hash, return_inverse=True)
    src_node, tgt_node = src_node.ravel(), tgt_node.ravel() + (src_node.max() + 1)
    labels = np.arange(tgt_node.max() + 1)
    while True:
        lower = np.minimum(labels[src_node], labels[tgt_node])
        updated = labels.copy()
        np.minimum.at(updated, src_node, lower)
        np.minimum.at(updated, tgt_node, lower)
        while not np.array_equal(jumped := updated[updated], updated):
            updated = jumped
        if np.array_equal(updated, labels):
            return labels[src_node]
        labels = updated


def grouped_split(
    src: Sequence[str] | np.ndarray, tgt: Sequence[str] | np.ndarray, valid_size: int, test_size: int, seed: int
) -> dict[str, np.ndarray]:
    """Sorted row indices of train/valid/test such that pairs sharing a source or a target sentence stay together.

    `src`/`tgt` are the sentences or their `hash_texts`. Pairs are joined into connected groups; groups are
    shuffled by `seed` and each goes to test if it still fits in `test_size`, else to valid if it fits in
    `valid_size`, else to train. Singletons dominate, so test and valid end up at (or within a few pairs of)
    their sizes; large groups land in train.
    """
    src_hash = src if isinstance(src, np.ndarray) else hash_texts(src)
    tgt_hash = tgt if isinstance(tgt, np.ndarray) else hash_texts(tgt)
    _, group, sizes = np.unique(connected_groups(src_hash, tgt_hash), return_inverse=True, return_counts=True)
    target = np.zeros(len(sizes), dtype=np.int8)  # 0 train, 1 valid, 2 test
    left = {1: valid_size, 2: test_size}
    order = np.random.default_rng(seed).permutation(len(sizes))
    for start in range(0, len(order), 65_536):
        if not left[1] and not left[2]:
            break
        for g in order[start : start + 65_536].tolist():
            size = int(sizes[g])
            part = 2 if size <= left[2] else 1 if size <= left[1] else 0
            if part:
                target[g] = part
                left[part] -= size
    codes = target[group.ravel()]
    return {name: np.flatnonzero(codes == code) for code, name in enumerate(("train", "valid", "test"))}

