"""Typed run configuration (pydantic), loaded from YAML.

Unknown keys are refused and every error names the key, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmshield.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestModalityConfig(_Strict):
    """One modality of a manifest data set."""

    kind: Literal["image", "audio", "text", "tabular"]
    column: str | None = None
    columns: list[str] = Field(default_factory=list)
    size: int | None = Field(default=None, ge=1)
    image_size: int = Field(default=28, ge=4, le=512)
    channels: Literal[1, 3] = 1


class DatasetConfig(_Strict):
    """Where the records come from."""

    name: Literal["av-digits", "fedprox-synthetic", "manifest"] = "av-digits"
    alpha: float = Field(default=1.0, ge=0, description="fedprox-synthetic: model heterogeneity")
    beta: float = Field(default=1.0, ge=0, description="fedprox-synthetic: feature heterogeneity")
    path: Path | None = Field(default=None, description="manifest: JSONL or CSV file")
    modalities: dict[str, ManifestModalityConfig] = Field(default_factory=dict)
    id_column: str = "id"
    label_column: str = "label"
    classes: list[str] | None = None
    on_bad_record: Literal["fail", "skip"] = "fail"
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="manifest: held-out share")

    @model_validator(mode="after")
    def _manifest_needs_path(self) -> DatasetConfig:
        if self.name == "manifest" and (self.path is None or not self.modalities):
            raise ValueError("dataset.name 'manifest' needs dataset.path and dataset.modalities")
        return self


class PartitionConfig(_Strict):
    """How records and modalities are spread over clients."""

    clients: int = Field(default=20, ge=1)
    scheme: Literal["iid", "dirichlet", "quantity", "natural"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0, description="dirichlet label-skew concentration")
    beta: float = Field(default=1.0, gt=0, description="quantity-skew concentration")
    missing_modality: dict[str, float] = Field(
        default_factory=dict, description="modality -> probability a client lacks it entirely"
    )


class ModelConfig(_Strict):
    """Architecture."""

    fusion: Literal["attention", "concat"] = "attention"
    embed_dim: int = Field(default=64, ge=1)
    fusion_hidden: int = Field(default=64, ge=0)


class PhaseConfig(_Strict):
    """Some rounds that read only some modalities and train only some parameters.

    Its DP noise is charged only to the modalities it reads (see ``privacy.sample_level``).
    """

    name: str = Field(min_length=1)
    rounds: int = Field(ge=1)
    modalities: list[str] | None = Field(
        default=None,
        min_length=1,
        description="modalities the phase reads (default: all); records holding none sit out",
    )
    trainable: list[str] | None = Field(
        default=None,
        min_length=1,
        description="parameter name patterns (fnmatch) to train; default: the encoders of the "
        "phase's modalities, fusion.* and head.*",
    )


class TrainingConfig(_Strict):
    """Federated training."""

    rounds: int = Field(default=20, ge=1, description="with phases: their sum (may be omitted)")
    phases: list[PhaseConfig] | None = Field(
        default=None, min_length=1, description="train in phases (default: one phase, all data)"
    )
    clients_per_round: int | None = Field(default=None, ge=1, description="default: all clients")
    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    proximal_mu: float = Field(default=0.0, ge=0, description="FedProx proximal term (0: off)")
    eval_every: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _rounds_from_phases(cls, data: Any) -> Any:
        phases = data.get("phases") if isinstance(data, dict) else None
        if isinstance(phases, list) and "rounds" not in data:
            try:
                rounds = sum(int(p["rounds"] if isinstance(p, dict) else p.rounds) for p in phases)
            except (KeyError, TypeError, ValueError, AttributeError):
                return data  # the field validators name what is wrong
            return {**data, "rounds": rounds}
        return data

    @model_validator(mode="after")
    def _phase_rounds(self) -> TrainingConfig:
        if self.phases is None:
            return self
        total = sum(p.rounds for p in self.phases)
        if self.rounds != total:
            raise ValueError(
                f"training.rounds is {self.rounds} but the phases add up to {total} rounds; "
                "omit training.rounds or make them agree"
            )
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"training.phases: phase names must differ, got {names}")
        return self


class ServerConfig(_Strict):
    """How the server turns the mean client update into the next model."""

    strategy: Literal[
        "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedbuff"
    ] = "fedavg"
    lr: float | None = Field(
        default=None, gt=0, description="server learning rate; default per strategy"
    )
    momentum: float = Field(default=0.0, ge=0, lt=1, description="fedavgm server momentum")
    beta_1: float | None = Field(default=None, ge=0, lt=1, description="adaptive: first moment")
    beta_2: float = Field(default=0.99, ge=0, lt=1, description="adaptive: second moment")
    tau: float = Field(default=1e-3, gt=0, description="adaptive: adaptivity")
    buffer_size: int = Field(default=10, ge=1, description="fedbuff: updates per server step")
    staleness_exponent: float = Field(
        default=0.5, ge=0, description="fedbuff: discount (1 + staleness)^-a"
    )
    client_quality: dict[int, float | dict[str, float]] = Field(
        default_factory=dict,
        description="client -> quality score (or modality -> score) multiplying its weight",
    )

    @model_validator(mode="after")
    def _quality_non_negative(self) -> ServerConfig:
        for client, q in self.client_quality.items():
            scores = q.values() if isinstance(q, dict) else [q]
            if any(not 0 <= v < float("inf") for v in scores):
                raise ValueError(
                    f"server.client_quality.{client}: scores must be finite and >= 0 (got {q})"
                )
        return self


class DistributionConfig(_Strict):
    """A per-client distribution (see :class:`mmshield.runtime.systems.Distribution`)."""

    kind: Literal["constant", "uniform", "lognormal", "pareto", "beta"] = "constant"
    value: float = Field(default=1.0, gt=0, description="constant value; lognormal median")
    low: float = Field(default=0.0, ge=0, description="uniform: lower end")
    high: float = Field(default=1.0, gt=0, description="uniform: upper end")
    sigma: float = Field(default=1.0, gt=0, description="lognormal: log-standard deviation")
    shape: float = Field(default=1.5, gt=0, description="pareto: tail index (smaller: heavier)")
    a: float = Field(default=1.0, gt=0, description="beta: first shape")
    b: float = Field(default=1.0, gt=0, description="beta: second shape")

    @model_validator(mode="after")
    def _ordered(self) -> DistributionConfig:
        if self.kind == "uniform" and self.low > self.high:
            raise ValueError(f"uniform needs low <= high (got low={self.low}, high={self.high})")
        return self


class SystemsConfig(_Strict):
    """Systems heterogeneity of the simulated clients, on a simulated clock."""

    speed: DistributionConfig = Field(
        default_factory=DistributionConfig, description="relative compute speed per client"
    )
    step_seconds: float = Field(default=0.1, gt=0, description="seconds per step at speed 1")
    bandwidth_mbps: float | None = Field(default=None, gt=0, description="each way; None: free")
    availability: DistributionConfig = Field(
        default_factory=DistributionConfig, description="probability a client is online"
    )
    dropout: float = Field(default=0.0, ge=0, le=1, description="a sampled client drops out")
    stragglers: float = Field(default=0.0, ge=0, le=1, description="fraction doing partial work")
    deadline: float | None = Field(default=None, gt=0, description="round deadline (seconds)")
    partial_work: Literal["aggregate", "drop"] = "aggregate"

    @model_validator(mode="after")
    def _availability_is_probability(self) -> SystemsConfig:
        a = self.availability
        if a.kind in ("lognormal", "pareto"):
            raise ValueError(
                f"systems.availability.kind {a.kind!r} is not a probability; "
                "use constant, uniform or beta"
            )
        if (a.kind == "constant" and a.value > 1) or (a.kind == "uniform" and a.high > 1):
            raise ValueError("systems.availability values are probabilities and must be <= 1")
        return self


class SampleLevelDPConfig(_Strict):
    """DP-SGD in every client's local training (record-level guarantee)."""

    epsilon: float | dict[str, float] | None = Field(
        default=None,
        description="target ε (calibrates noise): one figure, or one per modality (a budget "
        "per modality; the planner sets each phase's noise)",
    )
    noise_multiplier: float | None = Field(default=None, gt=0, description="or a fixed σ")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0, description="per-record clipping norm")

    @field_validator("epsilon")
    @classmethod
    def _positive(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(not e > 0 for e in values):
            raise ValueError("every ε must be > 0")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> SampleLevelDPConfig:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "give exactly one of privacy.sample_level.epsilon (the noise is calibrated) "
                "and privacy.sample_level.noise_multiplier (the ε is computed)"
            )
        return self


