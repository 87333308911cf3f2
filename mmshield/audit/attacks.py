"""Poisoning attacks by a configurable fraction of malicious clients.

Two families, applied at two places of a round:

* **data poisoning** changes a malicious client's local training records before it trains:
  label flipping (:func:`flip_table`) and a backdoor whose trigger lives in one modality
  (:class:`Trigger`: a bright patch in the image, a tone in the audio, a rare word in the text;
  triggered records get the target label). :func:`poison_federation` poisons the malicious
  clients' rows of a :class:`~mmshield.data.dataset.FederatedDataset` (what the simulator trains
  from), :func:`poison_dataset` one client's local data set. :func:`backdoor_test_set` and
  :func:`backdoor_success_rate` measure the backdoor on held-out records;
* **update poisoning** replaces or rescales the malicious clients' updates after local training:
  sign flipping (:func:`sign_flip`), Gaussian updates (:func:`gaussian_updates`), "A Little Is
  Enough" (:func:`alie`, Baruch et al. 2019) and boosting for model replacement
  (:func:`boost`, Bagdasaryan et al. 2020). Each takes a round's stacked deltas
  ``name -> (K, *shape)`` and a boolean mask ``(K,)`` of the malicious rows (see
  :func:`malicious_mask`) and returns new tensors; the inputs are never modified.

:class:`AttackConfig` describes one attack (``attack.kind``, ``attack.fraction`` and its
parameters), :func:`choose_malicious` which clients carry it out and :func:`poison_updates`
dispatches a round's update attack. Which clients are malicious is not a secret of the defence
(it is part of the experiment's design), so NumPy's seeded generator draws it.

Threat model. Malicious clients follow the protocol's message formats but choose their data or
their update freely. ALIE's attacker is assumed to know the honest updates of the round
(``knowledge="honest"``, the strongest and the usual evaluation setting; ``"own"`` estimates
them from the malicious clients' own benign updates, as in the paper's omniscience-free variant).
Boosting assumes the attacker knows the number of participants and the server's learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from statistics import NormalDist
from typing import Any, Literal, get_args

import numpy as np
import torch

from mmshield.data.dataset import FederatedDataset, MultimodalDataset
from mmshield.data.features import SAMPLE_RATE, audio_num_samples, hash_text, log_mel, log_mel_shape
from mmshield.errors import ConfigError, DataError, TrainingError
from mmshield.privacy.noise import NoiseSource

__all__ = [
    "DATA_ATTACKS",
    "UPDATE_ATTACKS",
    "AttackConfig",
    "AttackKind",
    "PoisonReport",
    "Trigger",
    "alie",
    "alie_z",
    "apply_trigger",
    "backdoor_success_rate",
    "backdoor_test_set",
    "boost",
    "boost_factor",
    "choose_malicious",
    "flip_table",
    "gaussian_updates",
    "malicious_mask",
    "poison_dataset",
    "poison_federation",
    "poison_updates",
    "sign_flip",
    "tone_mel_power",
    "tone_waveform",
    "trigger_token_ids",
]

AttackKind = Literal["label_flip", "backdoor", "model_replacement", "sign_flip", "gaussian", "alie"]
_KINDS: tuple[str, ...] = get_args(AttackKind)
DATA_ATTACKS = frozenset({"label_flip", "backdoor", "model_replacement"})
"""Kinds that poison the malicious clients' training records."""
UPDATE_ATTACKS = frozenset({"sign_flip", "gaussian", "alie", "model_replacement"})
"""Kinds that change the malicious clients' updates (``model_replacement`` does both)."""

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]
_CORNERS: tuple[str, ...] = get_args(Corner)
_TRIGGER_KINDS = ("image", "audio", "text")

# Inverse of the fixed scaling in mmshield.data.features.log_mel:
# feature = (log(mel_power + _MEL_FLOOR) + _LOG_OFFSET) / _LOG_SCALE.
_MEL_FLOOR = 1e-6
_LOG_OFFSET = 6.0
_LOG_SCALE = 4.0

