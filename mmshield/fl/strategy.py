"""The server-optimiser interface and the registry of strategies selectable by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from mmshield.errors import ConfigError
from mmshield.fl.fedadagrad import FedAdagrad
from mmshield.fl.fedadam import FedAdam
from mmshield.fl.fedavg import FedAvg
from mmshield.fl.fedavgm import FedAvgM
from mmshield.fl.fedyogi import FedYogi


class ServerOptimizer(Protocol):
    """Turns the round's mean client delta into the next global model."""

    def step(
        self,
        global_params: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        round: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Return the new global parameters; parameters absent from ``mean_delta`` are kept."""
        ...


STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedbuff")


def make_server_optimizer(
    name: str,
    *,
    lr: float | None = None,
    momentum: float = 0.0,
    beta_1: float | None = None,
    beta_2: float = 0.99,
    tau: float = 1e-3,
) -> ServerOptimizer:
    """Build a server optimiser by name.

    Parameters
    ----------
    name
        One of :data:`STRATEGIES` (``scaffold`` also needs ``simulate(..., scaffold=True)``,
        ``fedbuff`` the asynchronous runtime :mod:`mmshield.runtime.asynchronous`).
    lr
        Server learning rate (``eta`` for the adaptive ones); ``None`` takes each strategy's
        default (1.0 for FedAvg/FedAvgM, 0.1 for FedAdam/FedAdagrad, 0.01 for FedYogi).
    momentum
        FedAvgM's server momentum.
    beta_1, beta_2, tau
        Adaptive optimisers' moment decays and adaptivity (``beta_1`` default: 0.9, and 0 for
        FedAdagrad).
    """
    if name in ("fedavg", "scaffold", "fedbuff"):  # SCAFFOLD's and FedBuff's server step is
        # FedAvg's (control variates live in mmshield.fl.scaffold, the buffer in
        # mmshield.fl.fedbuff; the runtime switches them on)
        return FedAvg(server_lr=1.0 if lr is None else lr)
    if name == "fedavgm":
        return FedAvgM(server_lr=1.0 if lr is None else lr, momentum=momentum)
    classes = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
    if name not in classes:
        raise ConfigError(f"server.strategy {name!r} is unknown; use one of {list(STRATEGIES)}")
    cls = classes[name]
    kwargs: dict[str, float] = {"beta_2": beta_2, "tau": tau}
    if lr is not None:
        kwargs["eta"] = lr
    if beta_1 is not None:
        kwargs["beta_1"] = beta_1
    return cls(**kwargs)