class AdaptiveClippingConfig(_Strict):
    """Quantile-tracking clip norm (Andrew et al. 2021)."""

    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    learning_rate: float = Field(default=0.2, gt=0)
    count_noise: float | None = Field(default=None, gt=0, description="default: clients / 20")


class ClientLevelDPConfig(_Strict):
    """DP-FedAvg: a guarantee for each whole client (Poisson client sampling, clipped updates).

    ``noise`` places the Gaussian noise: ``central`` (the server adds it to the sum),
    ``distributed`` (each client adds a share; the sum carries the whole, what secure
    aggregation needs) or ``local`` (each client adds all of it: local DP against the server).
    """

    epsilon: float | None = Field(default=None, gt=0, description="target ε (calibrates noise)")
    noise_multiplier: float | None = Field(default=None, gt=0, description="or a fixed z")
    delta: float = Field(default=1e-3, gt=0, lt=1, description="below 1 / number of clients")
    clip_norm: float = Field(default=1.0, gt=0, description="initial or fixed update clip norm")
    adaptive: AdaptiveClippingConfig | None = None
    noise: Literal["central", "distributed", "local"] = Field(
        default="central", description="who adds the noise: the server, client shares, clients"
    )
    reporting_fraction: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="distributed: shares sized so the planned z holds if this fraction reports",
    )
    max_participation: int | None = Field(
        default=None,
        ge=1,
        description="distributed under secure_aggregation: most rounds one client takes part in",
    )

    @model_validator(mode="after")
    def _one_of(self) -> ClientLevelDPConfig:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "give exactly one of privacy.client_level.epsilon and "
                "privacy.client_level.noise_multiplier"
            )
        if self.noise == "local" and self.adaptive is not None:
            raise ValueError(
                "privacy.client_level.adaptive cannot be used with privacy.client_level.noise "
                "'local': the clipped-count bit would need local DP too; remove "
                "privacy.client_level.adaptive (fixed clip_norm) or use noise 'central' or "
                "'distributed'"
            )
        if self.noise != "distributed" and "reporting_fraction" in self.model_fields_set:
            raise ValueError(
                "privacy.client_level.reporting_fraction only applies to noise 'distributed' "
                f"(noise is {self.noise!r}); remove it or set privacy.client_level.noise: "
                "distributed"
            )
        return self


