"""Encrypted inference: a server evaluates a classification head on CKKS-encrypted embeddings.

A client computes the embedding of its record with a model it holds locally (as in
:mod:`mmshield.privacy.embed`), encrypts it under its own CKKS key and sends the ciphertext; the
server evaluates its head on the ciphertext and returns encrypted logits, which only the client
can decrypt. The server never sees the embedding or the logits in plaintext.

Message flow (each message is ``bytes``; the transport is the caller's)::

    server (holds the head)                          client (holds the embedding and secret key)
    HeadSpec: shapes, input bound, CKKS parameters ->
                                                  <-  evaluation context: parameters, Galois keys
                                                      for the rotations the head needs, relin keys
                                                      (no secret key, no public encryption key)
                                                  <-  query: context fingerprint, ciphertexts
    reply: context fingerprint, ciphertexts       ->
                                                      the client decrypts the logits

Heads. :class:`LinearHead` (``W x + b``, e.g. the model's own head) needs one plaintext
multiplication; :class:`PolyMLPHead` (``W2 σ(W1 x̃ + b1) + b2`` with ``σ(h) = a h² + b h + c``
and ``x̃`` the input centred and scaled, trained for it by :func:`train_poly_head`) needs three.
The server folds the input normalisation into ``W1``, and ``σ`` into the layers
(``a h² + b h + c = a (h + β)² + γ`` with ``β = b / 2a``, ``γ = c - b² / 4a``), so it evaluates
exactly ``W2' (W1' x + b1')² + b2'``: multiply, square, multiply.

Packing. The ``N/2`` slots of a ciphertext are ``G`` *lanes* times ``B`` *query positions*
(slot ``lane · B + position``); ``G`` is the largest padded layer width (a power of two) and
``B = N/2 / G``, so a rotation by ``k · B`` slots rotates the lanes of every position at once. A
query's embedding, zero-padded to ``K`` (a power of two), fills the lanes periodically. Each layer
(``R × K`` padded weights, ``R`` divides ``K``) is a matrix-vector product by the hybrid diagonal
method (Halevi & Shoup 2014; Juvekar et al., GAZELLE 2018): ``z = Σ_{i<R} d_i ⊙ rot(x, i)`` with
``d_i[l] = W[l mod R, (l + i) mod K]``, then ``log2(K/R)`` rotate-and-add steps. The result holds
``y[l mod R]`` in every lane ``l``: periodic again, so it feeds the next layer, and the client
checks that the ``G/R`` copies of each logit agree. Two layouts:

* **packed** (any head): query ``t`` at position ``t``, up to ``B`` queries per ciphertext (32
  for the linear head at ``N = 4096``, 64 for the MLP at ``N = 8192``, with ``D = 64``). The sum
  over diagonals runs baby-step giant-step: ``bs ≈ sqrt(R)`` baby rotations of the input by one
  lane, giant steps by ``bs`` lanes in Horner form after rescaling each giant step's partial sum
  (one level lower, rotations cost about half). A ciphertext costs the same with 1 or ``B``
  queries: 8 rotations for a 64→10 linear head, 18 for a 64→32→10 MLP.
* **expanded** (polynomial head): query ``t`` takes positions ``t·E .. t·E + E - 1`` (``E = R``
  of the first layer), position ``t·E + i`` holding the query rotated by ``i`` lanes, which the
  client prepares in plaintext for free. The first layer is then one plaintext multiplication
  and ``log2 E`` rotations one level down, instead of ~``2 sqrt(E)`` rotations at the top level;
  the second layer's plaintexts are zero outside positions ``t·E``, which wipes the partial sums
  the other positions hold. ``B / E`` queries per ciphertext (2 for the MLP above), about half
  the latency of packed. :meth:`InferenceClient.encrypt` picks it when the queries fit in one
  ciphertext.

Only the rotations the head needs get Galois keys (4 for the linear head, 9 for the MLP with both
layouts, plus relinearisation keys for the MLP): an evaluation context of 0.56 MB (linear,
``N = 4096``) or 10.2 MB (MLP, ``N = 8192``), against 35 MB for a generic TenSEAL context with
every power-of-two rotation (ANCHORS.md). Measured on this project's 2-core AMD EPYC machine
(``python -m benchmarks._he_inference``; 64-dimensional av-digits embeddings, 10 classes): one
query end to end (encrypt, serialise, evaluate, decrypt) 11-14 ms with the linear head and 46 ms
with the 64→32→10 MLP; a batch of 64 queries 22 ms and 83 ms (0.34 and 1.3 ms per query); one
query sends 43 KB and 200 KB and receives 49 KB and 124 KB, a query in a batch of 64 about
1.4 KB / 1.5 KB and 3.1 KB / 1.9 KB. TenSEAL's high-level API needs 120-180 ms of server time per
query for the same linear head (ten ``dot`` calls; ``mm``: 0.3-0.5 s) and a 35 MB context.

Parameters (:func:`choose_parameters`). The smallest ring dimension ``N`` that is 128-bit secure
(the HomomorphicEncryption.org standard, classical, ternary secret: ``log2 q ≤ 109`` for
``N = 4096``, ``≤ 218`` for ``N = 8192``; SEAL enforces it) for the head's depth, with one
rescaling prime of ``s`` bits per multiplication, a first prime and a special (key-switching)
prime of ``s + m`` bits each, where ``2^m`` covers the head's value bound with margin: every
intermediate value for any input inside the head's input bound (interval arithmetic, so CKKS
never wraps around), and ``s`` is the largest scale (at most 40 bits) the modulus budget allows.
With 64-dimensional av-digits embeddings (magnitudes up to ~5, input bound ~10) this gives
``N = 4096``, ``[39, 30, 39]``, scale ``2^30`` (depth 1, 108 of 109 bits) for the linear head and
``N = 8192``, e.g. ``[56, 35, 35, 35, 56]``, scale ``2^35`` (depth 3, 217 of 218 bits) for the
MLP; decrypted logits are within ~1e-4 of the plaintext head's.

Threat model. The server is honest-but-curious: it holds only public evaluation keys (there is no
secret key in what it receives, and no public encryption key either: queries are encrypted with
the client's secret key, seeded, which makes them half the size), so the queries and replies are
semantically secure under RLWE. Messages carry the SHA-256 fingerprint of the evaluation context;
a query or reply under another context is refused with :class:`~mmshield.errors.EncryptionError`
naming both fingerprints. A reply computed under the wrong keys (a forged fingerprint) or
overflowing the modulus decrypts to noise: the client detects it (imaginary parts far from zero,
copies of a logit that disagree) and raises instead of returning garbage. Not covered: the client
learns the logits, from which a head can be extracted with enough queries (``D + 1`` for a linear
head); unused positions of a packed reply hold the head's logits for the all-zero embedding; the
CKKS noise of a reply is not flooded, so it may reveal a little about the head beyond the logits
(no circuit privacy); a malicious server can return wrong logits undetected (as long as they are
well-formed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import tenseal.sealapi as seal
import torch
from torch import nn

from mmshield.errors import EncryptionError

__all__ = [
    "CKKSParameters",
    "HeadSpec",
    "InferenceClient",
    "InferenceServer",
    "LinearHead",
    "PolyMLPHead",
    "choose_parameters",
    "train_poly_head",
]

_MAGIC = b"MHE1"
_SPEC, _CONTEXT, _QUERY, _REPLY = 1, 2, 3, 4
_KIND_NAMES = {_SPEC: "head spec", _CONTEXT: "evaluation context", _QUERY: "query", _REPLY: "reply"}
_U32 = struct.Struct("<I")

MODULUS_BUDGET = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest ``log2 q`` (total coefficient-modulus bits) for 128-bit classical security with a
ternary secret (HomomorphicEncryption.org standard, Albrecht et al. 2018; SEAL's ``tc128``)."""
MIN_SCALE_BITS = 26
MAX_SCALE_BITS = 40
MAX_PRIME_BITS = 60


