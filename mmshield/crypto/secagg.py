"""SecAgg+ (Bell et al. 2020) as transport-agnostic client and server state machines.

The server learns the sum mod ``2^b`` of the surviving clients' encoded updates and nothing else
about any individual update, while clients may drop out at any phase. SecAgg (Bonawitz et al.
2017) is the special case of the complete neighbour graph (``k = n - 1``).

Message flow (each message is a frozen dataclass with ``to_bytes()`` / ``from_bytes()``;
:func:`decode_message` reads any of them back)::

    server                                   client u
    Setup(neighbours N(u), t, b, d)     ->
                                        <-   AdvertiseKeys(c_u^pk, s_u^pk)            phase 1
    KeyBroadcast({v: keys}, v in N(u))  ->
                                        <-   ShareKeys({v: Enc_{c_uv}(b_u[v], s_u^sk[v])})  phase 2
    ShareBundle({v: ciphertext to u})   ->
                                        <-   MaskedInput(y_u)                         phase 3
    UnmaskRequest(survived, dropped)    ->
                                        <-   UnmaskResponse(b_v shares, s_v^sk shares) phase 4
    sum = sum_u y_u - PRG(b_u) -/+ pairwise masks of dropped clients (mod 2^b)

1. **AdvertiseKeys.** Each client draws two X25519 key pairs: ``c`` to encrypt shares, ``s`` to
   agree pairwise mask seeds. Public keys are not signed: we assume an authenticated channel
   between each client and the server (Flower's TLS plus SuperNode authentication in deployment).
2. **ShareKeys.** Each client draws a self-mask seed ``b_u`` (``os.urandom``) and Shamir-shares
   ``b_u`` and its raw ``s``-secret key among the neighbours that advertised keys, with threshold
   ``t`` (:mod:`mmshield.crypto.shamir`). Each share pair is encrypted with AES-256-GCM under
   ``HKDF-SHA256(X25519(c_u, c_v))``; the associated data binds round id, sender and receiver.
   The server only routes ciphertexts.
3. **MaskedInputCollection.** ``y_u = x_u + PRG(b_u) + sum_{v<u} PRG(s_uv) - sum_{v>u} PRG(s_uv)``
   mod ``2^b`` over the neighbours ``v`` whose shares ``u`` received, with
   ``s_uv = HKDF-SHA256(X25519(s_u, s_v))`` and the AES-CTR PRG of :mod:`mmshield.crypto.prg`.
   Before masking, the client decrypts every share it holds: a ciphertext that fails AES-GCM
   authentication (tampering, wrong key, replay into another round or pair) raises
   :class:`ShareDecryptionError` naming the sender. The client then withdraws from the round
   without sending its masked input; the server sees a dropout in phase 3 and removes the
   client's pairwise masks through its key shares as for any other dropout, so the round still
   completes if the others keep ``t`` neighbours. (Treating the *sender* as dropped instead
   would not work: the sender has already masked with the receiver.)
4. **Unmasking.** The server tells each survivor which of its neighbours sent a masked input
   (``survived``) and which did not (``dropped``). The client refuses the whole request if the
   sets overlap, name a client whose shares it does not hold, or ``survived`` has fewer than
   ``t`` clients; it answers with its share of ``b_v`` for survivors and of ``s_v`` for dropped
   neighbours, and it remembers which kind it gave for each ``v``: a later request for the other
   kind for the same ``v`` is refused (:class:`UnmaskRefusedError`). So no neighbour ever gives both
   shares of one client, and with ``t`` chosen as in :mod:`mmshield.crypto.graph` the server can
   never hold ``t`` shares of both ``b_v`` and ``s_v``, even when it lies about dropouts.
5. The server rebuilds the needed ``b_u`` and ``s_v`` from ``t`` shares each, checks that each
   rebuilt ``s_v`` matches the advertised public key, removes the masks and returns the sum with
   the list of clients it includes (:class:`AggregateResult`).

Dropout policy: a client that fails to send a message is dropped from that phase on. The round
continues while every client whose secrets are needed keeps at least ``t`` neighbours; otherwise
the server raises :class:`TooManyDropoutsError` naming the client, the phase, and the counts.

Threat model: the server is honest-but-curious about the values (it may also lie about who
dropped out, which the clients' checks above defeat); up to the fraction of clients allowed by
:func:`mmshield.crypto.graph.choose_parameters` may collude with it. The server never holds the
``c``/``s`` secret keys or ``b_u`` of a client whose update it sums. Not covered: a server that
sends different clients inconsistent views of the graph or of the key lists (Bonawitz et al.'s
malicious-server consistency round with signatures is not implemented).
"""

from __future__ import annotations

import enum
import os
import struct
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mmshield.crypto import shamir
from mmshield.crypto.graph import choose_parameters, neighbour_graph
from mmshield.crypto.prg import SEED_BYTES, MaskExpander, reduce, ring_dtype
from mmshield.errors import SecAggError

__all__ = [
    "AdvertiseKeys",
    "AggregateResult",
    "KeyBroadcast",
    "MaskedInput",
    "Phase",
    "ProtocolError",
    "RoundReport",
    "SecAggClient",
    "SecAggServer",
    "Setup",
    "ShareBundle",
    "ShareDecryptionError",
    "ShareKeys",
    "TooManyDropoutsError",
    "UnmaskRefusedError",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
    "run_in_memory",
]

_MAGIC = b"MSA1"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_SECRET_ELEMS = shamir.field_elements(SEED_BYTES)  # field elements per 32-byte secret (11)
_MAX_ID = shamir.P - 2  # share evaluation point id + 1 must stay below P