class PrivacyConfig(_Strict):
    """Differential privacy of the run."""

    sample_level: SampleLevelDPConfig | None = None
    client_level: ClientLevelDPConfig | None = None
    accountant: Literal["pld", "rdp"] = "pld"
    secure_noise: bool = Field(
        default=True, description="noise and sampling from os.urandom-keyed ChaCha20 (else: seed)"
    )
    ledger: Path | None = Field(
        default=None, description="privacy ledger (default: $MMSHIELD_LEDGER or the data dir)"
    )


class SecureAggregationConfig(_Strict):
    """Secure aggregation (SecAgg+): the server learns only the sum of each round's updates."""

    protocol: Literal["secagg+", "secagg"] = Field(
        default="secagg+", description="secagg+: sparse neighbour graph; secagg: complete graph"
    )
    bits: int = Field(default=32, ge=8, le=64, description="sums are computed mod 2^bits")
    clip_range: float = Field(
        default=1.0, gt=0, description="update values are encoded in [-c, c]; outside: clipped"
    )
    dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout rate to tolerate")
    collusion: float = Field(
        default=0.0, ge=0, lt=0.5, description="fraction of clients that may collude"
    )
    failure_bits: float = Field(
        default=10.0,
        gt=0,
        description="at the declared dropout a round fails with probability <= 2^-failure_bits",
    )


class EncryptionConfig(_Strict):
    """Homomorphically encrypted aggregation: the server adds ciphertexts, a key holder decrypts
    only the sum (:mod:`mmshield.crypto.ckks`)."""

    key_holder: Literal["client", "shared"] = Field(
        default="client",
        description="client: one designated client holds the secret key; shared: every client",
    )
    clip_range: float = Field(
        default=1.0, gt=0, description="update values are quantised in [-c, c]; outside: clipped"
    )
    max_bytes_per_param: float = Field(
        default=10.0, gt=0, description="ciphertext budget per value (sets the fixed-point scale)"
    )


class SimulationConfig(_Strict):
    """Where and how the simulator runs."""

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    cohort_size: int | None = Field(default=None, ge=1, description="default: fit 2 GB")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")