def _pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (and ``>= 1``)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# ----------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class CKKSParameters:
    """CKKS parameters: ring dimension, coefficient-modulus prime sizes and the input scale.

    Parameters
    ----------
    poly_modulus_degree
        Ring dimension ``N``; a ciphertext has ``N / 2`` slots.
    coeff_mod_bit_sizes
        Bit sizes of the primes: the first (holds the result), one per multiplication (each
        rescaling divides by one of them) and the special prime used for key switching (last).
    scale_bits
        Inputs are encoded at scale ``2^scale_bits``.
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def depth(self) -> int:
        """Number of rescalings (multiplications) the parameters allow."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def slots(self) -> int:
        """Values per ciphertext (``N / 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def modulus_bits(self) -> int:
        """``log2 q`` including the special prime (what the security bound limits)."""
        return sum(self.coeff_mod_bit_sizes)

    def describe(self) -> str:
        """One line: ``N``, the primes, the scale and the security bound they meet."""
        budget = MODULUS_BUDGET.get(self.poly_modulus_degree)
        return (
            f"CKKS N={self.poly_modulus_degree}, coeff_mod_bit_sizes="
            f"{list(self.coeff_mod_bit_sizes)} (log2 q = {self.modulus_bits} <= {budget}: "
            f"128-bit secure), scale 2^{self.scale_bits}, depth {self.depth}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CKKSParameters:
        """Inverse of :meth:`to_dict`."""
        return cls(
            int(d["poly_modulus_degree"]),
            tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
            int(d["scale_bits"]),
        )


def choose_parameters(depth: int, value_bound: float, lanes: int = 1) -> CKKSParameters:
    """Smallest 128-bit-secure CKKS parameters for ``depth`` multiplications.

    Parameters
    ----------
    depth
        Multiplications on the longest path (1 for a linear head, 3 for the polynomial MLP).
    value_bound
        Largest magnitude of any value the computation produces; the first prime gets
        ``ceil(log2 value_bound) + 2`` bits above the scale (sign and a factor-2 margin).
    lanes
        Lanes a query needs; ``N / 2`` must be a multiple of it.

    Returns
    -------
    CKKSParameters
        The smallest ``N`` whose modulus budget leaves a scale of at least
        :data:`MIN_SCALE_BITS` bits; the scale is the largest the budget allows, at most
        :data:`MAX_SCALE_BITS`.

    Raises
    ------
    EncryptionError
        If no ring dimension up to 32768 fits (the values are too large or the depth too high).
    """
    if depth < 1:
        raise EncryptionError(f"CKKS parameters need a depth of at least 1 (got {depth})")
    if not math.isfinite(value_bound) or value_bound <= 0:
        raise EncryptionError(f"value bound must be finite and positive (got {value_bound})")
    margin = max(1, math.ceil(math.log2(max(value_bound, 1.0)))) + 2
    for n, budget in MODULUS_BUDGET.items():
        if n // 2 < lanes:
            continue
        scale = min(MAX_SCALE_BITS, (budget - 2 * margin) // (depth + 2))
        first = scale + margin
        if scale < MIN_SCALE_BITS or first > MAX_PRIME_BITS:
            continue
        return CKKSParameters(n, (first, *([scale] * depth), first), scale)
    raise EncryptionError(
        f"no 128-bit-secure CKKS parameters up to N=32768 fit depth {depth} with values up to "
        f"{value_bound:.3g}: lower the head's input bound or its weights (weight decay), or "
        "use a shallower head"
    )


# ---------------------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class HeadSpec:
    """The public description of a head that a client needs to build its keys.

    Parameters
    ----------
    kind
        ``"linear"`` or ``"poly-mlp"``.
    in_dim
        Embedding dimension ``D``.
    hidden
        Hidden units ``H`` of the polynomial MLP (0 for a linear head).
    classes
        Number of logits ``C``.
    input_bound
        Every embedding value must lie in ``[-input_bound, input_bound]``.
    params
        CKKS parameters the head is evaluated with.
    """

    kind: Literal["linear", "poly-mlp"]
    in_dim: int
    hidden: int
    classes: int
    input_bound: float
    params: CKKSParameters

    def to_bytes(self) -> bytes:
        """Serialise (JSON inside the framing shared by every message)."""
        body = {
            "kind": self.kind,
            "in_dim": self.in_dim,
            "hidden": self.hidden,
            "classes": self.classes,
            "input_bound": self.input_bound,
            "params": self.params.to_dict(),
        }
        return _pack(_SPEC, [json.dumps(body, sort_keys=True).encode()])

    @classmethod
    def from_bytes(cls, data: bytes) -> HeadSpec:
        """Inverse of :meth:`to_bytes`.

        Raises
        ------
        EncryptionError
            If ``data`` is not a head spec.
        """
        parts = _unpack(data, _SPEC, 1)
        try:
            if len(parts) != 1:
                raise ValueError(f"{len(parts)} parts")
            body = parts[0]
            d = json.loads(body)
            spec = cls(
                kind=d["kind"],
                in_dim=int(d["in_dim"]),
                hidden=int(d["hidden"]),
                classes=int(d["classes"]),
                input_bound=float(d["input_bound"]),
                params=CKKSParameters.from_dict(d["params"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise EncryptionError(f"head spec is malformed ({exc}); resend it") from exc
        if spec.kind not in ("linear", "poly-mlp"):
            raise EncryptionError(f"head spec has unknown kind {spec.kind!r}")
        return spec

    @property
    def depth(self) -> int:
        """Multiplications the head needs."""
        return 1 if self.kind == "linear" else 3


def _as_matrix(a: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.array(a, dtype=np.float64)
    if arr.shape != shape:
        raise EncryptionError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.isfinite(arr).all():
        raise EncryptionError(f"{name} has non-finite values")
    return arr


def _input_bound(calibration: np.ndarray, in_dim: int, margin: float) -> float:
    x = np.asarray(calibration, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != in_dim or len(x) == 0 or not np.isfinite(x).all():
        raise EncryptionError(
            f"calibration embeddings must be a finite (N, {in_dim}) array, got shape {x.shape}"
        )
    if margin < 1:
        raise EncryptionError(f"input-bound margin must be >= 1 (got {margin})")
    return float(max(np.abs(x).max(), 1e-6) * margin)


def _interval_bound(layers: Sequence[tuple[np.ndarray, np.ndarray]], bound: float) -> float:
    """Largest magnitude of any partial sum, square or output for inputs in ``[-bound, bound]``."""
    worst = bound
    for i, (w, b) in enumerate(layers):
        if i > 0:
            bound = bound * bound
            worst = max(worst, bound)
        bound = float((np.abs(w).sum(1) * bound + np.abs(b)).max())
        worst = max(worst, bound)
    return worst


@dataclass(frozen=True, eq=False)
class LinearHead:
    """A linear head ``logits = W x + b`` (one plaintext multiplication under encryption).

    Parameters
    ----------
    weight
        ``(C, D)`` weights.
    bias
        ``(C,)`` bias.
    input_bound
        Largest embedding magnitude a client may send (see :meth:`from_module`).
    """

    weight: np.ndarray
    bias: np.ndarray
    input_bound: float
    kind: ClassVar[Literal["linear"]] = "linear"

    def __post_init__(self) -> None:
        w = np.array(self.weight, dtype=np.float64)
        if w.ndim != 2:
            raise EncryptionError(f"linear head weight must be 2-D (C, D), got shape {w.shape}")
        object.__setattr__(self, "weight", _as_matrix(w, w.shape, "linear head weight"))
        object.__setattr__(self, "bias", _as_matrix(self.bias, (w.shape[0],), "linear head bias"))
        if not self.input_bound > 0:
            raise EncryptionError(f"input bound must be positive (got {self.input_bound})")

    @classmethod
    def from_module(
        cls, module: nn.Linear, calibration: np.ndarray, margin: float = 2.0
    ) -> LinearHead:
        """The head of a trained model (``model.head``), calibrated on embeddings.

        Parameters
        ----------
        module
            An ``nn.Linear``.
        calibration
            ``(N, D)`` embeddings of the kind the head will see (e.g. the training records');
            the input bound is ``margin`` times their largest magnitude.
        margin
            Factor on the calibration range.
        """
        if not isinstance(module, nn.Linear):
            raise EncryptionError(
                f"encrypted inference evaluates an nn.Linear head, got {type(module).__name__}; "
                "train a polynomial head on the embeddings instead (train_poly_head)"
            )
        w = module.weight.detach().cpu().double().numpy()
        b = (
            module.bias.detach().cpu().double().numpy()
            if module.bias is not None
            else np.zeros(w.shape[0])
        )
        return cls(w, b, _input_bound(calibration, w.shape[1], margin))

    @property
    def in_dim(self) -> int:
        """Embedding dimension ``D``."""
        return int(self.weight.shape[1])

    @property
    def classes(self) -> int:
        """Number of logits ``C``."""
        return int(self.weight.shape[0])

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Plaintext logits ``(N, C)`` (float64)."""
        x = np.asarray(embeddings, dtype=np.float64)
        return np.asarray(x @ self.weight.T + self.bias)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Plaintext class predictions ``(N,)``."""
        return self.logits(embeddings).argmax(axis=1)

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """What the server evaluates: ``[(W, b)]``."""
        return [(self.weight, self.bias)]

    def spec(self) -> HeadSpec:
        """The public spec, with CKKS parameters chosen for this head's values."""
        return _spec_for(self, "linear", 0)


@dataclass(frozen=True, eq=False)
class PolyMLPHead:
    """``logits = W2 σ(W1 (x - shift) / scale + b1) + b2``, ``σ(h) = a h² + b h + c``.

    Polynomial activations are what CKKS evaluates exactly; train one with
    :func:`train_poly_head`.

    Parameters
    ----------
    w1, b1
        ``(H, D)`` and ``(H,)``: the hidden layer, on normalised inputs.
    coeffs
        ``(a, b, c)`` of the activation; ``a`` must not be 0.
    w2, b2
        ``(C, H)`` and ``(C,)``: the output layer.
    shift, scale
        Input normalisation: ``(D,)`` shift and a positive scalar scale.
    input_bound
        Largest raw embedding magnitude a client may send.
    """

    w1: np.ndarray
    b1: np.ndarray
    coeffs: tuple[float, float, float]
    w2: np.ndarray
    b2: np.ndarray
    shift: np.ndarray
    scale: float
    input_bound: float
    kind: ClassVar[Literal["poly-mlp"]] = "poly-mlp"

    def __post_init__(self) -> None:
        w1 = np.array(self.w1, dtype=np.float64)
        w2 = np.array(self.w2, dtype=np.float64)
        if w1.ndim != 2 or w2.ndim != 2 or w2.shape[1] != w1.shape[0]:
            raise EncryptionError(
                f"polynomial head layers do not chain: w1 {w1.shape}, w2 {w2.shape}"
            )
        h, d = w1.shape
        object.__setattr__(self, "w1", _as_matrix(w1, (h, d), "w1"))
        object.__setattr__(self, "b1", _as_matrix(self.b1, (h,), "b1"))
        object.__setattr__(self, "w2", _as_matrix(w2, w2.shape, "w2"))
        object.__setattr__(self, "b2", _as_matrix(self.b2, (w2.shape[0],), "b2"))
        object.__setattr__(self, "shift", _as_matrix(self.shift, (d,), "shift"))
        a, b, c = (float(v) for v in self.coeffs)
        object.__setattr__(self, "coeffs", (a, b, c))
        if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)) or abs(a) < 1e-6:
            raise EncryptionError(
                f"activation coefficients (a, b, c) = {self.coeffs} must be finite with a != 0"
            )
        if not self.scale > 0 or not self.input_bound > 0:
            raise EncryptionError("input scale and input bound must be positive")

    @property
    def in_dim(self) -> int:
        """Embedding dimension ``D``."""
        return int(self.w1.shape[1])

    @property
    def hidden(self) -> int:
        """Hidden units ``H``."""
        return int(self.w1.shape[0])

    @property
    def classes(self) -> int:
        """Number of logits ``C``."""
        return int(self.w2.shape[0])

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Plaintext logits ``(N, C)`` (float64, the trained form, not the folded one)."""
        x = (np.asarray(embeddings, dtype=np.float64) - self.shift) / self.scale
        h = x @ self.w1.T + self.b1
        a, b, c = self.coeffs
        return np.asarray((a * h * h + b * h + c) @ self.w2.T + self.b2)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Plaintext class predictions ``(N,)``."""
        return self.logits(embeddings).argmax(axis=1)

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The folded layers the server evaluates: ``[(W1', b1'), (W2', b2')]``, square between.

        ``W2' (W1' x + b1')² + b2'`` equals :meth:`logits` exactly (up to rounding).
        """
        a, b, c = self.coeffs
        beta = b / (2 * a)
        gamma = c - b * b / (4 * a)
        w1 = self.w1 / self.scale
        b1 = self.b1 - w1 @ self.shift + beta
        w2 = a * self.w2
        b2 = self.b2 + gamma * self.w2.sum(axis=1)
        return [(w1, b1), (w2, b2)]

    def spec(self) -> HeadSpec:
        """The public spec, with CKKS parameters chosen for this head's values."""
        return _spec_for(self, "poly-mlp", self.hidden)


