"""Bit-packed cache encodings (format version 2): Elias–Fano token ids, companded log-probs.

**Ids** (`cache.index_dtype: packed`). A position's top-k is a *set* of k ids out of
`[0, U)` (U = the largest id in the shard + 1, at most V); its order is carried by the values.
Sorted ascending, each id is split into its low `l = ⌊log2(U / k)⌋` bits, stored as they are, and
its high part `id >> l`, stored as one set bit at `(id >> l) + i` in a bit-vector of
`k + ((U − 1) >> l) + 1` bits (Elias–Fano). The width is fixed per shard, so rows slice without
an offset table, and it is within 2 bits per id of log2 C(U, k), the least any code of
arbitrary k-subsets can use: 843 bits (106 bytes) for k = 64 of V = 151936 where 24-bit ids
take 192 bytes.

**Values** (`cache.value_dtype: q6 | q7 | q8`). Every value is stored as a b-bit level of
`a = (p / p_max)^(1/3)` ∈ (0, 1] (rounded to nearest, the top entry at the highest level); p_max
itself is not stored but recovered from the stored tail mass (the entries sum to 1 − tail). KL to the
unquantised target is about ½·Σ p_i·ε_i² for log-errors ε_i; with a uniform step in `a` that sum
weighs entry i by p_i^(1/3), the minimum of the high-resolution bound for mass-weighted log
errors (a uniform step in log p weighs every entry by p_i and wastes levels on the tail; one
in p itself blows up the error of small entries). Level 0 stands for `a = 1/(4L)`: a value far
below the top keeps a finite log.

Everything here is numpy bit arithmetic on whole shards (no per-row Python loops).
"""

from __future__ import annotations

import math

import numpy as np

#: bits per value of the quantised value dtypes
VALUE_BITS: dict[str, int] = {"q4": 4, "q5": 5, "q6": 6, "q7": 7, "q8": 8}


def ef_layout(universe: int, k: int) -> tuple[int, int]:
    """(low bits per id, bits of the high-part vector) of a k-subset of [0, universe)."""
    low = max(0, math.floor(math.log2(max(universe, 1) / max(k, 1)))) if k else 0
    return low, k + ((max(universe, 1) - 1) >> low) + 1


def ef_bytes(universe: int, k: int) -> int:
    """Bytes one position's ids take."""
    low, high = ef_layout(universe, k)
    return (k * low + high + 7) // 8


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """(N, m) non-negative ints -> (N, m·width) uint8 bits, least significant first."""
    shifts = np.arange(width, dtype=np.int64)
    return ((values[..., None] >> shifts) & 1).astype(np.uint8).reshape(values.shape[0], -1)


def _ints(bits: np.ndarray, m: int, width: int) -> np.ndarray:
    """Inverse of `_bits`: (N, m·width) bits -> (N, m) int64."""
    if width == 0:
        return np.zeros((bits.shape[0], m), dtype=np.int64)
    weights = np.int64(1) << np.arange(width, dtype=np.int64)
    return (bits.reshape(bits.shape[0], m, width).astype(np.int64) * weights).sum(-1)


def encode_ids(ids: np.ndarray, universe: int) -> np.ndarray:
    """(N, k) distinct ids per row, sorted ascending, in [0, universe) -> (N, ef_bytes) uint8."""
    n, k = ids.shape
    low, high = ef_layout(universe, k)
    ids = ids.astype(np.int64)
    upper = np.zeros((n, high), dtype=np.uint8)
    np.put_along_axis(upper, (ids >> low) + np.arange(k), 1, axis=1)
    bits = np.concatenate([_bits(ids & ((1 << low) - 1), low), upper], axis=1)
    return np.packbits(bits, axis=1, bitorder="little")


def decode_ids(packed: np.ndarray, k: int, universe: int) -> np.ndarray:
    """Inverse of `encode_ids`: (N, ef_bytes) uint8 -> (N, k) int64, ascending."""
    n = packed.shape[0]
    low, high = ef_layout(universe, k)
    bits = np.unpackbits(packed, axis=1, count=k * low + high, bitorder="little")
    lows = _ints(bits[:, : k * low], k, low)
    _, cols = np.nonzero(bits[:, k * low :])  # row-major: k set bits per row, in order
    if cols.size != n * k:
        raise ValueError("corrupt id block: a position does not hold exactly k ids")
    highs = cols.reshape(n, k) - np.arange(k)
    return (highs << low) | lows


def encode_values(logprobs: np.ndarray, bits: int) -> np.ndarray:
    """(N, k) log-probabilities -> b-bit levels of (p / p_max)^(1/3), packed (N, ⌈k·b/8⌉)."""
    levels_max = (1 << bits) - 1
    lp = logprobs.astype(np.float64)
    top = lp.max(axis=1, keepdims=True) if lp.shape[1] else np.zeros((lp.shape[0], 1))
    a = np.exp((lp - top) / 3.0)
    levels = np.clip(np.rint(a * levels_max), 0, levels_max).astype(np.int64)
    return np.packbits(_bits(levels, bits), axis=1, bitorder="little")


def decode_values(packed: np.ndarray, tail_mass: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of `encode_values` up to the quantisation: (N, k) float32 log-probabilities.

    p_max is not stored: the levels give every entry relative to it, and the stored tail mass
    gives their sum (1 − tail), so the position's mass splits between top-k and tail exactly as
    stored, whatever the rounding of the levels (which would otherwise shift it)."""
    levels_max = (1 << bits) - 1
    raw = np.unpackbits(packed, axis=1, count=k * bits, bitorder="little")
    levels = _ints(raw, k, bits).astype(np.float64)
    log_rel = 3.0 * np.log(np.maximum(levels, 0.25) / levels_max)  # log(p / p_max), (N, k)
    head = np.log(np.clip(1.0 - tail_mass.astype(np.float64), 1e-30, 1.0))  # log Σ top-k
    norm = np.log(np.exp(log_rel).sum(axis=1)) if k else np.zeros(len(levels))
    return (log_rel + (head - norm)[:, None]).astype(np.float32)


def positions_to_spans(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A row's ascending positions -> (span starts, span lengths): runs of consecutive t."""
    if positions.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [positions.size]])
    return positions[starts].astype(np.int32), (ends - starts).astype(np.int32)


def spans_to_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Inverse of `positions_to_spans` -> (n,) int64."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.repeat(starts.astype(np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                      lengths)  # fmt: skip
    return first + np.arange(total)