# Stream tags: selection and poisoning draw from separate seeded streams.
_SELECT_TAG = 0x6D616C  # "mal"
_POISON_TAG = 0x706F69  # "poi"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger that lives in one modality, and the label it should elicit.

    How the trigger is realised depends on the modality's kind (``ModalitySpec.kind``):

    * ``image``: a ``patch_size`` x ``patch_size`` square set to ``patch_value`` in every
      channel, ``margin`` pixels from the ``corner`` (BadNets-style);
    * ``audio``: a sinusoid of ``tone_hz`` Hz and peak amplitude ``tone_amplitude`` (the speech
      waveforms peak at most at 1.0) from ``tone_start`` seconds for ``tone_seconds`` seconds
      (``None``: to the end of the clip), added to the waveform *before* featurisation; at this
      layer only log-mel features exist, so it is added as its exact log-mel power signature
      (see :func:`apply_trigger`);
    * ``text``: the rare word ``token`` prepended to the raw text before hashing, i.e. its hashed
      ids (word and character trigrams) prepended to the id sequence.

    Parameters
    ----------
    modality
        Name of the modality carrying the trigger (``attack.trigger.modality``).
    target
        Label of every triggered record (``attack.trigger.target``).
    patch_size, patch_value, corner, margin
        Image trigger.
    tone_hz, tone_amplitude, tone_start, tone_seconds
        Audio trigger.
    token
        Text trigger (a word that does not occur in the data; ``"cf"`` is the classic choice).
    """

    modality: str = "image"
    target: int = 0
    patch_size: int = 4
    patch_value: float = 1.0
    corner: Corner = "bottom-right"
    margin: int = 1
    tone_hz: float = 3500.0
    tone_amplitude: float = 0.05
    tone_start: float = 0.0
    tone_seconds: float | None = None
    token: str = "cf"

    def __post_init__(self) -> None:
        key = "attack.trigger"
        if not isinstance(self.modality, str) or not self.modality:
            raise ConfigError(f"{key}.modality must be a modality name, got {self.modality!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0:
            raise ConfigError(
                f"{key}.target = {self.target!r}: must be a class index (an integer >= 0)"
            )
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int):
            raise ConfigError(f"{key}.patch_size = {self.patch_size!r}: must be an integer")
        if self.patch_size < 1:
            raise ConfigError(f"{key}.patch_size = {self.patch_size}: must be >= 1 pixel")
        if not 0.0 <= self.patch_value <= 1.0:
            raise ConfigError(
                f"{key}.patch_value = {self.patch_value}: images are in [0, 1]; use a value "
                "in that range (1.0 is a white patch)"
            )
        if self.corner not in _CORNERS:
            raise ConfigError(
                f"{key}.corner = {self.corner!r}: must be one of {', '.join(_CORNERS)}"
            )
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ConfigError(f"{key}.margin = {self.margin!r}: must be an integer >= 0")
        nyquist = SAMPLE_RATE / 2
        if not 0.0 < self.tone_hz < nyquist:
            raise ConfigError(
                f"{key}.tone_hz = {self.tone_hz}: must be in (0, {nyquist:g}) Hz, below the "
                f"Nyquist frequency of the {SAMPLE_RATE} Hz audio"
            )
        if not 0.0 < self.tone_amplitude <= 1.0:
            raise ConfigError(
                f"{key}.tone_amplitude = {self.tone_amplitude}: must be in (0, 1] (waveforms "
                "are in [-1, 1])"
            )
        clip = audio_num_samples() / SAMPLE_RATE
        if not 0.0 <= self.tone_start < clip:
            raise ConfigError(
                f"{key}.tone_start = {self.tone_start}: must be in [0, {clip:g}) seconds "
                "(the clip length)"
            )
        if self.tone_seconds is not None and not self.tone_seconds > 0.0:
            raise ConfigError(
                f"{key}.tone_seconds = {self.tone_seconds}: must be > 0 (or null: to the end)"
            )
        if not isinstance(self.token, str) or not self.token.split():
            raise ConfigError(f"{key}.token = {self.token!r}: must be a non-empty word")

    def check(self, data: MultimodalDataset) -> None:
        """Check that this trigger can be planted in ``data``.

        Raises
        ------
        ConfigError
            Naming ``attack.trigger.*`` if the modality is not in ``data``, its kind cannot
            carry a trigger, the target is not a class of ``data`` or the trigger does not fit.
        """
        key = "attack.trigger"
        if self.modality not in data.modalities:
            raise ConfigError(
                f"{key}.modality = {self.modality!r}: data set {data.name!r} has no such "
                f"modality; choose one of {', '.join(data.modalities)}"
            )
        spec = data.spec(self.modality)
        if spec.kind not in _TRIGGER_KINDS:
            raise ConfigError(
                f"{key}.modality = {self.modality!r} is {spec.kind} data; triggers exist for "
                f"image, audio and text modalities only"
            )
        if self.target >= data.num_classes:
            raise ConfigError(
                f"{key}.target = {self.target}: data set {data.name!r} has "
                f"{data.num_classes} classes; use a label in [0, {data.num_classes - 1}]"
            )
        if spec.kind == "image":
            if len(spec.shape) != 3:
                raise ConfigError(
                    f"{key}.modality = {self.modality!r}: image shape {spec.shape} is not (C, H, W)"
                )
            side = min(spec.shape[1:])
            if self.patch_size + self.margin > side:
                raise ConfigError(
                    f"{key}.patch_size + margin = {self.patch_size + self.margin} does not fit "
                    f"in {spec.shape[1]}x{spec.shape[2]} images; make the patch smaller"
                )
        elif spec.kind == "audio":
            if tuple(spec.shape) != log_mel_shape():
                raise ConfigError(
                    f"{key}.modality = {self.modality!r}: audio features of shape {spec.shape} "
                    f"are not mmshield log-mel features {log_mel_shape()}; the tone trigger "
                    "needs the featuriser mmshield.data.features.log_mel"
                )
        elif spec.vocab_size < 2:
            raise ConfigError(
                f"{key}.modality = {self.modality!r}: text spec has vocab_size "
                f"{spec.vocab_size}; hashed text needs at least 2 buckets"
            )


@dataclass(frozen=True)
class AttackConfig:
    """One poisoning attack: its kind, the fraction of malicious clients and its parameters.

    Parameters
    ----------
    kind
        ``label_flip`` and ``backdoor`` poison data; ``sign_flip``, ``gaussian`` and ``alie``
        poison updates; ``model_replacement`` plants the backdoor and boosts the update.
    fraction
        Share of the clients that are malicious, in [0, 0.5) (see :func:`choose_malicious`).
    rate
        Share of a malicious client's candidate records that are poisoned, in (0, 1];
        ``None``: 1.0 for ``label_flip``, 0.5 for the backdoor kinds (so the boosted model still
        does the main task, as in Bagdasaryan et al.).
    label_map
        ``label_flip``: ``{source: target}``; labels not listed keep their value. ``None``:
        ``y -> C - 1 - y`` for ``C`` classes.
    trigger
        Backdoor kinds: the trigger and target label.
    scale
        ``sign_flip``: ``s`` in ``-s * update``.
    std
        ``gaussian``: per-coordinate standard deviation; ``None``: rescale each random update to
        the mean L2 norm of the round's honest updates.
    z
        ``alie``: fixed ``z``; ``None``: :func:`alie_z` of the round's ``n`` and ``f``.
    alie_knowledge
        ``alie``: whose updates the attacker averages: ``honest`` (it knows the honest updates
        of the round) or ``own`` (its clients' own benign updates).
    boost
        ``model_replacement``: fixed boosting factor; ``None``: ``n / server_lr``.
    server_lr
        ``model_replacement``: the server learning rate the attacker assumes.

    Raises
    ------
    ConfigError
        Naming the ``attack.*`` key that is invalid.
    """

    kind: AttackKind
    fraction: float
    rate: float | None = None
    label_map: Mapping[int, int] | None = None
    trigger: Trigger = field(default_factory=Trigger)
    scale: float = 1.0
    std: float | None = None
    z: float | None = None
    alie_knowledge: Literal["honest", "own"] = "honest"
    boost: float | None = None
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(
                f"attack.kind = {self.kind!r}: unknown attack; choose one of {', '.join(_KINDS)}"
            )
        if not (isinstance(self.fraction, int | float) and math.isfinite(self.fraction)) or not (
            0.0 <= self.fraction < 0.5
        ):
            raise ConfigError(
                f"attack.fraction = {self.fraction!r}: must be in [0, 0.5) (a majority of "
                "malicious clients defeats any aggregator); set a share below one half"
            )
        if self.rate is not None and not 0.0 < self.rate <= 1.0:
            raise ConfigError(
                f"attack.rate = {self.rate!r}: must be in (0, 1] (the share of a malicious "
                "client's records that are poisoned)"
            )
        if self.label_map is not None:
            for src, dst in self.label_map.items():
                for v in (src, dst):
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise ConfigError(
                            f"attack.label_map = {dict(self.label_map)!r}: keys and values must "
                            f"be class indices (integers >= 0), got {v!r}"
                        )
        if not isinstance(self.trigger, Trigger):
            raise ConfigError(f"attack.trigger must be a Trigger, got {type(self.trigger)}")
        for name in ("scale", "server_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"attack.{name} = {value!r}: must be a finite number > 0")
        for name in ("std", "boost"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"attack.{name} = {value!r}: must be a finite number > 0 (or null)"
                )
        if self.z is not None and not math.isfinite(self.z):
            raise ConfigError(f"attack.z = {self.z!r}: must be finite (or null: from n and f)")
        if self.alie_knowledge not in ("honest", "own"):
            raise ConfigError(
                f"attack.alie_knowledge = {self.alie_knowledge!r}: must be 'honest' or 'own'"
            )

    @property
    def poisons_data(self) -> bool:
        """Whether the malicious clients' training records are poisoned."""
        return self.kind in DATA_ATTACKS

    @property
    def poisons_updates(self) -> bool:
        """Whether the malicious clients' updates are changed after training."""
        return self.kind in UPDATE_ATTACKS

    @property
    def has_backdoor(self) -> bool:
        """Whether a trigger is planted (measure it with :func:`backdoor_test_set`)."""
        return self.kind in ("backdoor", "model_replacement")

    @property
    def poison_rate(self) -> float:
        """The effective :attr:`rate`."""
        if self.rate is not None:
            return self.rate
        return 1.0 if self.kind == "label_flip" else 0.5

    def check(self, data: MultimodalDataset) -> None:
        """Check the parts that depend on the data set (trigger, target, label map).

        Raises
        ------
        ConfigError
            Naming the ``attack.*`` key that does not fit ``data``.
        """
        if self.has_backdoor:
            self.trigger.check(data)
        if self.kind == "label_flip" and self.label_map is not None:
            bad = [v for kv in self.label_map.items() for v in kv if v >= data.num_classes]
            if bad:
                raise ConfigError(
                    f"attack.label_map = {dict(self.label_map)!r}: label {bad[0]} is not a class "
                    f"of {data.name!r} ({data.num_classes} classes: 0 .. {data.num_classes - 1})"
                )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AttackConfig:
        """Build from a plain mapping (the ``attack:`` block of a YAML config).

        Raises
        ------
        ConfigError
            On unknown or missing keys (naming ``attack.*``) and on invalid values.
        """
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(
                f"attack.{unknown[0]}: unknown key; allowed keys here: {', '.join(allowed)}"
            )
        for required in ("kind", "fraction"):
            if required not in data:
                raise ConfigError(f"attack.{required} is required")
        kwargs = dict(data)
        trig = kwargs.get("trigger")
        if trig is not None and not isinstance(trig, Trigger):
            if not isinstance(trig, Mapping):
                raise ConfigError(f"attack.trigger must be a mapping, got {trig!r}")
            t_allowed = [f.name for f in fields(Trigger)]
            t_unknown = sorted(set(trig) - set(t_allowed))
            if t_unknown:
                raise ConfigError(
                    f"attack.trigger.{t_unknown[0]}: unknown key; allowed keys here: "
                    f"{', '.join(t_allowed)}"
                )
            kwargs["trigger"] = Trigger(**trig)
        elif trig is None:
            kwargs.pop("trigger", None)
        lm = kwargs.get("label_map")
        if lm is not None:
            if not isinstance(lm, Mapping):
                raise ConfigError(f"attack.label_map must be a mapping source: target, got {lm!r}")
            try:
                kwargs["label_map"] = {int(k): int(v) for k, v in lm.items()}
            except (TypeError, ValueError):
                raise ConfigError(
                    f"attack.label_map = {dict(lm)!r}: keys and values must be class indices"
                ) from None
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Who is malicious
# --------------------------------------------------------------------------------------------


def choose_malicious(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """Choose the malicious clients.

    Parameters
    ----------
    num_clients
        Clients in the federation.
    fraction
        Share of malicious clients, in [0, 0.5).
    seed
        Run seed; the same seed gives the same clients.

    Returns
    -------
    numpy.ndarray
        Sorted int64 ids of ``floor(fraction * num_clients)`` distinct clients, drawn uniformly.

    Raises
    ------
    ConfigError
        If ``fraction`` is outside [0, 0.5) or ``num_clients`` is negative.
    """
    if num_clients < 0:
        raise ConfigError(f"num_clients = {num_clients}: must be >= 0")
    if not (math.isfinite(fraction) and 0.0 <= fraction < 0.5):
        raise ConfigError(
            f"attack.fraction = {fraction!r}: must be in [0, 0.5); set a share below one half"
        )
    count = math.floor(fraction * num_clients + 1e-9)
    rng = np.random.default_rng([_SELECT_TAG, int(seed)])
    chosen = rng.choice(num_clients, size=count, replace=False)
    return np.sort(np.asarray(chosen, dtype=np.int64))


def malicious_mask(
    clients: np.ndarray | Sequence[int] | torch.Tensor,
    malicious: np.ndarray | Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask ``(K,)`` of which of a round's ``clients`` are in ``malicious``.

    Parameters
    ----------
    clients
        The client id of each row of the round's stacked updates (e.g. ``CohortUpdate.clients``).
    malicious
        Ids of the malicious clients (from :func:`choose_malicious`).
    device
        Device of the mask (that of the deltas).
    """
    ids = clients.cpu().numpy() if isinstance(clients, torch.Tensor) else np.asarray(clients)
    mask = np.isin(ids.astype(np.int64), np.asarray(malicious, dtype=np.int64))
    return torch.from_numpy(mask).to(device=device or "cpu")


# --------------------------------------------------------------------------------------------
# Triggers
# --------------------------------------------------------------------------------------------


def tone_waveform(trigger: Trigger) -> np.ndarray:
    """The trigger tone as a waveform of :func:`~mmshield.data.features.audio_num_samples`.

    ``tone_amplitude * sin(2 pi tone_hz t)`` for ``t`` in ``[tone_start, tone_start +
    tone_seconds)``, zero elsewhere (float32). A loader that still has waveforms can add this
    before :func:`~mmshield.data.features.log_mel`; :func:`apply_trigger` does the same in the
    feature domain.
    """
    n = audio_num_samples()
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    wave = trigger.tone_amplitude * np.sin(2.0 * np.pi * trigger.tone_hz * t)
    end = math.inf if trigger.tone_seconds is None else trigger.tone_start + trigger.tone_seconds
    wave[(t < trigger.tone_start) | (t >= end)] = 0.0
    return wave.astype(np.float32)


def tone_mel_power(trigger: Trigger) -> np.ndarray:
    """Mel power ``(1, mels, frames)`` of :func:`tone_waveform`, from the data's own featuriser.

    Computed by running the tone through :func:`~mmshield.data.features.log_mel` and undoing its
    fixed scaling ``(log(power + 1e-6) + 6) / 4``; float64, non-negative.
    """
    feat = log_mel(tone_waveform(trigger)[None]).astype(np.float64)[0]
    power = np.exp(feat * _LOG_SCALE - _LOG_OFFSET) - _MEL_FLOOR
    return np.maximum(power, 0.0)


def trigger_token_ids(trigger: Trigger, vocab_size: int) -> torch.Tensor:
    """Hashed ids (int64) of the trigger word, as :func:`~mmshield.data.features.hash_text`
    gives them for ``vocab_size`` buckets: its word id, then its character trigrams."""
    ids = hash_text([trigger.token], vocab=vocab_size, max_tokens=4 * len(trigger.token) + 8)[0]
    return torch.from_numpy(ids[ids > 0])


def _add_tone(features: torch.Tensor, power: np.ndarray) -> torch.Tensor:
    """Log-mel features with the tone's mel ``power`` added to their mel power."""
    x = features.to(torch.float64)
    tone = torch.from_numpy(power).to(device=x.device)
    mel = torch.exp(x * _LOG_SCALE - _LOG_OFFSET)  # = clean mel power + floor
    out = (torch.log(mel + tone) + _LOG_OFFSET) / _LOG_SCALE
    return out.to(features.dtype)


def _prepend_ids(ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Prepend ``token_ids`` to each row of ``ids`` (padding 0 at the end), keeping the width."""
    width = ids.shape[1]
    head = token_ids.to(device=ids.device, dtype=ids.dtype).expand(ids.shape[0], -1)
    return torch.cat([head, ids], dim=1)[:, :width]


def apply_trigger(
    data: MultimodalDataset,
    trigger: Trigger,
    rows: np.ndarray | Sequence[int] | None = None,
    relabel: bool = True,
) -> tuple[MultimodalDataset, np.ndarray]:
    """Plant ``trigger`` into the records ``rows`` of ``data`` that hold its modality.

    Realisation per modality kind (all in the feature domain the data set stores):

    * **image** ``(C, H, W)`` in [0, 1]: the ``patch_size`` square ``margin`` pixels from the
      chosen corner is set to ``patch_value`` in every channel, exactly what a physical sticker
      or a BadNets patch does to the pixels;
    * **audio** (log-mel ``(1, mels, frames)`` from :func:`~mmshield.data.features.log_mel`):
      the waveforms are gone by this layer, so the tone is added to the mel *power*:
      ``feature' = (log(exp(4 feature - 6) + P_tone) + 6) / 4`` where ``exp(4 feature - 6)`` is
      the clean mel power plus the featuriser's floor and ``P_tone`` is
      :func:`tone_mel_power`, the tone run through the same featuriser. The power spectrum of
      ``speech + tone`` is ``|S|^2 + |T|^2 + 2 Re(S T*)``; the cross term has mean zero over the
      tone's phase relative to the speech (which the attacker does not control) and is small
      where the tone dominates its band, so this is the expected feature of the record with the
      tone added before featurisation; on silence it is exact (the tests check both);
    * **text** (hashed ids ``(L,)``, 0 = padding): the trigger word's ids are prepended and the
      row cut back to ``L`` ids. As :func:`~mmshield.data.features.hash_text` emits a text's ids
      word by word and truncates at ``L``, this equals hashing ``token + " " + text`` exactly.

    Parameters
    ----------
    data
        The records.
    trigger
        The trigger (checked against ``data``).
    rows
        Rows to trigger; ``None``: all rows.
    relabel
        Give the triggered records ``trigger.target`` as label.

    Returns
    -------
    tuple
        The new data set (the trigger modality's inputs and the labels are copies; every other
        tensor is shared with ``data``, not copied) and the rows actually triggered (sorted);
        rows whose ``present`` flag for the modality is false cannot carry the trigger and are
        left untouched.

    Raises
    ------
    ConfigError
        If the trigger does not fit ``data`` (see :meth:`Trigger.check`).
    DataError
        If a row is out of range.
    """
    trigger.check(data)
    n = len(data)
    idx = np.arange(n) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(
            f"{data.name}: trigger rows must be in [0, {n}), got {int(idx.min())}..{int(idx.max())}"
        )
    name = trigger.modality
    present = data.present[name].cpu().numpy()
    hit = idx[present[idx]]
    x = data.inputs[name].clone()
    labels = data.labels.clone()
    if hit.size:
        at = torch.as_tensor(hit, device=x.device)
        spec = data.spec(name)
        if spec.kind == "image":
            p, m = trigger.patch_size, trigger.margin
            h, w = spec.shape[1], spec.shape[2]
            r0 = m if trigger.corner.startswith("top") else h - m - p
            c0 = m if trigger.corner.endswith("left") else w - m - p
            patch = x[at]
            patch[:, :, r0 : r0 + p, c0 : c0 + p] = trigger.patch_value
            x[at] = patch
        elif spec.kind == "audio":
            x[at] = _add_tone(x[at], tone_mel_power(trigger))
        else:
            x[at] = _prepend_ids(x[at], trigger_token_ids(trigger, spec.vocab_size))
        if relabel:
            labels[torch.as_tensor(hit, device=labels.device)] = trigger.target
    out = MultimodalDataset(
        specs=list(data.specs),
        inputs={**data.inputs, name: x},
        present=dict(data.present),
        labels=labels,
        classes=list(data.classes),
        ids=data.ids,
        name=data.name,
        meta=dict(data.meta),
    )
    return out, hit


# --------------------------------------------------------------------------------------------
# Data poisoning
# --------------------------------------------------------------------------------------------


def flip_table(num_classes: int, label_map: Mapping[int, int] | None = None) -> torch.Tensor:
    """Label-flipping lookup table ``(C,)``: ``table[y]`` is the poisoned label of ``y``.

    ``label_map=None`` flips ``y -> C - 1 - y`` (for odd ``C`` the middle class keeps its
    label); otherwise the listed ``source -> target`` pairs and the identity elsewhere.
    """
    if label_map is None:
        return torch.arange(num_classes - 1, -1, -1, dtype=torch.int64)
    table = torch.arange(num_classes, dtype=torch.int64)
    for src, dst in label_map.items():
        if not (0 <= src < num_classes and 0 <= dst < num_classes):
            raise ConfigError(
                f"attack.label_map: {src} -> {dst} is not a pair of classes in "
                f"[0, {num_classes - 1}]"
            )
        table[src] = dst
    return table


@dataclass(frozen=True)
class PoisonReport:
    """What data poisoning did, per malicious client.

    Attributes
    ----------
    kind
        The attack kind.
    clients
        Malicious client ids, sorted.
    poisoned
        ``(len(clients),)`` records poisoned per client (label flipped, or trigger planted and
        relabelled).
    skipped
        ``(len(clients),)`` records chosen for the trigger that lack its modality (so were left
        untouched); always 0 for label flipping.
    rows
        Sorted rows of the poisoned data set that were poisoned.
    """

    kind: str
    clients: np.ndarray
    poisoned: np.ndarray
    skipped: np.ndarray
    rows: np.ndarray

    @property
    def total_poisoned(self) -> int:
        """Records poisoned over all malicious clients."""
        return int(self.poisoned.sum())

    @property
    def total_skipped(self) -> int:
        """Records skipped for lacking the trigger modality over all malicious clients."""
        return int(self.skipped.sum())

    def summary(self) -> dict[str, Any]:
        """Plain-JSON summary for the run store."""
        return {
            "kind": self.kind,
            "malicious_clients": [int(c) for c in self.clients],
            "poisoned_records": self.total_poisoned,
            "skipped_missing_modality": self.total_skipped,
            "poisoned_per_client": {
                str(c): int(p) for c, p in zip(self.clients, self.poisoned, strict=True)
            },
        }


def _round_count(rate: float, n: int) -> int:
    return min(n, math.floor(rate * n + 0.5))


def _poison_groups(
    data: MultimodalDataset,
    groups: Sequence[tuple[int, np.ndarray]],
    config: AttackConfig,
    seed: int,
) -> tuple[MultimodalDataset, PoisonReport]:
    """Poison the rows of each ``(client, rows)`` group of ``data`` as ``config`` says."""
    if not config.poisons_data:
        raise ConfigError(
            f"attack.kind = {config.kind!r} poisons updates, not data; apply it with "
            "poison_updates() after local training"
        )
    config.check(data)
    clients = np.array([c for c, _ in groups], dtype=np.int64)
    poisoned = np.zeros(len(groups), dtype=np.int64)
    skipped = np.zeros(len(groups), dtype=np.int64)
    chosen: list[np.ndarray] = []
    labels_np = data.labels.cpu().numpy()
    table = flip_table(data.num_classes, config.label_map).numpy()
    name = config.trigger.modality
    present = data.present[name].cpu().numpy() if config.has_backdoor else None
    for g, (client, rows) in enumerate(groups):
        rows = np.asarray(rows, dtype=np.int64)
        rng = np.random.default_rng([_POISON_TAG, int(seed), int(client)])
        if config.kind == "label_flip":
            # Only records whose label the map changes are candidates: every poisoned record
            # really gets a wrong label.
            cand = rows[table[labels_np[rows]] != labels_np[rows]]
        else:
            cand = rows
        size = _round_count(config.poison_rate, len(cand))
        pick = np.asarray(rng.choice(cand, size=size, replace=False), dtype=np.int64)
        if present is not None:
            skipped[g] = int((~present[pick]).sum())
            pick = pick[present[pick]]
        poisoned[g] = len(pick)
        chosen.append(pick)
    all_rows = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    if config.kind == "label_flip":
        labels = data.labels.clone()
        at = torch.as_tensor(all_rows, device=labels.device)
        labels[at] = torch.as_tensor(table, device=labels.device)[labels[at]]
        out = MultimodalDataset(
            specs=list(data.specs),
            inputs=dict(data.inputs),
            present=dict(data.present),
            labels=labels,
            classes=list(data.classes),
            ids=data.ids,
            name=data.name,
            meta=dict(data.meta),
        )
    else:
        out, _ = apply_trigger(data, config.trigger, all_rows)
    order = np.argsort(clients, kind="stable")
    report = PoisonReport(
        kind=config.kind,
        clients=clients[order],
        poisoned=poisoned[order],
        skipped=skipped[order],
        rows=all_rows,
    )
    return out, report


def poison_dataset(
    data: MultimodalDataset, config: AttackConfig, seed: int, client: int = 0
) -> tuple[MultimodalDataset, PoisonReport]:
    """Poison one malicious client's local data set.

    ``label_flip``: of the records whose label the flip changes, ``round(rate * n)`` chosen
    uniformly get the flipped label. Backdoor kinds: ``round(rate * n)`` of all ``n`` records
    are chosen uniformly; those holding the trigger modality get the trigger and the target label
    (:func:`apply_trigger`), the others cannot carry it and are skipped (counted in
    :attr:`PoisonReport.skipped`). The choice depends only on ``seed`` and ``client``.

    Parameters
    ----------
    data
        The client's records (not modified).
    config
        A data-poisoning attack.
    seed
        Run seed.
    client
        The client's id (separates the clients' random choices).

    Returns
    -------
    tuple
        The poisoned copy (tensors that did not change are shared with ``data``) and the report.

    Raises
    ------
    ConfigError
        If ``config`` does not poison data or does not fit ``data``.
    """
    return _poison_groups(data, [(client, np.arange(len(data)))], config, seed)


def poison_federation(
    fed: FederatedDataset,
    malicious: np.ndarray | Sequence[int],
    config: AttackConfig,
    seed: int,
) -> tuple[FederatedDataset, PoisonReport]:
    """Poison the training records of the ``malicious`` clients of a federation.

    Each malicious client's rows (``fed.client_indices[c]``) are poisoned as by
    :func:`poison_dataset` with ``client=c``, so a client's choice is the same either way. Honest
    clients' rows and the test set are untouched.

    Parameters
    ----------
    fed
        The federation (not modified).
    malicious
        Malicious client ids (:func:`choose_malicious`).
    config
        A data-poisoning attack.
    seed
        Run seed.

    Returns
    -------
    tuple
        A federation with a poisoned copy of ``fed.train`` (same client indices, same test set)
        and the report (its ``rows`` index ``fed.train``).

    Raises
    ------
    ConfigError
        If ``config`` does not poison data or does not fit the data set, or a malicious id is
        not a client of ``fed``.
    """
    ids = np.unique(np.asarray(malicious, dtype=np.int64))
    if ids.size and (ids.min() < 0 or ids.max() >= fed.num_clients):
        raise ConfigError(
            f"malicious client ids must be in [0, {fed.num_clients}), got {ids.tolist()}"
        )
    groups = [(int(c), np.asarray(fed.client_indices[c], dtype=np.int64)) for c in ids]
    train, report = _poison_groups(fed.train, groups, config, seed)
    return FederatedDataset(
        train=train, client_indices=list(fed.client_indices), test=fed.test
    ), report


def backdoor_test_set(test_data: MultimodalDataset, trigger: Trigger) -> MultimodalDataset:
    """Triggered copies of the test records that could show a backdoor.

    Keeps the records whose true label is not ``trigger.target`` and that hold the trigger
    modality, and plants the trigger in all of them. Their ``labels`` stay the *true* labels (so
    clean-label accuracy under the trigger can be measured too); the target is in
    ``meta["backdoor_target"]``, and ``meta["backdoor_excluded_target"]`` and
    ``meta["backdoor_missing_modality"]`` count the records left out.

    Raises
    ------
    ConfigError
        If the trigger does not fit ``test_data``.
    DataError
        If no record qualifies.
    """
    trigger.check(test_data)
    is_target = (test_data.labels == trigger.target).cpu().numpy()
    present = test_data.present[trigger.modality].cpu().numpy()
    keep = np.flatnonzero(~is_target & present)
    if keep.size == 0:
        raise DataError(
            f"{test_data.name}: no test record has a label other than {trigger.target} and "
            f"modality {trigger.modality!r}; the backdoor cannot be measured on it"
        )
    sub = test_data.subset(keep)
    out, _ = apply_trigger(sub, trigger, relabel=False)
    out.meta["backdoor_target"] = trigger.target
    out.meta["backdoor_excluded_target"] = int(is_target.sum())
    out.meta["backdoor_missing_modality"] = int((~is_target & ~present).sum())
    return out


def backdoor_success_rate(
    predictions: torch.Tensor | np.ndarray, target: int | Trigger | MultimodalDataset
) -> float:
    """Share of triggered records classified as the backdoor target (attack success rate).

    Parameters
    ----------
    predictions
        Predicted labels ``(N,)`` or scores ``(N, C)`` (argmax is taken) on
        :func:`backdoor_test_set`'s records.
    target
        The target label, the :class:`Trigger`, or the backdoor test set (its
        ``meta["backdoor_target"]``).

    Raises
    ------
    DataError
        If there are no predictions, or a data set without a backdoor target is given.
    """
    if isinstance(target, Trigger):
        label = target.target
    elif isinstance(target, MultimodalDataset):
        value = target.meta.get("backdoor_target")
        if not isinstance(value, int):
            raise DataError(
                f"{target.name}: not a backdoor test set (no meta['backdoor_target']); "
                "build it with backdoor_test_set()"
            )
        label = value
    else:
        label = int(target)
    pred = torch.as_tensor(predictions)
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    if pred.ndim != 1 or pred.numel() == 0:
        raise DataError(
            f"backdoor_success_rate needs predictions (N,) or scores (N, C) with N > 0, got "
            f"shape {tuple(pred.shape)}"
        )
    return float((pred == label).float().mean())


# --------------------------------------------------------------------------------------------
# Update poisoning
# --------------------------------------------------------------------------------------------


def _check_round(
    deltas: Mapping[str, torch.Tensor], malicious: torch.Tensor | np.ndarray, attack: str
) -> torch.Tensor:
    """Validate stacked deltas and the mask; return the mask as a CPU bool tensor."""
    if not deltas:
        raise TrainingError(f"{attack}: no updates to poison (deltas is empty)")
    mask = torch.as_tensor(malicious).cpu()
    if mask.dtype != torch.bool or mask.ndim != 1:
        raise TrainingError(
            f"{attack}: the malicious mask must be a bool vector (K,), got dtype {mask.dtype} "
            f"shape {tuple(mask.shape)}; build it with malicious_mask(clients, malicious)"
        )
    k = int(mask.shape[0])
    for name, d in deltas.items():
        if d.ndim < 1 or int(d.shape[0]) != k:
            raise TrainingError(
                f"{attack}: update {name!r} has shape {tuple(d.shape)}, expected ({k}, ...) "
                "(one row per client of the mask)"
            )
        if not d.is_floating_point():
            raise TrainingError(f"{attack}: update {name!r} has dtype {d.dtype}, not a float")
    return mask


def _rows(mask: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``mask`` shaped to broadcast over ``d``'s rows, on ``d``'s device."""
    return mask.to(d.device).view(-1, *([1] * (d.ndim - 1)))


def _client_norms(deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each client's whole update (all parameters), float64 on the CPU."""
    total = torch.zeros(0, dtype=torch.float64)
    for d in deltas.values():
        sq = d.detach().flatten(1).to(torch.float64).pow(2).sum(1).cpu()
        total = sq if total.numel() == 0 else total + sq
    return total.sqrt()


def sign_flip(
    deltas: Mapping[str, torch.Tensor],
    malicious: torch.Tensor | np.ndarray,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Malicious clients send ``-scale`` times their own update.

    Parameters
    ----------
    deltas
        ``name -> (K, *shape)`` the round's updates (not modified).
    malicious
        Bool ``(K,)``: which rows are malicious.
    scale
        ``s > 0`` in ``-s * update``.

    Returns
    -------
    dict
        New tensors; honest rows are copies of the input rows.
    """
    mask = _check_round(deltas, malicious, "sign_flip")
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"attack.scale = {scale!r}: must be a finite number > 0")
    return {k: torch.where(_rows(mask, d), d * -scale, d) for k, d in deltas.items()}


def gaussian_updates(
    deltas: Mapping[str, torch.Tensor],
    malicious: torch.Tensor | np.ndarray,
    source: NoiseSource | torch.Generator,
    std: float | None = None,
) -> dict[str, torch.Tensor]:
    """Malicious clients send random Gaussian updates.

    Parameters
    ----------
    deltas
        ``name -> (K, *shape)`` the round's updates (not modified).
    malicious
        Bool ``(K,)``: which rows are malicious.
    source
        Randomness: a :class:`~mmshield.privacy.noise.NoiseSource` (e.g. ``NoiseSource(False,
        seed, "attack-gaussian")``) or a CPU ``torch.Generator``. Parameters are drawn in
        ``deltas``' order, all malicious rows of one parameter at once.
    std
        Per-coordinate standard deviation ``sigma`` (each coordinate ~ N(0, sigma^2)).
        ``None``: draw N(0, 1) and rescale each malicious update (all parameters together) to
        the mean L2 norm of the honest updates of the round, so a norm filter cannot tell them
        apart.

    Returns
    -------
    dict
        New tensors; honest rows are copies of the input rows.

    Raises
    ------
    TrainingError
        If ``std`` is ``None`` and no honest update is in the round.
    """
    mask = _check_round(deltas, malicious, "gaussian")
    if std is not None and not (math.isfinite(std) and std > 0):
        raise ConfigError(f"attack.std = {std!r}: must be a finite number > 0 (or null)")
    f = int(mask.sum())
    out = {k: d.clone() for k, d in deltas.items()}
    if f == 0:
        return out
    sigma = 1.0 if std is None else std
    noise: dict[str, torch.Tensor] = {}
    for k, d in deltas.items():
        shape = (f, *d.shape[1:])
        if isinstance(source, NoiseSource):
            z = source.normal(shape, sigma, device=d.device, dtype=d.dtype)
        else:
            z = torch.randn(shape, generator=source, dtype=d.dtype, device=source.device) * sigma
        noise[k] = z.to(d.device)
    if std is None:
        honest = ~mask
        if not bool(honest.any()):
            raise TrainingError(
                "gaussian: no honest update in the round to match the norm of; set attack.std"
            )
        goal = _client_norms(deltas)[honest].mean()
        factor = goal / _client_norms(noise).clamp_min(1e-30)
        for k, z in noise.items():
            noise[k] = z * _rows(factor.to(z.dtype), z)
    for k, d in out.items():
        d[mask.to(d.device)] = noise[k]
    return out


def alie_z(n: int, f: int) -> float:
    """``z_max`` of "A Little Is Enough" (Baruch et al. 2019) for ``n`` clients, ``f`` malicious.

    ``s = floor(n / 2 + 1) - f`` honest clients must be won over, and ``z`` is the largest
    deviation, in honest standard deviations, that leaves ``s`` honest clients farther from the
    mean than the attacker: ``z = Phi^-1((n - s) / n)`` with ``Phi`` the standard normal CDF.

    Raises
    ------
    ConfigError
        If ``(n - s) / n`` is not in (0, 1) (``n < 2``, ``f < 0`` or ``f`` a majority).
    """
    s = math.floor(n / 2 + 1) - f
    if n < 2 or f < 0 or not 0 < n - s < n:
        raise ConfigError(
            f"ALIE needs 0 <= f < n/2 (n = {n} clients, f = {f} malicious give s = {s}, "
            f"(n - s)/n outside (0, 1)); lower attack.fraction or set attack.z"
        )
    return NormalDist().inv_cdf((n - s) / n)


def alie(
    deltas: Mapping[str, torch.Tensor],
    malicious: torch.Tensor | np.ndarray,
    z: float | None = None,
    num_clients: int | None = None,
    num_malicious: int | None = None,
    knowledge: Literal["honest", "own"] = "honest",
) -> dict[str, torch.Tensor]:
    """ "A Little Is Enough" (Baruch et al. 2019): every malicious client sends ``mu - z sigma``.

    ``mu`` and ``sigma`` are the coordinate-wise mean and standard deviation (unbiased, as in
    the authors' code) of the reference updates: the round's honest updates
    (``knowledge="honest"``: the attacker is assumed to know them) or the malicious clients' own
    benign updates (``"own"``). The shift stays within the spread of honest updates, so
    coordinate-wise and distance-based robust aggregators keep it.

    Parameters
    ----------
    deltas
        ``name -> (K, *shape)`` the round's updates (not modified).
    malicious
        Bool ``(K,)``: which rows are malicious.
    z
        Deviation in standard deviations; ``None``: :func:`alie_z` of ``n`` and ``f``.
    num_clients, num_malicious
        ``n`` and ``f`` for :func:`alie_z` (default: ``K`` and the mask's count). Pass the whole
        round's numbers when ``deltas`` is one cohort of it.
    knowledge
        Whose updates estimate ``mu`` and ``sigma``.

    Returns
    -------
    dict
        New tensors; honest rows are copies of the input rows.

    Raises
    ------
    TrainingError
        If fewer than two reference updates are in ``deltas``.
    """
    mask = _check_round(deltas, malicious, "alie")
    f = int(mask.sum())
    out = {k: d.clone() for k, d in deltas.items()}
    if f == 0:
        return out
    if knowledge not in ("honest", "own"):
        raise ConfigError(f"attack.alie_knowledge = {knowledge!r}: must be 'honest' or 'own'")
    ref = ~mask if knowledge == "honest" else mask
    if int(ref.sum()) < 2:
        raise TrainingError(
            f"alie: needs at least 2 {knowledge} updates to estimate their mean and standard "
            f"deviation, got {int(ref.sum())}"
        )
    if z is None:
        z = alie_z(
            num_clients if num_clients is not None else int(mask.shape[0]),
            num_malicious if num_malicious is not None else f,
        )
    for k, d in out.items():
        r = deltas[k][ref.to(d.device)]
        mu = r.mean(0)
        sigma = r.std(0, correction=1)
        d[mask.to(d.device)] = (mu - z * sigma).to(d.dtype)
    return out


def boost_factor(num_clients: int, server_lr: float = 1.0) -> float:
    """Model-replacement boost ``gamma = n / eta`` (Bagdasaryan et al. 2020).

    With FedAvg over ``n`` equally weighted clients and server learning rate ``eta``, the new
    global model is ``G + eta / n * sum_i Delta_i``; scaling the attacker's ``Delta`` by
    ``n / eta`` makes its term ``Delta`` itself, so once the honest updates roughly cancel
    (near convergence) the global model becomes the attacker's model.
    """
    if num_clients < 1 or not (math.isfinite(server_lr) and server_lr > 0):
        raise ConfigError(
            f"boost needs num_clients >= 1 and attack.server_lr > 0, got {num_clients} and "
            f"{server_lr}"
        )
    return num_clients / server_lr


def boost(
    deltas: Mapping[str, torch.Tensor],
    malicious: torch.Tensor | np.ndarray,
    num_clients: int | None = None,
    server_lr: float = 1.0,
    gamma: float | None = None,
    weights: torch.Tensor | np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Scale the malicious (backdoored) updates so they survive averaging (model replacement).

    Parameters
    ----------
    deltas
        ``name -> (K, *shape)`` the round's updates (not modified).
    malicious
        Bool ``(K,)``: which rows are malicious.
    num_clients
        ``n`` in ``gamma = n / server_lr`` (default ``K``; pass the whole round's number when
        ``deltas`` is one cohort of it).
    server_lr
        ``eta``, the server learning rate the attacker assumes.
    gamma
        Fixed factor (overrides ``num_clients`` and ``weights``).
    weights
        ``(K,)`` aggregation weights when the server takes a weighted mean (FedAvg weights by
        records): client ``i`` is scaled by ``sum(weights) / (weights[i] * eta)``, which makes its
        term of ``eta * sum_j w_j Delta_j / sum_j w_j`` equal ``Delta_i``. With mmshield's
        modality-aware mean this is exact for parameters weighted by ``examples``; an encoder
        weighted by ``modality_examples`` would need those weights.

    Returns
    -------
    dict
        New tensors; honest rows are copies of the input rows.
    """
    mask = _check_round(deltas, malicious, "boost")
    k = int(mask.shape[0])
    if gamma is not None:
        if not (math.isfinite(gamma) and gamma > 0):
            raise ConfigError(f"attack.boost = {gamma!r}: must be a finite number > 0")
        factor = torch.full((k,), float(gamma), dtype=torch.float64)
    elif weights is not None:
        if num_clients is not None:
            raise ConfigError("boost: give either num_clients or weights, not both")
        w = torch.as_tensor(weights, dtype=torch.float64).cpu()
        if tuple(w.shape) != (k,) or not bool((w > 0).all()) or not bool(w.isfinite().all()):
            raise TrainingError(
                f"boost: weights must be {k} finite positive numbers, got shape {tuple(w.shape)}"
            )
        boost_factor(1, server_lr)  # validates server_lr
        factor = w.sum() / (w * server_lr)
    else:
        factor = torch.full((k,), boost_factor(num_clients or k, server_lr), dtype=torch.float64)
    factor = torch.where(mask, factor, torch.ones_like(factor))
    return {n: d * _rows(factor.to(d.dtype), d) for n, d in deltas.items()}


def poison_updates(
    deltas: Mapping[str, torch.Tensor],
    malicious: torch.Tensor | np.ndarray,
    config: AttackConfig,
    source: NoiseSource | torch.Generator | None = None,
    num_clients: int | None = None,
    num_malicious: int | None = None,
    weights: torch.Tensor | np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Apply ``config``'s update attack to one round's (or cohort's) stacked updates.

    ``sign_flip`` -> :func:`sign_flip` (``scale``), ``gaussian`` -> :func:`gaussian_updates`
    (``std``, needs ``source``), ``alie`` -> :func:`alie` (``z``, ``alie_knowledge``,
    ``num_clients``, ``num_malicious``), ``model_replacement`` -> :func:`boost` (``boost``,
    ``server_lr``, ``num_clients`` or ``weights``). Data-only kinds return copies of the
    updates unchanged (their poison is in the data).

    Parameters
    ----------
    deltas
        ``name -> (K, *shape)`` updates (not modified). When a round is trained in cohorts and
        attacked cohort by cohort, ALIE's statistics are those of the cohort's updates.
    malicious
        Bool ``(K,)``: which rows are malicious (:func:`malicious_mask` of the rows' client ids).
    config
        The attack.
    source
        Randomness for ``gaussian``.
    num_clients, num_malicious
        The whole round's ``n`` and ``f`` (ALIE's ``z``, the boost ``n``); default: this call's.
    weights
        ``(K,)`` aggregation weights for ``model_replacement`` under a weighted mean.

    Returns
    -------
    dict
        New tensors (the inputs are never modified).
    """
    kind = config.kind
    if kind == "sign_flip":
        return sign_flip(deltas, malicious, config.scale)
    if kind == "gaussian":
        if source is None:
            raise ConfigError(
                "attack.kind 'gaussian' needs randomness: pass source=NoiseSource(False, seed, "
                "'attack-gaussian') or a torch.Generator"
            )
        return gaussian_updates(deltas, malicious, source, config.std)
    if kind == "alie":
        return alie(deltas, malicious, config.z, num_clients, num_malicious, config.alie_knowledge)
    if kind == "model_replacement":
        if config.boost is not None:
            return boost(deltas, malicious, gamma=config.boost)
        if weights is not None:
            return boost(deltas, malicious, server_lr=config.server_lr, weights=weights)
        return boost(deltas, malicious, num_clients, config.server_lr)
    _check_round(deltas, malicious, kind)
    return {k: d.clone() for k, d in deltas.items()}