Head = LinearHead | PolyMLPHead


def _spec_for(head: Head, kind: Literal["linear", "poly-mlp"], hidden: int) -> HeadSpec:
    layers = head.layers()
    plan_dims = _layer_dims(kind, head.in_dim, hidden, head.classes)
    lanes = max(k for _, k in plan_dims)
    depth = 1 if kind == "linear" else 3
    params = choose_parameters(depth, _interval_bound(layers, head.input_bound), lanes)
    return HeadSpec(kind, head.in_dim, hidden, head.classes, float(head.input_bound), params)


def train_poly_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    hidden: int = 32,
    classes: int | None = None,
    epochs: int = 40,
    batch_size: int = 128,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    margin: float = 2.0,
    seed: int = 0,
) -> PolyMLPHead:
    """Train a polynomial-activation MLP head on plaintext embeddings (the data owner's side).

    The inputs are centred (per dimension) and scaled (one global standard deviation), which keeps
    the pre-activations small enough for the square to stay in CKKS's comfortable range; the
    activation ``a h² + b h + c`` has learnable ``(a, b, c)`` with ``a = 0.01 + softplus(ρ) > 0``
    (negating ``a``, ``b``, ``c`` and ``W2`` gives the same model, so ``a > 0`` loses nothing and
    keeps the fold of the module docstring well-conditioned). Adam with weight decay,
    cross-entropy, minibatches; one torch thread (restored afterwards).

    Parameters
    ----------
    embeddings
        ``(N, D)`` training embeddings (e.g. :func:`mmshield.privacy.embed.embed_records` of the
        training split).
    labels
        ``(N,)`` integer labels.
    hidden
        Hidden units ``H`` (a power of two wastes no lanes).
    classes
        Number of classes (default: ``labels.max() + 1``).
    epochs, batch_size, lr, weight_decay
        Optimiser settings.
    margin
        The input bound is ``margin`` times the largest training magnitude.
    seed
        Seeds initialisation and shuffling.

    Returns
    -------
    PolyMLPHead
    """
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or len(x) == 0 or y.shape != (len(x),):
        raise EncryptionError(
            f"train_poly_head needs (N, D) embeddings and (N,) labels, got {x.shape} and {y.shape}"
        )
    if hidden < 1 or epochs < 0 or batch_size < 1:
        raise EncryptionError(
            f"train_poly_head needs hidden >= 1, epochs >= 0 and batch_size >= 1 (got {hidden}, "
            f"{epochs}, {batch_size})"
        )
    n_classes = int(y.max()) + 1 if classes is None else int(classes)
    if y.min() < 0 or y.max() >= n_classes:
        raise EncryptionError(f"labels must lie in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    bound = _input_bound(x, x.shape[1], margin)
    threads = torch.get_num_threads()
    # A model this small trains fastest on one thread; with several, a busy machine can make
    # it 20x slower (measured on 2 shared cores).
    torch.set_num_threads(1)
    try:
        return _train_poly(
            x, y, n_classes, hidden, epochs, batch_size, lr, weight_decay, seed, bound
        )
    finally:
        torch.set_num_threads(threads)


def _train_poly(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    hidden: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    bound: float,
) -> PolyMLPHead:
    shift = x.mean(axis=0)
    scale = float(max((x - shift).std(), 1e-6))
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        l1 = nn.Linear(x.shape[1], hidden)
        l2 = nn.Linear(hidden, n_classes)
    finally:
        torch.random.set_rng_state(state)
    # (a, b, c) = (0.01 + softplus(rho), b, c), initialised to about (0.1, 0.5, 0).
    rho = nn.Parameter(torch.tensor(math.log(math.expm1(0.09))))
    lin = nn.Parameter(torch.tensor([0.5, 0.0]))
    params = [*l1.parameters(), *l2.parameters(), rho, lin]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    xt = torch.tensor((x - shift) / scale, dtype=torch.float32)
    yt = torch.from_numpy(y)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        h = l1(inp)
        a = 0.01 + nn.functional.softplus(rho)
        return l2(a * h * h + lin[0] * h + lin[1])

    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(forward(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        a = float(0.01 + nn.functional.softplus(rho))
        coeffs = (a, float(lin[0]), float(lin[1]))
        return PolyMLPHead(
            w1=l1.weight.double().numpy(),
            b1=l1.bias.double().numpy(),
            coeffs=coeffs,
            w2=l2.weight.double().numpy(),
            b2=l2.bias.double().numpy(),
            shift=shift,
            scale=scale,
            input_bound=bound,
        )


# ---------------------------------------------------------------------------------------- layout


def _layer_dims(kind: str, in_dim: int, hidden: int, classes: int) -> list[tuple[int, int]]:
    """Padded ``(rows R, cols K)`` per layer; ``R`` divides ``K`` and ``K`` covers the input."""
    k = _pow2(in_dim)
    if kind == "linear":
        r = _pow2(classes)
        return [(r, max(k, r))]
    r1, r2 = _pow2(hidden), _pow2(classes)
    return [(r1, max(k, r1)), (r2, max(r1, r2))]


@dataclass(frozen=True)
class _Layer:
    rows: int
    cols: int
    baby: int  # baby steps (rotations of the input by 0 .. baby - 1 lanes)
    giants: int  # rows // baby

    @property
    def fold_steps(self) -> list[int]:
        """Lane rotations of the rotate-and-add steps after the diagonal sum."""
        steps, s = [], self.rows
        while s < self.cols:
            steps.append(s)
            s *= 2
        return steps


PACKED, EXPANDED = 0, 1
_LAYOUTS = {"packed": PACKED, "expanded": EXPANDED}


@dataclass(frozen=True)
class _Plan:
    """Slot layout and rotation schedule both parties derive from the spec.

    Slot ``lane · stride + position``. *Packed*: query ``t`` sits at position ``t`` (up to
    ``stride`` queries per ciphertext). *Expanded* (polynomial head only): query ``t`` takes
    positions ``t·E .. t·E + E - 1`` (``E`` = padded rows of the first layer), position
    ``t·E + i`` holding the query rotated by ``i`` lanes, so the first layer needs one plaintext
    multiplication and ``log2 E`` rotations instead of ``~2 sqrt(E)`` rotations at the top
    level; the second layer's plaintexts are zero outside positions ``t·E``, which wipes the
    partial sums the other positions hold.
    """

    spec: HeadSpec
    layers: tuple[_Layer, ...]
    lanes: int
    stride: int  # query positions per ciphertext (B)
    in_period: int  # the padded input width the query repeats with
    expand: int  # E: positions per query in the expanded layout (0: not available)

    @classmethod
    def of(cls, spec: HeadSpec) -> _Plan:
        dims = _layer_dims(spec.kind, spec.in_dim, spec.hidden, spec.classes)
        layers = []
        for r, k in dims:
            baby = 1 << (int(math.log2(r)) // 2)  # ~sqrt(R), the smaller power of two
            layers.append(_Layer(r, k, baby, r // baby))
        lanes = max(k for _, k in dims)
        slots = spec.params.slots
        if lanes > slots or slots % lanes:
            raise EncryptionError(
                f"a query needs {lanes} lanes but N={spec.params.poly_modulus_degree} gives "
                f"{slots} slots; use a larger ring dimension"
            )
        stride = slots // lanes
        # A later plaintext multiplication must mask the expanded layout's partial sums.
        expand = layers[0].rows if len(layers) > 1 and layers[0].rows <= stride else 0
        return cls(spec, tuple(layers), lanes, stride, _pow2(spec.in_dim), expand)

    def per_ciphertext(self, layout: int) -> int:
        """Queries one ciphertext carries in ``layout``."""
        return self.stride if layout == PACKED else self.stride // self.expand

    def positions(self, layout: int, count: int) -> np.ndarray:
        """Query positions of the first ``count`` queries of a ciphertext."""
        return np.arange(count) * (1 if layout == PACKED else self.expand)

    def rotation_steps(self) -> list[int]:
        """Slot rotations the server performs (one Galois key each)."""
        lane_steps: set[int] = set()
        for layer in self.layers:
            if layer.baby > 1:
                lane_steps.add(1)
            if layer.giants > 1:
                lane_steps.add(layer.baby)
            lane_steps.update(layer.fold_steps)
        steps = {s * self.stride for s in lane_steps}
        s = 1
        while s < self.expand:  # the expanded layout's sum over positions
            steps.add(s)
            s *= 2
        return sorted(steps)

    def galois_elements(self) -> list[int]:
        """SEAL Galois elements of :meth:`rotation_steps` (left rotation by ``k``: ``3^k``)."""
        m = 2 * self.spec.params.poly_modulus_degree
        return [pow(3, k, m) for k in self.rotation_steps()]

    def pack(self, queries: np.ndarray, layout: int) -> np.ndarray:
        """Slot values ``(N/2,)`` holding up to :meth:`per_ciphertext` queries ``(q, D)``."""
        q, d = queries.shape
        x = np.zeros((q, self.in_period))
        x[:, :d] = queries
        lane = np.arange(self.lanes)
        grid = np.zeros((self.lanes, self.stride))
        if layout == PACKED:
            grid[:, :q] = x[:, lane % self.in_period].T  # periodic over the lanes
        else:
            e = self.expand
            shifted = (lane[:, None] + np.arange(e)[None, :]) % self.in_period  # (G, E)
            for t in range(q):
                grid[:, t * e : (t + 1) * e] = x[t][shifted]  # rot(x, i) at position t·E + i
        return grid.ravel()

    def _padded(self, w: np.ndarray, layer: _Layer) -> np.ndarray:
        padded = np.zeros((layer.rows, layer.cols))
        padded[: w.shape[0], : w.shape[1]] = w
        return padded

    def _mask(self, lanes_vector: np.ndarray, layout: int) -> np.ndarray:
        """Broadcast a per-lane vector over positions; zero outside query positions when
        expanded."""
        grid = np.repeat(lanes_vector[:, None], self.stride, axis=1)
        if layout == EXPANDED:
            keep = np.zeros(self.stride, dtype=bool)
            keep[:: self.expand] = True
            grid[:, ~keep] = 0.0
        return grid.ravel()

    def diagonals(self, w: np.ndarray, layer: _Layer, layout: int) -> list[list[np.ndarray | None]]:
        """Pre-rotated diagonals ``[giant][baby]`` as slot vectors (``None`` when all zero)."""
        r, k = layer.rows, layer.cols
        padded = self._padded(w, layer)
        lane = np.arange(self.lanes)
        out: list[list[np.ndarray | None]] = []
        for j in range(layer.giants):
            row: list[np.ndarray | None] = []
            for i in range(layer.baby):
                idx = j * layer.baby + i
                diag = padded[lane % r, (lane + idx) % k]  # d_idx[l] = W[l mod R, (l+idx) mod K]
                diag = np.roll(diag, j * layer.baby)  # rot(d, -j·bs): Horner rotates it back
                row.append(self._mask(diag, layout) if diag.any() else None)
            out.append(row)
        return out

    def expanded_diagonals(self, w: np.ndarray, layer: _Layer) -> np.ndarray:
        """First layer, expanded layout: ``d_i`` at position ``t·E + i`` of every query ``t``."""
        r, k = layer.rows, layer.cols
        padded = self._padded(w, layer)
        lane = np.arange(self.lanes)[:, None]
        diags = padded[lane % r, (lane + np.arange(r)[None, :]) % k]  # (G, E): column i is d_i
        return np.tile(diags, (1, self.stride // r)).ravel()

    def bias(self, b: np.ndarray, rows: int, layout: int) -> np.ndarray:
        """Bias as a slot vector: ``b[l mod R]`` in lane ``l`` at every query position."""
        padded = np.zeros(rows)
        padded[: len(b)] = b
        return self._mask(padded[np.arange(self.lanes) % rows], layout)

    def unpack(self, slots: np.ndarray, count: int, layout: int) -> tuple[np.ndarray, float, float]:
        """Logits ``(count, C)`` from decoded slots, with the largest imaginary part and the
        largest disagreement between the copies of a logit (both ~0 for a sound reply)."""
        rows = self.layers[-1].rows
        grid = slots.reshape(self.lanes, self.stride)[:, self.positions(layout, count)]
        copies = grid.reshape(self.lanes // rows, rows, count)  # lane = m·R + c
        real = copies.real
        spread = float(np.abs(real - real[:1]).max())
        imag = float(np.abs(copies.imag).max())
        logits = real.mean(axis=0)[: self.spec.classes].T
        return np.ascontiguousarray(logits), imag, spread


# ------------------------------------------------------------------------------ SEAL plumbing


class _Blobs:
    """SEAL objects to and from bytes: TenSEAL's SEAL bindings only save to and load from paths,
    so each object goes through a file in a private temporary directory (in memory under
    ``/dev/shm`` where available). Only public material is ever written: ciphertexts and
    evaluation keys, never the secret key."""

    def __init__(self) -> None:
        shm = "/dev/shm"
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        self._dir = tempfile.mkdtemp(prefix="mmshield-he-", dir=base)
        self._path = os.path.join(self._dir, "blob")
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)

    def dump(self, obj: Any) -> bytes:
        with self._lock:
            obj.save(self._path)
            try:
                with open(self._path, "rb") as fh:
                    return fh.read()
            finally:
                os.remove(self._path)

    def load(self, obj: Any, context: seal.SEALContext, data: bytes, what: str) -> None:
        with self._lock:
            with open(self._path, "wb") as fh:
                fh.write(data)
            try:
                obj.load(context, self._path)
            except Exception as exc:  # SEAL raises many types for corrupt input
                raise EncryptionError(
                    f"{what} could not be loaded ({exc}): it is corrupt or was made with other "
                    "CKKS parameters"
                ) from exc
            finally:
                os.remove(self._path)


def _seal_context(params: CKKSParameters) -> seal.SEALContext:
    n = params.poly_modulus_degree
    if n not in MODULUS_BUDGET or params.modulus_bits > MODULUS_BUDGET[n]:
        raise EncryptionError(f"{params.describe()} is not 128-bit secure; use choose_parameters")
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    try:
        parms.set_coeff_modulus(seal.CoeffModulus.Create(n, list(params.coeff_mod_bit_sizes)))
    except (RuntimeError, ValueError) as exc:
        raise EncryptionError(f"SEAL refused {params.describe()}: {exc}") from exc
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise EncryptionError(
            f"SEAL refused {params.describe()}: {context.parameters_error_message()}"
        )
    return context


def _pack(kind: int, parts: Sequence[bytes]) -> bytes:
    out = [_MAGIC, bytes([kind]), _U32.pack(len(parts))]
    for p in parts:
        out.append(_U32.pack(len(p)))
        out.append(p)
    return b"".join(out)


def _unpack(data: bytes, kind: int, min_parts: int) -> list[bytes]:
    want = _KIND_NAMES[kind]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncryptionError(f"expected an encrypted-inference {want} as bytes, got {type(data)}")
    view = memoryview(data)
    if len(view) < 9 or bytes(view[:4]) != _MAGIC:
        raise EncryptionError(f"not an encrypted-inference {want} (bad header)")
    if view[4] != kind:
        got = _KIND_NAMES.get(view[4], f"unknown type {view[4]}")
        raise EncryptionError(f"expected an encrypted-inference {want} but got a {got}")
    (count,) = _U32.unpack_from(view, 5)
    pos, parts = 9, []
    for _ in range(count):
        if pos + 4 > len(view):
            raise EncryptionError(f"encrypted-inference {want} is truncated")
        (size,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + size > len(view):
            raise EncryptionError(f"encrypted-inference {want} is truncated")
        parts.append(bytes(view[pos : pos + size]))
        pos += size
    if pos != len(view) or len(parts) < min_parts:
        raise EncryptionError(f"encrypted-inference {want} is malformed")
    return parts


def _short(fingerprint: bytes) -> str:
    return fingerprint.hex()[:16]


_HEADER = struct.Struct("<IB")  # query count, layout


def _read_batch(
    data: bytes, kind: int, fingerprint: bytes, plan: _Plan
) -> tuple[int, int, list[bytes]]:
    """Check a query's or reply's fingerprint and sizes; return ``(count, layout, blobs)``."""
    parts = _unpack(data, kind, 2)
    theirs, header, blobs = parts[0], parts[1], parts[2:]
    want = _KIND_NAMES[kind]
    if theirs != fingerprint:
        raise EncryptionError(
            f"this {want} was made under evaluation context {_short(theirs)}, but this "
            f"{'server' if kind == _QUERY else 'client'} holds context {_short(fingerprint)}: "
            "it comes from another client's keys or another session. Send it to the server "
            "built from its own client's public_context(), or re-encrypt it"
        )
    if len(header) != _HEADER.size:
        raise EncryptionError(f"encrypted-inference {want} is malformed (header)")
    count, layout = _HEADER.unpack(header)
    if layout not in (PACKED, EXPANDED) or (layout == EXPANDED and not plan.expand):
        raise EncryptionError(f"encrypted-inference {want} names unknown layout {layout}")
    per = plan.per_ciphertext(layout)
    if count == 0 or len(blobs) != -(-count // per):
        raise EncryptionError(
            f"encrypted-inference {want} under context {_short(fingerprint)} says {count} "
            f"queries in {len(blobs)} ciphertexts; expected {-(-count // per)} ({per} per "
            "ciphertext)"
        )
    return count, layout, blobs


def _check_ciphertext(
    ct: seal.Ciphertext, parms_id: Sequence[int], scale: float | None, what: str
) -> None:
    if ct.size() != 2 or list(ct.parms_id()) != list(parms_id) or not ct.is_ntt_form():
        raise EncryptionError(
            f"{what} is not a fresh 2-component ciphertext at the expected level "
            f"(size {ct.size()}); it was not produced by this protocol"
        )
    if scale is not None and not math.isclose(ct.scale, scale, rel_tol=1e-9):
        raise EncryptionError(
            f"{what} is encoded at scale 2^{math.log2(ct.scale):.2f}, expected 2^"
            f"{math.log2(scale):.2f}; it was not encrypted by InferenceClient"
        )


# --------------------------------------------------------------------------------------- client


class InferenceClient:
    """The client of encrypted inference: holds the secret key; encrypts queries, decrypts logits.

    Parameters
    ----------
    spec
        The server's :class:`HeadSpec` (or its bytes).

    Examples
    --------
    >>> client = InferenceClient(head.spec())
    >>> server = InferenceServer(client.public_context(), head)
    >>> logits = client.decrypt(server.evaluate(client.encrypt(embeddings)))
    """

    def __init__(self, spec: HeadSpec | bytes) -> None:
        self.spec = spec if isinstance(spec, HeadSpec) else HeadSpec.from_bytes(spec)
        self._plan = _Plan.of(self.spec)
        self._blobs = _Blobs()
        self._context = _seal_context(self.spec.params)
        keygen = seal.KeyGenerator(self._context)
        secret = keygen.secret_key()
        self._encoder = seal.CKKSEncoder(self._context)
        self._encryptor = seal.Encryptor(self._context, secret)
        self._decryptor = seal.Decryptor(self._context, secret)
        # Seeded (half-size) serialisable keys: only the evaluation keys leave the client.
        galois = self._blobs.dump(keygen.create_galois_keys(self._plan.galois_elements()))
        relin = self._blobs.dump(keygen.create_relin_keys()) if self.spec.depth > 1 else b""
        self._public = _pack(_CONTEXT, [self.spec.to_bytes(), galois, relin])
        self.fingerprint = hashlib.sha256(self._public).digest()
        self._scale = 2.0**self.spec.params.scale_bits

    def queries_per_ciphertext(self, layout: Literal["packed", "expanded"] = "packed") -> int:
        """How many queries one ciphertext carries in ``layout``."""
        return self._plan.per_ciphertext(self._layout(layout))

    def public_context(self) -> bytes:
        """The evaluation context for the server: parameters, Galois and relinearisation keys.

        It holds no secret key and no public encryption key.
        """
        return self._public

    def _layout(self, layout: str) -> int:
        if layout not in _LAYOUTS:
            raise EncryptionError(f"unknown layout {layout!r}; use 'auto', 'packed' or 'expanded'")
        if layout == "expanded" and not self._plan.expand:
            raise EncryptionError(
                "the expanded layout needs a polynomial head with at least one more layer after "
                f"the first and N/2 >= lanes · first-layer rows; this is a {self.spec.kind} head"
            )
        return _LAYOUTS[layout]

    def encrypt(
        self, embeddings: np.ndarray, layout: Literal["auto", "packed", "expanded"] = "auto"
    ) -> bytes:
        """Encrypt one ``(D,)`` or several ``(Q, D)`` embeddings into a query.

        Parameters
        ----------
        embeddings
            The embeddings, each value within the head's input bound.
        layout
            ``"packed"``: up to :meth:`queries_per_ciphertext` queries per ciphertext (the
            fastest per query for large batches). ``"expanded"`` (polynomial head): fewer queries
            per ciphertext, but the server's first layer is several times faster (the lowest
            latency for one or a few queries). ``"auto"``: expanded when the queries fit in one
            ciphertext, else packed.

        Raises
        ------
        EncryptionError
            If the shape is not ``(D,)``/``(Q, D)``, a value is not finite, or a value lies
            outside the head's input bound (CKKS would overflow).
        """
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        d, bound = self.spec.in_dim, self.spec.input_bound
        if x.ndim != 2 or x.shape[1] != d or len(x) == 0:
            raise EncryptionError(
                f"query embeddings have shape {np.shape(embeddings)}; this head takes ({d},) or "
                f"(Q, {d}): the embedding dimension of the model it was trained on"
            )
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise EncryptionError(f"query {bad} has non-finite values (NaN or inf)")
        peak = np.abs(x).max(axis=1)
        if (peak > bound).any():
            bad = int(np.flatnonzero(peak > bound)[0])
            raise EncryptionError(
                f"query {bad} has a value of magnitude {peak[bad]:.4g}, beyond the head's input "
                f"bound {bound:.4g}; CKKS would overflow. It is far outside the embeddings the "
                "head was calibrated on: check the model, or recalibrate the head with a larger "
                "margin"
            )
        if layout == "auto":
            small = self._plan.expand and len(x) <= self._plan.per_ciphertext(EXPANDED)
            mode = EXPANDED if small else PACKED
        else:
            mode = self._layout(layout)
        per = self._plan.per_ciphertext(mode)
        blobs = []
        plain = seal.Plaintext()
        for start in range(0, len(x), per):
            slots = self._plan.pack(x[start : start + per], mode)
            self._encoder.encode(slots.tolist(), self._context.first_parms_id(), self._scale, plain)
            blobs.append(self._blobs.dump(self._encryptor.encrypt_symmetric(plain)))
        return _pack(_QUERY, [self.fingerprint, _HEADER.pack(len(x), mode), *blobs])

    def decrypt(self, reply: bytes) -> np.ndarray:
        """Decrypt a reply into logits ``(Q, C)`` (float64).

        Raises
        ------
        EncryptionError
            If the reply is under another context, or decrypts to noise (it was computed with
            keys other than this client's, or its values overflowed).
        """
        count, layout, blobs = _read_batch(reply, _REPLY, self.fingerprint, self._plan)
        per = self._plan.per_ciphertext(layout)
        last = self._context.last_parms_id()
        out = []
        plain = seal.Plaintext()
        tolerance = self.tolerance
        for i, blob in enumerate(blobs):
            ct = seal.Ciphertext()
            what = f"reply ciphertext {i} (context {_short(self.fingerprint)})"
            self._blobs.load(ct, self._context, blob, what)
            _check_ciphertext(ct, last, None, what)
            self._decryptor.decrypt(ct, plain)
            slots = np.asarray(self._encoder.decode_complex(plain))
            logits, imag, spread = self._plan.unpack(slots, min(per, count - i * per), layout)
            if not (imag <= tolerance and spread <= tolerance) or not np.isfinite(logits).all():
                raise EncryptionError(
                    f"{what} decrypts to noise (imaginary parts up to {imag:.3g}, copies of a "
                    f"logit differ by up to {spread:.3g}; a sound reply stays below "
                    f"{tolerance:.3g}): it was computed with keys other than this client's or "
                    "its values overflowed the CKKS modulus. Discard it"
                )
            out.append(logits)
        return np.concatenate(out)

    @property
    def tolerance(self) -> float:
        """Largest imaginary part or copy disagreement a sound reply may show.

        CKKS noise leaves both below ~5e-4 at a scale of ``2^30`` (measured over 1,000
        av-digits queries), while a reply under the wrong keys or an overflow decrypts to values
        of magnitude ``~2^(bits of the first prime - scale bits)`` (thousands or more).
        """
        return max(1e-2, 2.0 ** (20 - self.spec.params.scale_bits))


# --------------------------------------------------------------------------------------- server


@dataclass
class _LayerPlain:
    """A layer's encoded plaintexts for one layout."""

    layer: _Layer
    bias: np.ndarray
    diagonals: list[list[seal.Plaintext | None]] = field(default_factory=list)
    first: seal.Plaintext | None = None  # expanded layout's first layer: one multiplication
    bias_cache: dict[tuple[float, tuple[int, ...]], seal.Plaintext] = field(default_factory=dict)


class InferenceServer:
    """The server of encrypted inference: evaluates its head on a client's ciphertexts.

    Parameters
    ----------
    public_context
        The client's :meth:`InferenceClient.public_context`.
    head
        The head whose :meth:`~LinearHead.spec` the client built the context for.

    Raises
    ------
    EncryptionError
        If the context is malformed, was built for another head, or lacks a needed key.
    """

    def __init__(self, public_context: bytes, head: Head) -> None:
        spec_bytes, galois_bytes, relin_bytes = _unpack(public_context, _CONTEXT, 3)[:3]
        self.fingerprint = hashlib.sha256(bytes(public_context)).digest()
        self.spec = HeadSpec.from_bytes(spec_bytes)
        if self.spec != head.spec():
            raise EncryptionError(
                f"evaluation context {_short(self.fingerprint)} was built for {self.spec}, but "
                f"this server's head is {head.spec()}; the client must build its context from "
                "this server's head spec"
            )
        self._plan = _Plan.of(self.spec)
        self._blobs = _Blobs()
        self._context = _seal_context(self.spec.params)
        self._galois = seal.GaloisKeys()
        self._blobs.load(self._galois, self._context, galois_bytes, "Galois keys")
        missing = [
            s
            for s, e in zip(self._plan.rotation_steps(), self._plan.galois_elements(), strict=True)
            if not self._galois.has_key(e)
        ]
        if missing:
            raise EncryptionError(
                f"evaluation context {_short(self.fingerprint)} lacks Galois keys for slot "
                f"rotations {missing}; rebuild it with InferenceClient"
            )
        self._relin = seal.RelinKeys()
        if self.spec.depth > 1:
            if not relin_bytes:
                raise EncryptionError(
                    f"evaluation context {_short(self.fingerprint)} has no relinearisation keys, "
                    "which the polynomial head needs; rebuild it with InferenceClient"
                )
            self._blobs.load(self._relin, self._context, relin_bytes, "relinearisation keys")
        self._encoder = seal.CKKSEncoder(self._context)
        self._evaluator = seal.Evaluator(self._context)
        self._scale = 2.0**self.spec.params.scale_bits
        self._layers = {PACKED: self._encode_layers(head, PACKED)}
        if self._plan.expand:
            self._layers[EXPANDED] = self._encode_layers(head, EXPANDED)

    @property
    def has_secret_key(self) -> bool:
        """Whether this object holds any secret key material (never: it cannot decrypt)."""
        return any(isinstance(v, seal.SecretKey | seal.Decryptor) for v in vars(self).values())

    def _encode(self, values: np.ndarray, parms_id: Sequence[int], scale: float) -> seal.Plaintext:
        pt = seal.Plaintext()
        self._encoder.encode(values.tolist(), list(parms_id), scale, pt)
        return pt

    def _encode_layers(self, head: Head, layout: int) -> list[_LayerPlain]:
        """Encode each layer's plaintexts at the level and scale its input ciphertext will have:
        at the prime the next rescaling drops, so rescaling restores the input's scale."""
        parms_id = list(self._context.first_parms_id())
        out = []
        for i, ((w, b), layer) in enumerate(zip(head.layers(), self._plan.layers, strict=True)):
            if i > 0:  # the square and its rescaling come first
                parms_id = self._next(parms_id)
            data = self._context.get_context_data(parms_id)
            prime = float(data.parms().coeff_modulus()[-1].value())
            last = i == len(self._plan.layers) - 1
            lp = _LayerPlain(layer, self._plan.bias(b, layer.rows, layout if last else PACKED))
            if i == 0 and layout == EXPANDED:
                lp.first = self._encode(self._plan.expanded_diagonals(w, layer), parms_id, prime)
            else:
                lp.diagonals = [
                    [None if d is None else self._encode(d, parms_id, prime) for d in row]
                    for row in self._plan.diagonals(w, layer, layout if i > 0 else PACKED)
                ]
            out.append(lp)
            parms_id = self._next(parms_id)
        return out

    def _next(self, parms_id: Sequence[int]) -> list[int]:
        nxt = self._context.get_context_data(list(parms_id)).next_context_data()
        return list(nxt.parms_id())

    def evaluate(self, query: bytes) -> bytes:
        """Evaluate the head on a query; return the encrypted logits.

        Raises
        ------
        EncryptionError
            If the query was made under another evaluation context, is malformed, or holds a
            ciphertext not produced by :meth:`InferenceClient.encrypt`.
        """
        count, layout, blobs = _read_batch(query, _QUERY, self.fingerprint, self._plan)
        first = self._context.first_parms_id()
        replies = []
        for i, blob in enumerate(blobs):
            ct = seal.Ciphertext()
            what = f"query ciphertext {i} (context {_short(self.fingerprint)})"
            self._blobs.load(ct, self._context, blob, what)
            _check_ciphertext(ct, first, self._scale, what)
            replies.append(self._blobs.dump(self._forward(ct, layout)))
        return _pack(_REPLY, [self.fingerprint, _HEADER.pack(count, layout), *replies])

    def _forward(self, ct: seal.Ciphertext, layout: int) -> seal.Ciphertext:
        ev = self._evaluator
        for i, lp in enumerate(self._layers[layout]):
            if i > 0:
                ev.square_inplace(ct)
                ev.relinearize_inplace(ct, self._relin)
                ev.rescale_to_next_inplace(ct)
            ct = self._matvec(ct, lp)
        return ct

    def _matvec(self, x: seal.Ciphertext, lp: _LayerPlain) -> seal.Ciphertext:
        """``W x + b``: the diagonal sum (one multiplication and a sum over positions when
        expanded, else baby-step giant-step), then rotate-and-add over lanes, then the bias."""
        ev, stride, layer = self._evaluator, self._plan.stride, lp.layer
        if lp.first is not None:
            acc = seal.Ciphertext()
            ev.multiply_plain(x, lp.first, acc)
            ev.rescale_to_next_inplace(acc)
            s = 1
            while s < self._plan.expand:  # sum position t·E + i over i into position t·E
                rotated = seal.Ciphertext()
                ev.rotate_vector(acc, s, self._galois, rotated)
                ev.add_inplace(acc, rotated)
                s *= 2
        else:
            acc = self._diagonal_sum(x, lp)
        for s in layer.fold_steps:
            rotated = seal.Ciphertext()
            ev.rotate_vector(acc, s * stride, self._galois, rotated)
            ev.add_inplace(acc, rotated)
        key = (acc.scale, tuple(acc.parms_id()))
        bias = lp.bias_cache.get(key)
        if bias is None:
            bias = lp.bias_cache[key] = self._encode(lp.bias, acc.parms_id(), acc.scale)
        ev.add_plain_inplace(acc, bias)
        return acc

    def _diagonal_sum(self, x: seal.Ciphertext, lp: _LayerPlain) -> seal.Ciphertext:
        """``Σ_i d_i ⊙ rot(x, i)``, rescaled: baby-step giant-step, each giant step's partial sum
        rescaled first so that the Horner rotations run one level lower (about twice as fast)."""
        ev, stride, layer = self._evaluator, self._plan.stride, lp.layer
        babies = [x]
        for _ in range(1, layer.baby):
            nxt = seal.Ciphertext()
            ev.rotate_vector(babies[-1], stride, self._galois, nxt)
            babies.append(nxt)
        acc: seal.Ciphertext | None = None
        for j in reversed(range(layer.giants)):
            if acc is not None:
                ev.rotate_vector_inplace(acc, layer.baby * stride, self._galois)
            part: seal.Ciphertext | None = None
            for i, pt in enumerate(lp.diagonals[j]):
                if pt is None:
                    continue
                term = seal.Ciphertext()
                ev.multiply_plain(babies[i], pt, term)
                if part is None:
                    part = term
                else:
                    ev.add_inplace(part, term)
            if part is None:
                continue
            ev.rescale_to_next_inplace(part)
            if acc is None:
                acc = part
            else:
                ev.add_inplace(acc, part)
        if acc is None:
            raise EncryptionError("a head layer has all-zero weights; there is nothing to evaluate")
        return acc
