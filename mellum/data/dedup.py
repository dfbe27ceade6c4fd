"""Deduplication: exact (xxHash of the content) and near-duplicate (MinHash signatures + datasketch LSH).

Near-duplicates follow the BigCode recipe (StarCoder data card: MinHash over 5-gram shingles, LSH, Jaccard
threshold 0.7–0.85). Shingles here are word-anchored byte windows: a `shingle_bytes`-long window starting at every
word start, hashed with a vectorised polynomial hash, so signatures cost numpy operations rather than a Python
call per shingle. Signatures use one-permutation hashing with densification (Shrivastava & Li, ICML 2014;
Shrivastava, ICML 2017): each shingle is hashed once and lands in one of `num_perm` bins, each bin keeps its
minimum, and empty bins borrow from the next full bin — O(shingles) instead of O(shingles × num_perm), with the
same collision probability (the Jaccard similarity) per bin. The first occurrence (in processing order) is kept;
later copies are dropped, within and across projects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_EMPTY = np.uint64(1 << 32)  # larger than any 32-bit bin value: marks a bin no shingle fell into


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.85  # Jaccard similarity at or above which two files are near-duplicates
    num_perm: int = 128
    shingle_bytes: int = 24  # about a 5-word window of code
    seed: int = 1


def exact_key(text: str) -> int:
    """64-bit content hash of a file's text."""
    import xxhash

    return xxhash.xxh3_64_intdigest(text.encode("utf-8"))


class MinHasher:
    """Signature [num_perm] uint32 of a text's shingle set (densified one-permutation MinHash)."""

    def __init__(self, config: DedupConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.a = rng.integers(1, 1 << 63, dtype=np.uint64) | np.uint64(1)  # odd multiplier of the one hash
        self.b = rng.integers(0, 1 << 63, dtype=np.uint64)
        w = config.shingle_bytes
        # Polynomial hash weights P^(w-1-k) mod 2^64 (wrapping uint64 arithmetic).
        p = np.uint64(0x100000001B3)
        powers = np.ones(w, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(w - 2, -1, -1):
                powers[k] = powers[k + 1] * p
        self.powers = powers

    def shingles(self, text: str) -> np.ndarray:
        """uint64 hashes of the byte windows that start at each word start (repeats included)."""
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        w = self.config.shingle_bytes
        if data.size < w:
            data = np.concatenate([data, np.zeros(w - data.size, np.uint8)])
        word = (data >= 48) & (data <= 57) | (data >= 65) & (data <= 90) | (data >= 97) & (data <= 122) | (data == 95)
        starts = np.flatnonzero(word & ~np.concatenate([[False], word[:-1]]))
        starts = starts[starts <= data.size - w]
        if starts.size == 0:
            starts = np.array([0])
        h = np.zeros(starts.size, dtype=np.uint64)
        d64 = data.astype(np.uint64)
        with np.errstate(over="ignore"):
            for k in range(w):
                h += d64[starts + k] * self.powers[k]
        return h

    def signature(self, text: str) -> np.ndarray:
        P = self.config.num_perm
        with np.errstate(over="ignore"):
            x = self.shingles(text) * self.a + self.b  # one universal hash, then a 64-bit finaliser mix
            x ^= x >> np.uint64(31)
            x *= np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(29)
        bins = ((x >> np.uint64(32)) % np.uint64(P)).astype(np.intp)
        sig = np.full(P, _EMPTY, dtype=np.uint64)
        np.minimum.at(sig, bins, x & _MASK32)
        return _densify(sig).astype(np.uint32)


def _densify(sig: np.ndarray) -> np.ndarray:
    """Fill empty bins from the next full bin (circularly), offset by the distance so fills differ per bin."""
    empty = sig == _EMPTY
    if not empty.any():
        return sig
    if empty.all():
        return np.full(sig.size, 0xFFFFFFFF, dtype=np.uint64)
    full = np.flatnonzero(~empty)
    idx = np.arange(sig.size)
    src = full[np.searchsorted(full, idx) % full.size]
    dist = ((src - idx) % sig.size).astype(np.uint64)
    with np.errstate(over="ignore"):
        return (sig[src] + dist * np.uint64(0x9E3779B1)) & _MASK32


def jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return float(np.mean(sig_a == sig_b))


class Deduplicator:
    """Keeps the first copy: `check(key, text_hash, signature)` → None if new, else (reason, id of the original)."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self.seen: dict[int, str] = {}
        self.lsh = None
        self.signatures: dict[str, np.ndarray] = {}
        if config.near:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)

    def check(self, key: str, text_hash: int | None, signature: np.ndarray | None) -> tuple[str, str] | None:
        if self.config.exact and text_hash is not None:
            original = self.seen.get(text_hash)
            if original is not None:
                return "exact duplicate", original
            self.seen[text_hash] = key
        if self.lsh is not None and signature is not None:
            from datasketch import MinHash

            mh = MinHash(num_perm=self.config.num_perm, hashvalues=signature, scheme="affine32", permutations=_fixed_permutations(self.config.num_perm))
            for candidate in self.lsh.query(mh):
                if jaccard(self.signatures[candidate], signature) >= self.config.threshold:
                    return "near duplicate", candidate
            self.lsh.insert(key, mh)
            self.signatures[key] = signature
        return None


_PERM_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _fixed_permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    # datasketch wants permutation parameters on every MinHash; ours are applied before, so any fixed pair does.
    if num_perm not in _PERM_CACHE:
        _PERM_CACHE[num_perm] = (np.ones(num_perm, np.uint32), np.zeros(num_perm, np.uint32))
    return _PERM_CACHE[num_perm]