class Phase(enum.Enum):
    """The four client-to-server steps of a round (a dropout is recorded at one of them)."""

    ADVERTISE_KEYS = "AdvertiseKeys"
    SHARE_KEYS = "ShareKeys"
    MASKED_INPUT = "MaskedInputCollection"
    UNMASKING = "Unmasking"


# --------------------------------------------------------------------------------------- errors


class ProtocolError(SecAggError):
    """A message is malformed, out of order, from the wrong round or party."""


class ShareDecryptionError(SecAggError):
    """A share ciphertext failed AES-GCM authentication (tampered, misrouted or replayed)."""

    def __init__(self, receiver: int, sender: int, round_id: bytes) -> None:
        self.receiver, self.sender = receiver, sender
        super().__init__(
            f"client {receiver}: the share ciphertext from client {sender} in round "
            f"{round_id.hex()} failed AES-GCM authentication (tampered, misrouted or replayed). "
            f"Client {receiver} withdraws from this round without sending its masked input; the "
            "server treats it as dropped. Check the transport between the clients and server."
        )


class UnmaskRefusedError(SecAggError):
    """A client refused an unmasking request that could reveal an individual update."""


class TooManyDropoutsError(SecAggError):
    """So many clients dropped out that a needed secret can no longer be rebuilt."""

    def __init__(self, client: int, phase: Phase, have: int, need: int, what: str) -> None:
        self.client, self.phase, self.have, self.need = client, phase, have, need
        super().__init__(
            f"secure aggregation aborted in phase {phase.value}: client {client} {what} "
            f"{have} neighbour(s) left, needs t={need}. Declare a higher dropout rate so that "
            "choose_parameters picks more neighbours (or a lower threshold), or retry the round."
        )


# ------------------------------------------------------------------------------- serialisation


