"""64-bit hashes of many byte ranges of one buffer at once (numpy, no Python per range).

A range is read as little-endian 8-byte words (the last one masked to the range); word k is
XORed with a random key for position k, multiplied by an odd constant and xor-shifted, and
these are XORed together with a multiple of the length; callers mix the result further.
Ranges of up to DENSE_WORDS words are read as a (ranges x words) matrix, longer ones one
word after another. The keys are drawn per process: hashes only live in memory (to find
equal strings quickly), and secret keys leave someone who controls URL paths no way to aim
for a collision; a chance collision between two distinct strings has probability about
2**-64.

The buffer must be followed by at least 8 bytes of padding (span_columns provides 128): the
last word of a range may read past its end before it is masked.
"""

from __future__ import annotations

import secrets

import numpy as np

KEY_COUNT = 256  # word positions beyond (ranges over 2 KiB) reuse keys, mixed with the index
_KEYS = np.random.default_rng(secrets.randbits(128)).integers(
    0, np.iinfo(np.uint64).max, size=KEY_COUNT, dtype=np.uint64, endpoint=True
)
NULL_HASH = np.uint64(secrets.randbits(64))  # the hash of a missing (null) string

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = values.astype(np.uint64, copy=True)
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def words_of(buf: np.ndarray) -> np.ndarray:
    """An unaligned view: words_of(buf)[i] is the little-endian uint64 of buf[i:i+8]."""
    return np.ndarray(shape=(buf.size - 7,), dtype="<u8", buffer=buf, strides=(1,))


def spread(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges (start, count >= 0): (start + k, k) for k < count of each, back to back."""
    total = int(counts.sum())
    first = np.cumsum(counts) - counts  # where each range begins in the output
    k = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
    return np.repeat(starts, counts) + k, k


def xor_by_range(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """XOR of each consecutive run of `counts` values (0 for an empty run)."""
    out = np.zeros(counts.size, dtype=np.uint64)
    nonempty = np.flatnonzero(counts > 0)
    if nonempty.size:
        first = (np.cumsum(counts) - counts)[nonempty]
        out[nonempty] = np.bitwise_xor.reduceat(values, first)
    return out


def hash_ranges(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A uint64 hash of each range buf[start:start+length]; a length < 0 means null."""
    present = lengths >= 0
    sizes = np.where(present, lengths, 0)
    counts = (sizes + 7) >> 3
    widest = int(counts.max()) if counts.size else 0
    if widest <= DENSE_WORDS:
        out = _dense(buf, starts, sizes, widest)
    else:  # a few long ranges: those alone the ragged way
        out = np.empty(sizes.size, dtype=np.uint64)
        long = counts > DENSE_WORDS
        out[~long] = _dense(buf, starts[~long], sizes[~long], DENSE_WORDS)
        out[long] = _ragged(buf, starts[long], sizes[long], counts[long])
    out ^= sizes.astype(np.uint64) * _M2
    out[~present] = NULL_HASH
    return out


DENSE_WORDS = 16
_TAIL_MASKS = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [2**64 - 1], dtype=np.uint64)


def _mixed(word: np.ndarray, k: np.ndarray) -> np.ndarray:
    word ^= _KEYS[k & (KEY_COUNT - 1)]
    word *= _M1
    word ^= word >> _S31
    return word


_PAST = np.concatenate(
    (
        [np.uint64(0)],
        np.bitwise_xor.accumulate(
            _mixed(np.zeros(DENSE_WORDS, dtype=np.uint64), np.arange(DENSE_WORDS))
        ),
    )
)  # _PAST[j]: XOR of the mixed zero words at positions 0..j-1


def _dense(buf: np.ndarray, starts: np.ndarray, sizes: np.ndarray, width: int) -> np.ndarray:
    """Ranges of at most `width` words, as a (ranges x width) matrix of words."""
    if width == 0:
        return np.zeros(sizes.size, dtype=np.uint64)
    k = np.arange(width)
    words = words_of(buf)
    # Words past a range are masked to 0 below; keep their reads inside the buffer.
    word = words[np.minimum(starts[:, None] + 8 * k, words.size - 1)]
    word &= np.take(_TAIL_MASKS, np.clip(sizes[:, None] - 8 * k, 0, 8))
    # Words past a range's end are 0 after the mask, and add _PAST[k] each to the XOR:
    # take out those of positions count..width-1.
    counts = (sizes + 7) >> 3
    return np.bitwise_xor.reduce(_mixed(word, k), axis=1) ^ _PAST[width] ^ _PAST[counts]


def _ragged(
    buf: np.ndarray, starts: np.ndarray, sizes: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    first = np.cumsum(counts) - counts
    k = np.arange(int(counts.sum())) - np.repeat(first, counts)
    word = words_of(buf)[np.repeat(starts, counts) + (k << 3)]
    # The last word of a range may hold bytes past its end: keep size - 8 (count - 1).
    tail = sizes & 7
    partial = np.flatnonzero(tail)
    if partial.size:
        last = first[partial] + counts[partial] - 1
        word[last] &= _TAIL_MASKS[tail[partial]]
    if int(counts.max()) > KEY_COUNT:
        word ^= mix64(k.astype(np.uint64))
    return xor_by_range(_mixed(word, k), counts)
