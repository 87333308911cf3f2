"""Mask expansion: a 32-byte seed becomes a vector of uniform elements of Z_{2^b} via AES-CTR.

The keystream of AES-128 in counter mode, keyed with the seed's first 16 bytes and started at the
counter block given by its last 16 bytes, is read as little-endian ``uint32`` (``b <= 32``) or
``uint64`` (``32 < b <= 64``) words. Because ``2^b`` divides the word size, the words reduced mod
``2^b`` are exactly uniform, and mask arithmetic can run in the native word with wrap-around and be
reduced once at the end (:func:`reduce`). AES-128 matches the 128-bit security of the X25519 key
agreement that derives the pairwise seeds; AES-NI makes it the fastest primitive in
``cryptography`` (about 4 GB/s on one core of the development machine, against 2.5 GB/s for
AES-256 and 1.6 GB/s for ChaCha20).

Each seed keys exactly one stream, so reusing the counter start across seeds is safe. Expansion
writes the keystream straight into a NumPy buffer (``update_into``) in chunks of 256 KiB, each
added to the matching slice of the accumulator at once: a few OpenSSL calls and NumPy adds per seed,
no per-element Python. The chunk buffer and the all-zero plaintext it encrypts are allocated once
per thread and shared by every :class:`MaskExpander`, so memory stays bounded whatever the vector
length and no client pays page faults on fresh buffers.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mmshield.errors import SecAggError

SEED_BYTES = 32
_BLOCK = 16
_CHUNK = 1 << 18
"""Bytes of keystream produced per OpenSSL call (256 KiB: the keystream and the slice of the
accumulator it is added to stay in a core's L2 cache, and the scratch memory stays bounded)."""
_LOCAL = threading.local()
_PARALLEL_MIN_WORDS = 1 << 22
"""Below this many keystream words in one :meth:`MaskExpander.add_many`, threads cost more than
they save."""
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def mask_threads() -> int:
    """Threads :meth:`MaskExpander.add_many` uses: ``MMSHIELD_MASK_THREADS``, else the cores
    (at most 8). OpenSSL's AES-CTR and NumPy's adds release the GIL, so they run in parallel."""
    env = os.environ.get("MMSHIELD_MASK_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise SecAggError(
                f"MMSHIELD_MASK_THREADS must be a positive integer, got {env!r}"
            ) from None
    return max(1, min(8, os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mmshield-masks")
        return _POOL


def _scratch() -> tuple[memoryview, np.ndarray]:
    """This thread's all-zero plaintext and keystream buffer of :data:`_CHUNK` bytes."""
    cached: tuple[memoryview, np.ndarray] | None = getattr(_LOCAL, "scratch", None)
    if cached is None:
        # update_into needs room for one extra block beyond the output. A memoryview slices
        # the zeros without copying them.
        cached = (memoryview(bytes(_CHUNK)), np.empty(_CHUNK + _BLOCK - 1, dtype=np.uint8))
        _LOCAL.scratch = cached
    return cached


def ring_dtype(bits: int) -> type[np.unsignedinteger]:
    """The unsigned word that holds Z_{2^bits}: ``uint32`` up to 32 bits, else ``uint64``."""
    if not 1 <= bits <= 64:
        raise SecAggError(f"ring bits must be in [1, 64], got {bits}")
    return np.uint32 if bits <= 32 else np.uint64


def reduce(values: np.ndarray, bits: int) -> np.ndarray:
    """Reduce words mod ``2^bits`` in place and return them."""
    if bits not in (32, 64):
        values &= values.dtype.type((1 << bits) - 1)
    return values


class MaskExpander:
    """Expands seeds into mask vectors of ``dim`` elements of Z_{2^bits}, reusing buffers.

    Parameters
    ----------
    dim
        Length of the masked vector.
    bits
        Ring size exponent ``b`` (masks are uniform mod ``2^b``).
    """

    def __init__(self, dim: int, bits: int) -> None:
        if dim <= 0:
            raise SecAggError(f"mask dimension must be positive, got {dim}")
        self.dim = dim
        self.bits = bits
        self.dtype = ring_dtype(bits)
        self._nbytes = dim * np.dtype(self.dtype).itemsize

    def _keystream(
        self, seed: bytes, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """``(slice, words)`` chunks of the keystream for ``seed``, in order, for the words
        ``start .. stop`` (``start`` a multiple of the words in a chunk).

        ``words`` lives in this thread's scratch buffer and is overwritten by the next chunk:
        use it before advancing the iterator.
        """
        if len(seed) != SEED_BYTES:
            raise SecAggError(f"a mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
        zeros, buf = _scratch()
        out = buf.data
        words = buf[:_CHUNK].view(self.dtype)
        per_chunk = _CHUNK // words.itemsize
        stop = self.dim if stop is None else stop
        # CTR mode can start anywhere: the counter block of word ``start`` is the seed's
        # initial counter plus the blocks before it (mod 2^128, as CTR increments it).
        counter = seed[16:]
        if start:
            skip = start * words.itemsize // _BLOCK
            counter = ((int.from_bytes(counter, "big") + skip) % (1 << 128)).to_bytes(16, "big")
        enc = Cipher(algorithms.AES(seed[:16]), modes.CTR(counter)).encryptor()
        for lo in range(start, stop, per_chunk):
            hi = min(lo + per_chunk, stop)
            if hi - lo == per_chunk:
                enc.update_into(zeros, out)
                yield slice(lo, hi), words
            else:
                enc.update_into(zeros[: (hi - lo) * words.itemsize], out)
                yield slice(lo, hi), words[: hi - lo]

    def _check(self, acc: np.ndarray, what: str) -> None:
        if acc.dtype != self.dtype or acc.shape != (self.dim,):
            raise SecAggError(
                f"mask {what} must be {np.dtype(self.dtype).name}[{self.dim}], "
                f"got {acc.dtype}{list(acc.shape)}"
            )

    def expand(self, seed: bytes) -> np.ndarray:
        """A fresh mask vector (reduced mod ``2^bits``) for ``seed``."""
        out = np.empty(self.dim, dtype=self.dtype)
        for part, words in self._keystream(seed):
            out[part] = words
        return reduce(out, self.bits)

    def add(self, acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
        """``acc += sign * PRG(seed)`` in the word's wrap-around arithmetic (not reduced)."""
        self._check(acc, "accumulator")
        op = np.add if sign >= 0 else np.subtract
        for part, words in self._keystream(seed):
            view = acc[part]
            op(view, words, out=view)

    def masked(self, x: np.ndarray, seed: bytes) -> np.ndarray:
        """A new vector ``x + PRG(seed)`` (not reduced): one pass, no copy of ``x`` first."""
        self._check(x, "input")
        out = np.empty(self.dim, dtype=self.dtype)
        for part, words in self._keystream(seed):
            np.add(x[part], words, out=out[part])
        return out

    def add_many(
        self,
        acc: np.ndarray,
        seeds: Sequence[bytes],
        signs: Sequence[int],
        threads: int | None = None,
    ) -> None:
        """``acc += sum_i signs[i] * PRG(seeds[i])``.

        With enough work the vector is split over ``threads`` (default :func:`mask_threads`):
        each thread expands every seed's keystream for its own contiguous part (CTR mode seeks
        to it) and adds it there, so no partial sums are needed and each thread's part of the
        accumulator stays in its cache across seeds; the words are the same.
        """
        if len(seeds) != len(signs):
            raise SecAggError("add_many: seeds and signs differ in length")
        self._check(acc, "accumulator")
        workers = min(len(seeds), mask_threads() if threads is None else max(1, threads))
        if workers <= 1 or self.dim * len(seeds) < _PARALLEL_MIN_WORDS:
            for seed, sign in zip(seeds, signs, strict=True):
                self.add(acc, seed, sign)
            return
        per_chunk = _CHUNK // np.dtype(self.dtype).itemsize
        chunks = -(-self.dim // per_chunk)
        bounds = [min(self.dim, per_chunk * (chunks * i // workers)) for i in range(workers + 1)]

        def expand(lo: int, hi: int) -> None:
            for seed, sign in zip(seeds, signs, strict=True):
                op = np.add if sign >= 0 else np.subtract
                for part, words in self._keystream(seed, lo, hi):
                    view = acc[part]
                    op(view, words, out=view)

        futures = [
            _pool().submit(expand, lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo
        ]
        for future in futures:
            future.result()


def expand(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """Mask vector of ``dim`` uniform elements of Z_{2^bits} from a 32-byte ``seed``."""
    return MaskExpander(dim, bits).expand(seed)