_U32 = struct.Struct("<I")
_PAIR = struct.Struct("<II")


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack("<B", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack("<I", v))

    def blob(self, b: bytes) -> None:
        self.u32(len(b))
        self.parts.append(b)

    def ids(self, ids: Iterable[int]) -> None:
        arr = np.asarray(list(ids), dtype="<u4")
        self.u32(arr.size)
        self.parts.append(arr.tobytes())

    def blobs(self, mapping: Mapping[int, bytes]) -> None:
        self.u32(len(mapping))
        parts = self.parts
        for k in sorted(mapping):
            b = mapping[k]
            parts.append(_PAIR.pack(k, len(b)))
            parts.append(b)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("secure-aggregation message is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ProtocolError("secure-aggregation message is truncated")
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def blob(self) -> bytes:
        return bytes(self._take(self.u32()))

    def ids(self) -> tuple[int, ...]:
        n = self.u32()
        return tuple(int(v) for v in np.frombuffer(self._take(4 * n), dtype="<u4"))

    def blobs(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        data, end = self.data, len(self.data)
        count = self.u32()
        pos = self.pos
        for _ in range(count):
            if pos + 8 > end:
                raise ProtocolError("secure-aggregation message is truncated")
            k, n = _PAIR.unpack_from(data, pos)
            pos += 8
            if pos + n > end:
                raise ProtocolError("secure-aggregation message is truncated")
            if k in out:
                raise ProtocolError(f"secure-aggregation message repeats client {k}")
            out[k] = bytes(data[pos : pos + n])
            pos += n
        self.pos = pos
        return out

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("secure-aggregation message has trailing bytes")


_M = TypeVar("_M", bound="_Message")


@dataclass(frozen=True)
class _Message:
    """Common header: protocol magic, message tag, round id and the client the message concerns
    (the sender of a client message, the receiver of a server message)."""

    round_id: bytes
    client_id: int

    TAG: ClassVar[int] = 0

    def to_bytes(self) -> bytes:
        """Serialise to bytes (little-endian, length-prefixed fields)."""
        w = _Writer()
        w.parts.append(_MAGIC)
        w.u8(self.TAG)
        w.blob(self.round_id)
        w.u32(self.client_id)
        self._write(w)
        return w.getvalue()

    def _write(self, w: _Writer) -> None:
        raise NotImplementedError

    @classmethod
    def from_bytes(cls: type[_M], data: bytes) -> _M:
        """Parse bytes written by :meth:`to_bytes` of this message type."""
        msg = decode_message(data)
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected a {cls.__name__} message, got {type(msg).__name__}")
        return msg


@dataclass(frozen=True)
class Setup(_Message):
    """Server to client: round parameters and the client's neighbours."""

    threshold: int
    bits: int
    dim: int
    neighbours: tuple[int, ...]
    TAG: ClassVar[int] = 1

    def _write(self, w: _Writer) -> None:
        w.u32(self.threshold)
        w.u8(self.bits)
        w.u32(self.dim)
        w.ids(self.neighbours)


@dataclass(frozen=True)
class AdvertiseKeys(_Message):
    """Client to server (phase 1): the client's two X25519 public keys (raw, 32 bytes each)."""

    c_public: bytes
    s_public: bytes
    TAG: ClassVar[int] = 2

    def _write(self, w: _Writer) -> None:
        w.blob(self.c_public)
        w.blob(self.s_public)


@dataclass(frozen=True)
class KeyBroadcast(_Message):
    """Server to client: the public keys ``(c, s)`` of the neighbours that advertised."""

    keys: dict[int, tuple[bytes, bytes]]
    TAG: ClassVar[int] = 3

    def _write(self, w: _Writer) -> None:
        w.blobs({v: c + s for v, (c, s) in self.keys.items()})


@dataclass(frozen=True)
class ShareKeys(_Message):
    """Client to server (phase 2): one encrypted share pair per neighbour (receiver -> bytes)."""

    ciphertexts: dict[int, bytes]
    TAG: ClassVar[int] = 4

    def _write(self, w: _Writer) -> None:
        w.blobs(self.ciphertexts)


@dataclass(frozen=True)
class ShareBundle(_Message):
    """Server to client: the ciphertexts addressed to this client (sender -> bytes)."""

    ciphertexts: dict[int, bytes]
    TAG: ClassVar[int] = 5

    def _write(self, w: _Writer) -> None:
        w.blobs(self.ciphertexts)


@dataclass(frozen=True)
class MaskedInput(_Message):
    """Client to server (phase 3): the masked update ``y_u`` (``uint32``, or ``uint64``)."""

    masked: np.ndarray = field(compare=False)
    TAG: ClassVar[int] = 6

    def _write(self, w: _Writer) -> None:
        size = self.masked.dtype.itemsize
        if self.masked.dtype.kind != "u" or size not in (4, 8):
            raise ProtocolError(f"masked input must be uint32 or uint64, got {self.masked.dtype}")
        w.u8(size)
        words = np.ascontiguousarray(self.masked, dtype=f"<u{size}")
        w.u32(words.nbytes)
        w.parts.append(words.data.cast("B"))  # copied once, by getvalue()


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Server to client: which of its neighbours sent a masked input and which did not."""

    survived: tuple[int, ...]
    dropped: tuple[int, ...]
    TAG: ClassVar[int] = 7

    def _write(self, w: _Writer) -> None:
        w.ids(self.survived)
        w.ids(self.dropped)


@dataclass(frozen=True)
class UnmaskResponse(_Message):
    """Client to server (phase 4): shares of ``b_v`` (survivors) and ``s_v`` (dropped).

    Each share is the client's Shamir share of the neighbour's 32-byte secret: 11 field elements
    stored as little-endian ``uint32``.
    """

    self_mask_shares: dict[int, bytes]
    key_shares: dict[int, bytes]
    TAG: ClassVar[int] = 8

    def _write(self, w: _Writer) -> None:
        w.blobs(self.self_mask_shares)
        w.blobs(self.key_shares)


def decode_message(data: bytes) -> _Message:
    """Parse any secure-aggregation message from bytes.

    Raises
    ------
    ProtocolError
        If the bytes are not a well-formed message.
    """
    r = _Reader(data)
    if bytes(r._take(4)) != _MAGIC:
        raise ProtocolError("not a secure-aggregation message (bad magic)")
    tag = r.u8()
    round_id = r.blob()
    cid = r.u32()
    msg: _Message
    if tag == Setup.TAG:
        msg = Setup(round_id, cid, r.u32(), r.u8(), r.u32(), r.ids())
    elif tag == AdvertiseKeys.TAG:
        msg = AdvertiseKeys(round_id, cid, r.blob(), r.blob())
    elif tag == KeyBroadcast.TAG:
        raw = r.blobs()
        if any(len(b) != 2 * _KEY_BYTES for b in raw.values()):
            raise ProtocolError("KeyBroadcast: each entry must hold two 32-byte keys")
        msg = KeyBroadcast(
            round_id, cid, {v: (b[:_KEY_BYTES], b[_KEY_BYTES:]) for v, b in raw.items()}
        )
    elif tag == ShareKeys.TAG:
        msg = ShareKeys(round_id, cid, r.blobs())
    elif tag == ShareBundle.TAG:
        msg = ShareBundle(round_id, cid, r.blobs())
    elif tag == MaskedInput.TAG:
        size = r.u8()
        if size not in (4, 8):
            raise ProtocolError(f"MaskedInput: bad word size {size}")
        raw_y = r._take(r.u32())
        if len(raw_y) % size:
            raise ProtocolError("MaskedInput: payload is not a whole number of words")
        # Zero-copy, read-only view of the message on little-endian machines.
        y = np.frombuffer(raw_y, dtype=f"<u{size}").astype(f"=u{size}", copy=False)
        msg = MaskedInput(round_id, cid, y)
    elif tag == UnmaskRequest.TAG:
        msg = UnmaskRequest(round_id, cid, r.ids(), r.ids())
    elif tag == UnmaskResponse.TAG:
        msg = UnmaskResponse(round_id, cid, r.blobs(), r.blobs())
    else:
        raise ProtocolError(f"unknown secure-aggregation message tag {tag}")
    r.done()
    return msg


# ------------------------------------------------------------------------------ key derivation


def _kdf(shared: bytes, round_id: bytes, purpose: bytes, a: int, b: int) -> bytes:
    lo, hi = min(a, b), max(a, b)
    info = b"mmshield/secagg/v1/" + purpose + struct.pack("<II", lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=round_id, info=info).derive(shared)


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _pair_seed(
    s_secret: X25519PrivateKey, peer_s_public: bytes, round_id: bytes, u: int, v: int
) -> bytes:
    shared = s_secret.exchange(X25519PublicKey.from_public_bytes(peer_s_public))
    return _kdf(shared, round_id, b"pairwise-mask", u, v)


def _aad(round_id: bytes, sender: int, receiver: int) -> bytes:
    return _MAGIC + b"share" + round_id + struct.pack("<II", sender, receiver)


def _check_ids(ids: Iterable[int], what: str) -> None:
    for i in ids:
        if not 0 <= i <= _MAX_ID:
            raise ProtocolError(f"{what}: client id {i} outside [0, {_MAX_ID}]")


# ------------------------------------------------------------------------------------- client


class _ClientState(enum.Enum):
    NEW = 0
    ADVERTISED = 1
    SHARED = 2
    MASKED = 3
    ABORTED = 4


class SecAggClient:
    """One client's side of a SecAgg+ round.

    Call :meth:`on_setup`, :meth:`on_keys`, :meth:`on_shares` and :meth:`on_unmask` (or
    :meth:`handle`) with the server's messages, in order; each returns the reply to send.

    Parameters
    ----------
    client_id
        This client's id (the one the server uses in its messages).
    """

    def __init__(self, client_id: int) -> None:
        _check_ids([client_id], "SecAggClient")
        self.client_id = client_id
        self._state = _ClientState.NEW
        self._revealed: dict[int, str] = {}

    # -- helpers
    def _expect(self, msg: _Message, state: _ClientState, step: str) -> None:
        if self._state is _ClientState.ABORTED:
            raise ProtocolError(
                f"client {self.client_id} withdrew from this round; ignoring {step}"
            )
        if self._state is not state:
            raise ProtocolError(
                f"client {self.client_id}: {step} arrived out of order (state {self._state.name})"
            )
        if msg.client_id != self.client_id:
            raise ProtocolError(
                f"client {self.client_id}: {step} addressed to client {msg.client_id}"
            )
        if state is not _ClientState.NEW and msg.round_id != self.round_id:
            raise ProtocolError(
                f"client {self.client_id}: {step} is for round {msg.round_id.hex()}, "
                f"not {self.round_id.hex()}"
            )

    def handle(self, msg: _Message, update: np.ndarray | None = None) -> _Message:
        """Dispatch a server message to the matching step (``update`` for the ShareBundle)."""
        if isinstance(msg, Setup):
            return self.on_setup(msg)
        if isinstance(msg, KeyBroadcast):
            return self.on_keys(msg)
        if isinstance(msg, ShareBundle):
            if update is None:
                raise ProtocolError(f"client {self.client_id}: masking needs the encoded update")
            return self.on_shares(msg, update)
        if isinstance(msg, UnmaskRequest):
            return self.on_unmask(msg)
        raise ProtocolError(f"client {self.client_id}: unexpected {type(msg).__name__}")

    # -- phase 1
    def on_setup(self, msg: Setup) -> AdvertiseKeys:
        """Check the round parameters and advertise two fresh X25519 public keys.

        Raises
        ------
        ProtocolError
            If the threshold is below an honest majority of the client's neighbours
            (``floor(deg/2) + 1``) or above their number, or the parameters are malformed.
        """
        self._expect(msg, _ClientState.NEW, "Setup")
        nb = tuple(sorted(set(msg.neighbours)))
        if len(nb) != len(msg.neighbours) or self.client_id in nb:
            raise ProtocolError(f"client {self.client_id}: Setup lists bad neighbours")
        _check_ids(nb, f"client {self.client_id} Setup")
        if not len(nb) // 2 + 1 <= msg.threshold <= len(nb):
            raise ProtocolError(
                f"client {self.client_id}: threshold t={msg.threshold} with {len(nb)} neighbours "
                f"is unsafe or unreachable; it must lie in [{len(nb) // 2 + 1}, {len(nb)}] so that "
                "an honest majority of neighbours never reveals both secrets of a client"
            )
        if not 1 <= msg.bits <= 64 or msg.dim < 1 or len(msg.round_id) < 16:
            raise ProtocolError(f"client {self.client_id}: Setup has bad bits/dim/round id")
        self.round_id = msg.round_id
        self.threshold = msg.threshold
        self.bits = msg.bits
        self.dim = msg.dim
        self.neighbours = frozenset(nb)
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._c_public, self._s_public = _raw_public(self._c_key), _raw_public(self._s_key)
        self._state = _ClientState.ADVERTISED
        return AdvertiseKeys(self.round_id, self.client_id, self._c_public, self._s_public)

    # -- phase 2
    def on_keys(self, msg: KeyBroadcast) -> ShareKeys:
        """Share ``b_u`` and the ``s`` secret key among the neighbours that advertised keys."""
        self._expect(msg, _ClientState.ADVERTISED, "KeyBroadcast")
        me = self.client_id
        unknown = set(msg.keys) - self.neighbours
        if unknown:
            raise ProtocolError(
                f"client {me}: KeyBroadcast has keys of non-neighbours {sorted(unknown)}"
            )
        if len(msg.keys) < self.threshold:
            raise TooManyDropoutsError(
                me, Phase.ADVERTISE_KEYS, len(msg.keys), self.threshold, "has"
            )
        seen = {self._c_public, self._s_public}
        for v, (c_pk, s_pk) in msg.keys.items():
            if len(c_pk) != _KEY_BYTES or len(s_pk) != _KEY_BYTES or c_pk == s_pk:
                raise ProtocolError(f"client {me}: neighbour {v}'s public keys are malformed")
            if c_pk in seen or s_pk in seen:
                raise ProtocolError(f"client {me}: neighbour {v} reuses a public key of another")
            seen.update((c_pk, s_pk))
        self._peer_keys = dict(msg.keys)
        self._b_seed = os.urandom(SEED_BYTES)
        holders = sorted(msg.keys)
        points = np.asarray(holders, dtype=np.int64) + 1
        shares = shamir.split_bytes(
            [self._b_seed, _raw_private(self._s_key)], points, self.threshold
        )
        # One little-endian row per holder: its share of b_u, then its share of s_u.
        rows = shares.astype("<u4").reshape(len(holders), -1)
        nonces = os.urandom(_NONCE_BYTES * len(holders))
        c_key, round_id = self._c_key, self.round_id
        cts: dict[int, bytes] = {}
        self._enc_keys: dict[int, bytes] = {}
        for j, v in enumerate(holders):
            shared = c_key.exchange(X25519PublicKey.from_public_bytes(msg.keys[v][0]))
            key = _kdf(shared, round_id, b"share-encryption", me, v)
            self._enc_keys[v] = key  # symmetric: also decrypts v's shares to this client
            plaintext = struct.pack("<II", me, v) + rows[j].tobytes()
            nonce = nonces[_NONCE_BYTES * j : _NONCE_BYTES * (j + 1)]
            cts[v] = nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(round_id, me, v))
        self._state = _ClientState.SHARED
        return ShareKeys(self.round_id, me, cts)

    # -- phase 3
    def on_shares(self, msg: ShareBundle, update: np.ndarray) -> MaskedInput:
        """Decrypt the received shares, then mask ``update`` (already encoded into Z_{2^b}).

        Raises
        ------
        ShareDecryptionError
            If a ciphertext fails authentication; the client withdraws from the round.
        """
        self._expect(msg, _ClientState.SHARED, "ShareBundle")
        me = self.client_id
        unknown = set(msg.ciphertexts) - set(self._peer_keys)
        if unknown:
            raise ProtocolError(
                f"client {me}: shares from clients it has no keys of: {sorted(unknown)}"
            )
        if len(msg.ciphertexts) < self.threshold:
            self._state = _ClientState.ABORTED
            raise TooManyDropoutsError(
                me, Phase.SHARE_KEYS, len(msg.ciphertexts), self.threshold, "has"
            )
        x = np.asarray(update)
        dtype = ring_dtype(self.bits)
        if x.shape != (self.dim,) or x.dtype != dtype:
            raise ProtocolError(
                f"client {me}: the encoded update must be {np.dtype(dtype).name}[{self.dim}], "
                f"got {x.dtype}{list(x.shape)} (encode it with FixedPointEncoder)"
            )
        if self.bits < 8 * x.dtype.itemsize and np.any(x >> dtype(self.bits)):
            raise ProtocolError(f"client {me}: the encoded update has values >= 2^{self.bits}")
        # Shares are kept in their wire format (little-endian uint32 field elements): the
        # client only ever sends them on, in UnmaskResponse.
        held: dict[int, tuple[bytes, bytes]] = {}
        half = 8 + 4 * _SECRET_ELEMS
        for v, blob in msg.ciphertexts.items():
            key = self._enc_keys[v]
            try:
                if len(blob) < _NONCE_BYTES:
                    raise InvalidTag
                pt = AESGCM(key).decrypt(
                    blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _aad(self.round_id, v, me)
                )
            except InvalidTag:
                self._state = _ClientState.ABORTED
                raise ShareDecryptionError(me, v, self.round_id) from None
            sender, receiver = struct.unpack("<II", pt[:8])
            if (sender, receiver) != (v, me) or len(pt) != 8 + 8 * _SECRET_ELEMS:
                self._state = _ClientState.ABORTED
                raise ShareDecryptionError(me, v, self.round_id)
            held[v] = (pt[8:half], pt[half:])
        self._held = held
        expander = MaskExpander(self.dim, self.bits)
        y = expander.masked(x, self._b_seed)
        neighbours = sorted(held)
        expander.add_many(
            y,
            [
                _pair_seed(self._s_key, self._peer_keys[v][1], self.round_id, me, v)
                for v in neighbours
            ],
            [+1 if v < me else -1 for v in neighbours],
        )
        self._state = _ClientState.MASKED
        return MaskedInput(self.round_id, me, reduce(y, self.bits))

    # -- phase 4
    def on_unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        """Reveal one share per listed neighbour: ``b_v``'s if it survived, ``s_v``'s if not.

        Raises
        ------
        UnmaskRefusedError
            If the lists overlap, name a client whose shares this client does not hold, list
            fewer than ``t`` survivors, or ask for the other kind of share of a neighbour than
            an earlier request did. Nothing is revealed on refusal.
        """
        self._expect(msg, _ClientState.MASKED, "UnmaskRequest")
        me = self.client_id
        survived, dropped = set(msg.survived), set(msg.dropped)
        both = survived & dropped
        if both or len(survived) != len(msg.survived) or len(dropped) != len(msg.dropped):
            raise UnmaskRefusedError(
                f"client {me} refuses to unmask in round {self.round_id.hex()}: clients "
                f"{sorted(both)} are listed both as survived and dropped (or listed twice); "
                "answering would let the server remove both masks of one client"
            )
        foreign = (survived | dropped) - set(self._held)
        if foreign:
            raise UnmaskRefusedError(
                f"client {me} refuses to unmask: it holds no shares of clients {sorted(foreign)}"
            )
        if len(survived) < self.threshold:
            raise UnmaskRefusedError(
                f"client {me} refuses to unmask: only {len(survived)} of its neighbours are "
                f"reported as survivors, fewer than the threshold t={self.threshold}"
            )
        contradictions = sorted(
            [v for v in survived if self._revealed.get(v, "b") != "b"]
            + [v for v in dropped if self._revealed.get(v, "s") != "s"]
        )
        if contradictions:
            raise UnmaskRefusedError(
                f"client {me} refuses to unmask: for clients {contradictions} it already revealed "
                "the other kind of share (self-mask for a survivor, key for a dropout); revealing "
                "both would unmask an individual update"
            )
        for v in survived:
            self._revealed[v] = "b"
        for v in dropped:
            self._revealed[v] = "s"
        return UnmaskResponse(
            self.round_id,
            me,
            {v: self._held[v][0] for v in sorted(survived)},
            {v: self._held[v][1] for v in sorted(dropped)},
        )


# ------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class AggregateResult:
    """The outcome of a round.

    Attributes
    ----------
    total
        Sum mod ``2^bits`` of the included clients' encoded updates.
    included
        Clients whose update is in ``total`` (they sent a masked input).
    dropped
        Phase at which each excluded client dropped out.
    """

    total: np.ndarray = field(compare=False)
    included: tuple[int, ...]
    dropped: dict[Phase, tuple[int, ...]]


class SecAggServer:
    """The server's side of a SecAgg+ round over ``client_ids``.

    Parameters
    ----------
    client_ids
        The clients invited to the round (distinct, ``< 2^31 - 2``).
    dim
        Length of the encoded updates.
    k, t
        Neighbours per client and Shamir threshold (see :mod:`mmshield.crypto.graph`;
        ``k = len(client_ids) - 1`` gives SecAgg's complete graph).
    bits
        Ring size exponent: sums are mod ``2^bits``.
    round_id
        At least 16 bytes naming the round; fresh random bytes by default.
    """

    def __init__(
        self,
        client_ids: Sequence[int],
        dim: int,
        *,
        k: int,
        t: int,
        bits: int = 32,
        round_id: bytes | None = None,
    ) -> None:
        ids = [int(c) for c in client_ids]
        _check_ids(ids, "SecAggServer")
        if len(set(ids)) != len(ids) or len(ids) < 2:
            raise SecAggError("SecAggServer needs at least 2 distinct client ids")
        self.client_ids = tuple(sorted(ids))
        self.dim = dim
        self.bits = bits
        self.dtype = ring_dtype(bits)
        self.round_id = round_id if round_id is not None else os.urandom(16)
        self.graph = neighbour_graph(list(self.client_ids), k)
        self.k = k
        self.threshold = t
        for u, nb in self.graph.items():
            if not len(nb) // 2 + 1 <= t <= len(nb):
                raise SecAggError(
                    f"threshold t={t} is unsafe for client {u} with {len(nb)} neighbours; use "
                    f"t in [{len(nb) // 2 + 1}, {len(nb)}] (choose_parameters picks one)"
                )
        self._phase = 0
        self._dropped: dict[Phase, tuple[int, ...]] = {}

    @classmethod
    def for_dropout(
        cls,
        client_ids: Sequence[int],
        dim: int,
        dropout: float = 0.1,
        collusion: float = 0.0,
        bits: int = 32,
        **kwargs: float,
    ) -> SecAggServer:
        """A server whose ``k`` and ``t`` come from :func:`choose_parameters`."""
        p = choose_parameters(len(client_ids), dropout, collusion, **kwargs)
        return cls(client_ids, dim, k=p.k, t=p.t, bits=bits)

    def _step(self, expected: int, name: str) -> None:
        if self._phase != expected:
            raise ProtocolError(f"server: {name} called out of order (step {self._phase})")
        self._phase += 1

    def _check(self, msg: _Message, kind: type, allowed: Collection[int], phase: Phase) -> None:
        if not isinstance(msg, kind):
            raise ProtocolError(f"server: expected {kind.__name__}, got {type(msg).__name__}")
        if msg.round_id != self.round_id:
            raise ProtocolError(
                f"server: a {kind.__name__} from client {msg.client_id} is for another round"
            )
        if msg.client_id not in allowed:
            raise ProtocolError(
                f"server: client {msg.client_id} may not send {kind.__name__} "
                f"in phase {phase.value}"
            )

    def _collect(
        self, msgs: Iterable[_M], kind: type[_M], allowed: Collection[int], phase: Phase
    ) -> dict[int, _M]:
        got: dict[int, _M] = {}
        for m in msgs:
            self._check(m, kind, allowed, phase)
            if m.client_id in got:
                raise ProtocolError(f"server: client {m.client_id} sent two {kind.__name__}")
            got[m.client_id] = m
        self._dropped[phase] = tuple(sorted(set(allowed) - set(got)))
        return got

    def setup(self) -> dict[int, Setup]:
        """The Setup message for every invited client."""
        self._step(0, "setup")
        return {
            u: Setup(self.round_id, u, self.threshold, self.bits, self.dim, self.graph[u])
            for u in self.client_ids
        }

    def collect_keys(self, msgs: Iterable[AdvertiseKeys]) -> dict[int, KeyBroadcast]:
        """Phase 1: gather public keys; send each client those of its live neighbours.

        Raises
        ------
        TooManyDropoutsError
            If a client that advertised keeps fewer than ``t`` neighbours that did.
        """
        self._step(1, "collect_keys")
        got = self._collect(msgs, AdvertiseKeys, self.client_ids, Phase.ADVERTISE_KEYS)
        for m in got.values():
            if len(m.c_public) != _KEY_BYTES or len(m.s_public) != _KEY_BYTES:
                raise ProtocolError(f"server: client {m.client_id} sent malformed public keys")
        self._keys = {u: (m.c_public, m.s_public) for u, m in got.items()}
        self._u1 = frozenset(got)
        out: dict[int, KeyBroadcast] = {}
        for u in sorted(self._u1):
            live = [v for v in self.graph[u] if v in self._u1]
            if len(live) < self.threshold:
                raise TooManyDropoutsError(
                    u, Phase.ADVERTISE_KEYS, len(live), self.threshold, "has"
                )
            out[u] = KeyBroadcast(self.round_id, u, {v: self._keys[v] for v in live})
        return out

    def route_shares(self, msgs: Iterable[ShareKeys]) -> dict[int, ShareBundle]:
        """Phase 2: route each encrypted share to its receiver.

        Raises
        ------
        TooManyDropoutsError
            If a client that shared keeps fewer than ``t`` neighbours that did.
        """
        self._step(2, "route_shares")
        got = self._collect(msgs, ShareKeys, self._u1, Phase.SHARE_KEYS)
        for u, m in got.items():
            expected = {v for v in self.graph[u] if v in self._u1}
            if set(m.ciphertexts) != expected:
                raise ProtocolError(
                    f"server: client {u} sent shares to {sorted(m.ciphertexts)}, expected its "
                    f"neighbours with keys {sorted(expected)}"
                )
        self._u2 = frozenset(got)
        out: dict[int, ShareBundle] = {}
        for u in sorted(self._u2):
            bundle = {v: got[v].ciphertexts[u] for v in self.graph[u] if v in self._u2}
            if len(bundle) < self.threshold:
                raise TooManyDropoutsError(u, Phase.SHARE_KEYS, len(bundle), self.threshold, "has")
            out[u] = ShareBundle(self.round_id, u, bundle)
        return out

    def collect_masked(self, msgs: Iterable[MaskedInput]) -> dict[int, UnmaskRequest]:
        """Phase 3: sum the masked inputs; ask each survivor for the shares needed to unmask.

        Raises
        ------
        TooManyDropoutsError
            If a survivor, or a dropped client with surviving neighbours, keeps fewer than ``t``
            surviving neighbours (its secret could not be rebuilt).
        """
        self._step(3, "collect_masked")
        total = np.zeros(self.dim, dtype=self.dtype)
        u3: set[int] = set()
        for m in msgs:
            self._check(m, MaskedInput, self._u2, Phase.MASKED_INPUT)
            if m.client_id in u3:
                raise ProtocolError(f"server: client {m.client_id} sent two MaskedInput")
            if m.masked.shape != (self.dim,) or m.masked.dtype != self.dtype:
                raise ProtocolError(
                    f"server: client {m.client_id}'s masked input is {m.masked.dtype}"
                    f"{list(m.masked.shape)}, expected {np.dtype(self.dtype).name}[{self.dim}]"
                )
            np.add(total, m.masked, out=total)
            u3.add(m.client_id)
        if not u3:
            raise TooManyDropoutsError(
                -1, Phase.MASKED_INPUT, 0, self.threshold, "(every client) has"
            )
        self._dropped[Phase.MASKED_INPUT] = tuple(sorted(self._u2 - u3))
        self._total = total
        self._u3 = frozenset(u3)
        for v in sorted(self._u2):
            alive = sum(1 for w in self.graph[v] if w in self._u3)
            if v in self._u3 and alive < self.threshold:
                raise TooManyDropoutsError(v, Phase.MASKED_INPUT, alive, self.threshold, "has")
            if v not in self._u3 and 0 < alive < self.threshold:
                raise TooManyDropoutsError(
                    v, Phase.MASKED_INPUT, alive, self.threshold, "dropped out; its key needs"
                )
        self._asked: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        out: dict[int, UnmaskRequest] = {}
        for u in sorted(self._u3):
            nb = [v for v in self.graph[u] if v in self._u2]
            surv = tuple(v for v in nb if v in self._u3)
            drop = tuple(v for v in nb if v not in self._u3)
            self._asked[u] = (frozenset(surv), frozenset(drop))
            out[u] = UnmaskRequest(self.round_id, u, surv, drop)
        return out

    def finish(self, msgs: Iterable[UnmaskResponse]) -> AggregateResult:
        """Phase 4: rebuild the needed secrets from the shares, remove the masks, return the sum.

        Raises
        ------
        TooManyDropoutsError
            If fewer than ``t`` neighbours of some client answered (phase Unmasking).
        SecAggError
            If the shares of a dropped client's key do not rebuild its advertised public key.
        """
        self._step(4, "finish")
        got = self._collect(msgs, UnmaskResponse, self._u3, Phase.UNMASKING)
        b_shares: dict[int, list[tuple[int, bytes]]] = {u: [] for u in self._u3}
        s_shares: dict[int, list[tuple[int, bytes]]] = {}
        share_len = 4 * _SECRET_ELEMS
        for w, m in got.items():
            surv, drop = self._asked[w]
            if set(m.self_mask_shares) != surv or set(m.key_shares) != drop:
                raise ProtocolError(f"server: client {w} answered a different unmask request")
            for shares, table in ((m.self_mask_shares, b_shares), (m.key_shares, s_shares)):
                for v, blob in shares.items():
                    if len(blob) != share_len:
                        raise ProtocolError(f"server: client {w} sent a malformed share of {v}")
                    table.setdefault(v, []).append((w, blob))
        t = self.threshold
        for kind, table in (("self-mask seed", b_shares), ("mask key", s_shares)):
            for v, lst in table.items():
                if len(lst) < t:
                    raise TooManyDropoutsError(
                        v, Phase.UNMASKING, len(lst), t, f"({kind}) has shares from only"
                    )
        b_seeds = self._rebuild(b_shares)
        s_keys = self._rebuild(s_shares)
        total = self._total.copy()
        seeds = [b_seeds[u] for u in sorted(b_seeds)]
        signs = [-1] * len(seeds)
        for v in sorted(s_keys):
            key = X25519PrivateKey.from_private_bytes(s_keys[v])
            if _raw_public(key) != self._keys[v][1]:
                raise SecAggError(
                    f"the shares of dropped client {v}'s mask key rebuild a key that does not "
                    "match its advertised public key: a neighbour sent a corrupted share"
                )
            for u in self.graph[v]:
                if u in self._u3:
                    seed = _pair_seed(key, self._keys[u][1], self.round_id, v, u)
                    # y_u holds +PRG(s_uv) when v < u and -PRG(s_uv) when v > u: undo it.
                    seeds.append(seed)
                    signs.append(-1 if v < u else +1)
        MaskExpander(self.dim, self.bits).add_many(total, seeds, signs)
        dropped = dict(self._dropped)
        dropped.pop(Phase.UNMASKING, None)  # late clients are still in the sum
        return AggregateResult(reduce(total, self.bits), tuple(sorted(self._u3)), dropped)

    def _rebuild(self, table: Mapping[int, list[tuple[int, bytes]]]) -> dict[int, bytes]:
        """Rebuild every secret in ``table`` from its first ``t`` shares, in one batch."""
        if not table:
            return {}
        owners = sorted(table)
        t = self.threshold
        points = np.array([[w + 1 for w, _ in table[v][:t]] for v in owners], dtype=np.int64)
        raw = b"".join(blob for v in owners for _, blob in table[v][:t])
        shares = np.frombuffer(raw, dtype="<u4").astype(np.int64).reshape(len(owners), t, -1)
        secrets_ = shamir.reconstruct_bytes(points, shares, SEED_BYTES)
        return dict(zip(owners, secrets_, strict=True))


# ------------------------------------------------------------------------ in-memory reference


@dataclass
class RoundReport:
    """What :func:`run_in_memory` observed.

    Attributes
    ----------
    result
        The aggregate (``None`` never: a failed round raises).
    client_seconds
        CPU-side wall time each client spent in its handlers (including (de)serialisation).
    server_seconds
        Wall time the server spent in its handlers (including (de)serialisation).
    client_errors
        Clients that withdrew by raising (e.g. a tampered share), with the message.
    bytes_up, bytes_down
        Serialised bytes sent by clients and by the server.
    """

    result: AggregateResult
    client_seconds: dict[int, float]
    server_seconds: float
    client_errors: dict[int, str]
    bytes_up: int
    bytes_down: int


def run_in_memory(
    server: SecAggServer,
    inputs: Mapping[int, np.ndarray],
    drop: Mapping[Phase, Collection[int]] | None = None,
    tamper: Mapping[tuple[int, int], bytes] | None = None,
) -> RoundReport:
    """Run one round in-process, every message round-tripping through bytes.

    The reference driver for tests and for the simulator; a real deployment carries the same
    bytes in Flower messages.

    Parameters
    ----------
    server
        A fresh server.
    inputs
        Encoded update of every invited client.
    drop
        Clients that go silent from a phase on: ``{Phase.SHARE_KEYS: {3}}`` means client 3
        advertised keys and then never sent anything again.
    tamper
        ``{(sender, receiver): replacement}`` replaces a share ciphertext in transit.

    Returns
    -------
    RoundReport
        The result and timings. A client that raises :class:`SecAggError` withdraws (recorded
        in ``client_errors``) and is treated as a dropout.
    """
    drop = drop or {}
    tamper = tamper or {}
    order = list(Phase)
    gone_at = {c: order.index(p) for p in order for c in drop.get(p, ())}
    clients = {u: SecAggClient(u) for u in server.client_ids}
    client_seconds = dict.fromkeys(server.client_ids, 0.0)
    errors: dict[int, str] = {}
    counters = {"up": 0, "down": 0, "server": 0.0}

    def server_call(
        fn: Callable[[list[Any]], Mapping[int, _Message]], replies: list[bytes]
    ) -> dict[int, bytes]:
        start = time.perf_counter()
        msgs = [decode_message(b) for b in replies]
        out = fn(msgs)
        encoded = {u: m.to_bytes() for u, m in out.items()}
        counters["server"] += time.perf_counter() - start
        counters["up"] += sum(len(b) for b in replies)
        counters["down"] += sum(len(b) for b in encoded.values())
        return encoded

    def client_step(phase_index: int, outbox: dict[int, bytes]) -> list[bytes]:
        replies = []
        for u, data in outbox.items():
            if gone_at.get(u, len(order)) <= phase_index or u in errors:
                continue
            start = time.perf_counter()
            try:
                msg = decode_message(data)
                reply = clients[u].handle(msg, inputs[u] if isinstance(msg, ShareBundle) else None)
                replies.append(reply.to_bytes())
            except SecAggError as err:
                errors[u] = str(err)
            client_seconds[u] += time.perf_counter() - start
        return replies

    def routed(outbox: dict[int, bytes]) -> dict[int, bytes]:
        if not tamper:
            return outbox
        out = {}
        for u, data in outbox.items():
            msg = decode_message(data)
            if isinstance(msg, ShareBundle):
                cts = {v: tamper.get((v, u), ct) for v, ct in msg.ciphertexts.items()}
                data = ShareBundle(msg.round_id, u, cts).to_bytes()
            out[u] = data
        return out

    start = time.perf_counter()
    setup = {u: m.to_bytes() for u, m in server.setup().items()}
    counters["server"] += time.perf_counter() - start
    counters["down"] += sum(len(b) for b in setup.values())
    replies = client_step(0, setup)
    outbox = server_call(server.collect_keys, replies)
    replies = client_step(1, outbox)
    outbox = routed(server_call(server.route_shares, replies))
    replies = client_step(2, outbox)
    outbox = server_call(server.collect_masked, replies)
    replies = client_step(3, outbox)
    start = time.perf_counter()
    result = server.finish([UnmaskResponse.from_bytes(b) for b in replies])
    counters["server"] += time.perf_counter() - start
    counters["up"] += sum(len(b) for b in replies)
    return RoundReport(
        result=result,
        client_seconds=client_seconds,
        server_seconds=float(counters["server"]),
        client_errors=errors,
        bytes_up=int(counters["up"]),
        bytes_down=int(counters["down"]),
    )