class RunConfig(_Strict):
    """A whole run: data, partition, model, training, server, simulator."""

    name: str = "run"
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    systems: SystemsConfig | None = Field(
        default=None, description="client speeds, availability, dropouts (None: ideal clients)"
    )
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig | None = Field(
        default=None, description="SecAgg+ for every round's sum (None: plaintext sums)"
    )
    encryption: EncryptionConfig | None = Field(
        default=None, description="encrypted aggregation of every round's sum (None: plaintext)"
    )

    @model_validator(mode="after")
    def _sound_combinations(self) -> RunConfig:
        if self.privacy.client_level is not None:
            if self.privacy.sample_level is not None:
                raise ValueError(
                    "privacy.sample_level and privacy.client_level together are not supported yet; "
                    "choose the unit of privacy (a record or a whole client)"
                )
            if self.server.strategy in ("scaffold", "fedbuff"):
                raise ValueError(
                    f"privacy.client_level with server.strategy {self.server.strategy!r} is "
                    "refused: SCAFFOLD's control variates and FedBuff's asynchronous updates "
                    "are released outside the clipped, noised mean"
                )
        dp = self.privacy.client_level
        if (
            dp is not None
            and dp.max_participation is not None
            and (self.secure_aggregation is None or dp.noise != "distributed")
        ):
            raise ValueError(
                "privacy.client_level.max_participation applies to distributed noise under "
                "secure_aggregation only (there it caps the rounds a client is charged for); "
                "remove it, or add a secure_aggregation block with noise: distributed"
            )
        if self.privacy.sample_level is not None and self.server.strategy == "fedbuff":
            raise ValueError(
                "privacy.sample_level with server.strategy 'fedbuff' is refused: an asynchronous "
                "client may train more often than once per server step, which the record-level "
                "accounting (one local training per round) does not cover"
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_sound(self) -> RunConfig:
        if self.secure_aggregation is None:
            return self
        if self.server.strategy in ("fedbuff", "scaffold"):
            why = (
                "FedBuff applies each client's update on its own as it arrives"
                if self.server.strategy == "fedbuff"
                else "SCAFFOLD's control variates would be sent outside the secure sum"
            )
            raise ValueError(
                f"secure_aggregation with server.strategy {self.server.strategy!r} is refused: "
                f"{why}; use fedavg, fedavgm, fedadam, fedyogi or fedadagrad"
            )
        dp = self.privacy.client_level
        if dp is not None:
            if dp.noise != "distributed":
                raise ValueError(
                    f"secure_aggregation with privacy.client_level.noise {dp.noise!r} is refused: "
                    "the server would see an un-noised sum (central) or the sum of noise the "
                    "clients already added in full (local); set privacy.client_level.noise: "
                    "distributed (each client adds a Skellam noise share inside the secure sum)"
                )
            if dp.adaptive is not None:
                raise ValueError(
                    "secure_aggregation with privacy.client_level.adaptive is not supported yet "
                    "(the clipped count would need its own secure, noised sum); remove "
                    "privacy.client_level.adaptive and set a fixed clip_norm"
                )
            if dp.epsilon is None:
                raise ValueError(
                    "secure_aggregation with privacy.client_level needs privacy.client_level."
                    "epsilon (the Skellam noise and its fixed-point scale are calibrated to it) "
                    "instead of noise_multiplier"
                )
        if self.training.clients_per_round is not None and self.training.clients_per_round < 2:
            raise ValueError(
                "secure_aggregation needs training.clients_per_round >= 2: the sum of one "
                "client's update is that update"
            )
        return self

    @model_validator(mode="after")
    def _encryption_sound(self) -> RunConfig:
        if self.encryption is None:
            return self
        if self.secure_aggregation is not None:
            raise ValueError(
                "encryption and secure_aggregation together are not supported: each already "
                "hides the individual updates from the server; keep one of the two blocks"
            )
        if self.server.strategy in ("fedbuff", "scaffold"):
            why = (
                "FedBuff applies each client's update on its own as it arrives"
                if self.server.strategy == "fedbuff"
                else "SCAFFOLD's control variates would be sent in the clear"
            )
            raise ValueError(
                f"encryption with server.strategy {self.server.strategy!r} is refused: {why}; use "
                "fedavg, fedavgm, fedadam, fedyogi or fedadagrad"
            )
        if self.privacy.client_level is not None:
            raise ValueError(
                "encryption with privacy.client_level is not supported: the key holder would "
                "decrypt an un-noised sum of clipped updates; use secure_aggregation with "
                "privacy.client_level.noise: distributed, or privacy.sample_level"
            )
        return self

    @model_validator(mode="after")
    def _phases_supported(self) -> RunConfig:
        if self.training.phases is None:
            return self
        if self.privacy.client_level is not None:
            raise ValueError(
                "training.phases with privacy.client_level is not supported yet (the planner "
                "budgets records); use privacy.sample_level or a single phase"
            )
        if self.server.strategy in ("scaffold", "fedbuff"):
            raise ValueError(
                f"training.phases with server.strategy {self.server.strategy!r} is not supported; "
                "use fedavg, fedavgm, fedadam, fedyogi or fedadagrad"
            )
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at ``loc``'s parent, walking nested models."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if current is None and args:  # dict[str, Model]: the key is a free name
            current = next(
                (a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None
            )
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    return list(current.model_fields)


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a mapping into a :class:`RunConfig`.

    Raises
    ------
    ConfigError
        Naming every bad key, its value and what is allowed.
    """
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid configuration:"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(RunConfig, err["loc"])
                hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
                lines.append(f"  {key}: unknown key{hint}")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a YAML config file.

    Relative ``dataset.path`` values are resolved against the config file's directory.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; `mmshield init` writes one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    dataset = raw.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
        p = Path(dataset["path"])
        if not p.is_absolute():
            dataset["path"] = str((path.parent / p).resolve())
    return config_from_dict(raw, source=str(path))


def config_to_yaml(config: RunConfig) -> str:
    """Serialise a config to YAML (paths as strings)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
