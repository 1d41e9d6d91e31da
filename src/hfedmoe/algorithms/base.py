"""The interface every federated algorithm implements, in plain torch (no engine imports).

Server side: :meth:`FederatedAlgorithm.configure_client` says what one client downloads and is
asked to do; :meth:`FederatedAlgorithm.aggregation` folds the clients' updates, one at a time,
into the next global weights (:class:`Aggregation`), so a server holds one reply, not all K.
Client side: :meth:`FederatedAlgorithm.train_client` runs local training.

The Flower apps in ``hfedmoe.federation`` only pack and unpack these objects
(``hfedmoe.algorithms.messages``) into messages, so an algorithm never knows which engine
carries it. Adding an algorithm = one new module (a baseline goes in ``baselines/``) that
subclasses :class:`FederatedAlgorithm`, is decorated with :func:`register` and is imported by
``hfedmoe/algorithms/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.maths import accounting
from hfedmoe.algorithms.maths.bounds import adamw_update_bound
from hfedmoe.algorithms.maths.privacy import (
    adaptive_clip_norm,
    clipped_deltas,
    gaussian_like,
    noise_norm_bound,
    sum_noise_std,
)
from hfedmoe.algorithms.mechanics.layout import ExpertLayout
from hfedmoe.algorithms.mechanics.merging import Merge, MergePolicy
from hfedmoe.algorithms.mechanics.privacy import Mechanism, PrivateSum
from hfedmoe.algorithms.mechanics.uploads import (
    REQUIRED_METRICS,
    Range,
    UploadSpec,
    full_upload,
)
from hfedmoe.algorithms.messages import ClientUpdate, TrainRequest, Weights
from hfedmoe.budget import CostModels, Price
from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.foundation.config import (
    DeviceTier,
    ExperimentConfig,
    Section,
    TrainConfig,
    register_section,
)
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.foundation.seeding import PRIVACY, SAMPLING, rng_for, torch_seed_for
from hfedmoe.model.state import load_shared_state
from hfedmoe.training import TrainResult, train_local


class Aggregation(ABC):
    """One round's aggregation: :meth:`add` each accepted update as it arrives (the strategy
    adds them in client order, so sums do not depend on arrival order), then :meth:`finish`,
    then, only if the server accepts the aggregate, :meth:`commit`.
    Nothing of an update may be kept beyond what the algorithm needs (running sums, small
    per-client statistics): the caller frees it after :meth:`add`. Neither :meth:`add` nor
    :meth:`finish` changes the algorithm: what the round teaches it (statistics it keeps about
    clients, the next clipping norm) waits in the aggregation until :meth:`commit`, so a
    refused aggregate leaves the algorithm as it was."""

    @abstractmethod
    def add(self, client: int, update: ClientUpdate) -> None:
        """Fold ``client``'s update into the round."""

    def commit(self) -> None:  # noqa: B027 (a hook: most aggregations teach nothing)
        """Hand the algorithm what this round taught it; called once the server has accepted
        :meth:`finish`'s weights. Default: nothing."""

    @abstractmethod
    def finish(self) -> Weights:
        """The next global weights (after at least one :meth:`add`); the algorithm's own state
        changes only in :meth:`commit`."""

    def defence_counts(self) -> dict[str, float]:
        """What the defences of its :class:`Merge` folds did this round (shares capped, keys
        too sparse for the robust aggregator), summed over the folds it holds."""
        total: dict[str, float] = {}
        for merge in (v for v in vars(self).values() if isinstance(v, Merge)):
            for key, n in merge.counts.items():
                total[key] = total.get(key, 0) + n
        return total


#: the checkpoint's key of adaptive clipping's next norm (beside the algorithm's own state)
DP_CLIP_NORM = "dp_clip_norm"
#: the checkpoint's key of the run's privacy secret (hex), which the noise and samples come from
DP_SECRET = "dp_secret"


class _PrivateRound(Aggregation):
    """A round under ``[privacy]``: DP-FedAvg's release over the algorithm's upload spec
    (``mechanics.privacy``) instead of the algorithm's own weighted means; ``adapt`` gets the
    fold once it has finished (adaptive clipping's next norm)."""

    def __init__(self, fold: PrivateSum, adapt: Callable[[PrivateSum], None]):
        self.fold = fold
        self.adapt = adapt

    def add(self, client: int, update: ClientUpdate) -> None:
        self.fold.add(update)

    def finish(self) -> Weights:
        return self.fold.finish()

    def commit(self) -> None:
        self.adapt(self.fold)

    def defence_counts(self) -> dict[str, float]:
        counts: dict[str, float] = {
            **self.fold.counts,
            "dp_clip_norm": self.fold.mechanism.clip_norm,
        }
        if self.fold.unclipped_fraction is not None:
            counts["dp_unclipped_fraction"] = self.fold.unclipped_fraction
        return counts


class FederatedAlgorithm(ABC):
    """Base class: FedAvg-style download of all weights and upload of trainable ones.

    A client is known by its client id: the partition id of its data, the same on every
    engine (the strategy maps it to the engine's node).
    """

    name: ClassVar[str]
    #: the metrics its clients report besides ``uploads.BASE_METRICS``, with their ranges
    METRICS: ClassVar[dict[str, Range]] = {}
    #: the config key of its learning rate (what ``hfedmoe tune``'s ``lr`` sets)
    RATE_KEY: ClassVar[str] = "train.lr"
    #: the config section of its own parameters, if any (``[hfedmoe]``; a tuning grid's keys
    #: there vary only its runs)
    SECTION: ClassVar[str | None] = None
    #: a plugin's own options: the config's ``[SECTION]`` table, validated by this model
    #: (read with :meth:`options`); the built-in algorithms' sections are the config's own
    OPTIONS: ClassVar[type[Section] | None] = None
    #: why ``[privacy]`` cannot train it (None: it can). The DP release covers the uploaded
    #: tensors; a server that plans rounds from what clients report (assignments from usage,
    #: roles from utilities) would publish those reports unprotected.
    NOT_PRIVATE: ClassVar[str | None] = "it has not been checked under [privacy] yet"
    #: whether every client uploads every tensor of the spec (so noise on each client, local
    #: DP, hides everything it sends); sparse uploads would show the server which experts
    DENSE_UPLOADS: ClassVar[bool] = False

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.budgets: dict[int, int] = {}  # client id -> C_budget, learnt before round 1
        if cfg.privacy.enabled and (why := self.not_private()) is not None:
            raise ConfigError(f"privacy.enabled: algorithm '{self.name}' is not covered: {why}")
        if cfg.privacy.local and not self.DENSE_UPLOADS:
            raise ConfigError(
                f"privacy.noise: 'client' does not cover algorithm '{self.name}': its clients "
                "upload only the experts they trained, so which ones would reach the server in "
                "the clear (expected 'server', or algorithm 'fedavg')"
            )
        self._noise_multiplier: float | None = None
        self._clip_norm = cfg.privacy.clip_norm  # C of the next private round (eq. P4 moves it)
        self._secret: int | None = None  # the run's privacy secret (:meth:`_private_seed`)

    def options(self) -> Section:
        """A plugin's own options (:attr:`OPTIONS`, from the config's ``[SECTION]``)."""
        assert self.SECTION is not None and self.OPTIONS is not None
        return self.cfg.section(self.SECTION)

    def not_private(self) -> str | None:
        """Why ``[privacy]`` cannot train this algorithm as configured (None: it can)."""
        return self.NOT_PRIVATE

    @property
    def holds_subset(self) -> bool:
        """True if clients hold only their assigned experts (strict routing): a device's
        budget then also counts only those experts as resident."""
        return False

    def set_budgets(self, budgets: Mapping[int, int]) -> None:
        """The clients' C_budget(c), from their devices (``hfedmoe.budget``), by client id."""
        self.budgets = dict(budgets)

    # ---- server side -------------------------------------------------------------------
    def upload_spec(self, model: nn.Module) -> UploadSpec:
        """What a client may send (the server rejects anything else). Default: every
        trainable tensor, required; the base metrics and :attr:`METRICS`."""
        return full_upload(model).declare(self.METRICS)

    def train_settings(self) -> TrainConfig:
        """The local training its clients run (``[train]``, unless the algorithm trains
        otherwise)."""
        return self.cfg.train

    def update_bound(self, numel: int, weight_norm: float) -> float:
        """The furthest a client's training can move ``numel`` weights whose global norm is
        ``weight_norm`` (``maths.bounds``): AdamW at :meth:`train_settings`' rate, weight decay
        and steps. An algorithm that trains otherwise says how far it can go."""
        t = self.train_settings()
        return adamw_update_bound(t.lr, t.weight_decay, t.local_steps, numel, weight_norm)

    def merge(self, global_weights: Weights, layout: ExpertLayout | None = None) -> Merge:
        """A running weighted mean of one round's replies (``mechanics.merging``) under the
        config's share cap and robust aggregator (``[federation]``)."""
        fed = self.cfg.federation
        policy = MergePolicy(
            max_client_share=fed.max_client_share if fed.defences else 1.0,
            robust=None if fed.robust == "none" else fed.robust,
            trim_fraction=fed.trim_fraction,
            wide_sums=fed.sum_precision == "wide",
        )
        return Merge(global_weights, layout, policy)

    def noise_multiplier(self) -> float:
        """z of ``[privacy]``: as set, or calibrated so that the planned rounds spend
        ``target_epsilon`` (``maths.accounting``)."""
        if self._noise_multiplier is None:
            p, fed = self.cfg.privacy, self.cfg.federation
            if p.noise_multiplier is not None:
                self._noise_multiplier = p.noise_multiplier
            else:
                assert p.target_epsilon is not None
                sample = None if p.local else min(fed.clients_per_round, fed.num_clients)
                self._noise_multiplier = accounting.noise_for_epsilon(
                    p.target_epsilon, fed.rounds, fed.num_clients, sample, self.privacy_delta()
                )
        return self._noise_multiplier

    def privacy_delta(self) -> float:
        """delta of ``[privacy]``: as set, else ``accounting.default_delta``."""
        delta = self.cfg.privacy.delta
        return accounting.default_delta(self.cfg.federation.num_clients) if delta is None else delta

    def private_aggregation(
        self, server_round: int, global_weights: Weights, spec: UploadSpec, sampled: int
    ) -> Aggregation:
        """The round's fold under ``[privacy]``: DP-FedAvg over ``spec``'s keys with the
        denominator fixed at the ``sampled`` clients (``mechanics.privacy``), its noise drawn
        for (the run's secret, round) (:meth:`_private_seed`)."""
        assert self._clip_norm is not None  # the config requires it with privacy.enabled
        if self.cfg.privacy.local:  # noised already: bound each reply, add nothing
            numel = sum(t.numel() for t in spec.references(global_weights).values())
            bound = self._clip_norm + noise_norm_bound(self.client_noise_std(), numel)
            mechanism = Mechanism(bound, 0.0, sampled)
        else:
            mechanism = Mechanism(
                self._clip_norm, self.noise_multiplier(), sampled, self.count_noise(sampled)
            )
        generator = torch.Generator().manual_seed(self._private_seed(PRIVACY, server_round))
        return _PrivateRound(PrivateSum(global_weights, spec, mechanism, generator), self._adapt)

    def client_noise_std(self) -> float:
        """s = 2zC of each client's own noise under ``privacy.noise = "client"`` (eq. P3 for one
        client's release); 0 otherwise."""
        p = self.cfg.privacy
        if not p.local:
            return 0.0
        assert p.clip_norm is not None  # the config requires it with privacy.enabled
        return sum_noise_std(self.noise_multiplier(), p.clip_norm)

    def noised(
        self, update: ClientUpdate, global_weights: Weights, server_round: int, client: int
    ) -> ClientUpdate:
        """Local DP on the client: its update clipped to C as one vector (eq. P1) plus
        N(0, s^2), s = 2zC, on every coordinate it sends, drawn from a secret of this reply's
        own (from the OS; never sent), or for (seed, round, client) with
        ``privacy.reproducible_noise``. Only the training loss, the step count and the example
        count go with it: the routing counts and timings, which depend on the client's data,
        are left out."""
        p = self.cfg.privacy
        assert p.clip_norm is not None
        deltas, _ = clipped_deltas(update.weights, global_weights, p.clip_norm)
        std = self.client_noise_std()
        seed = (
            torch_seed_for(self.cfg.seed, PRIVACY, server_round, 1 + client)
            if p.reproducible_noise
            else secrets.randbits(63)
        )
        generator = torch.Generator().manual_seed(seed)
        weights = {}
        for key in sorted(deltas):  # one order: reproducible noise
            x = global_weights[key].to(torch.float64) + deltas[key]
            x += gaussian_like(x, std, generator)
            weights[key] = x.to(update.weights[key].dtype)
        # the statistics (FedAvg's: which experts the batches updated) as zeros: the upload is
        # dense, so the server needs none of them, and they would show where the data routed
        return dataclasses.replace(
            update,
            weights=weights,
            metrics={k: v for k, v in update.metrics.items() if k in REQUIRED_METRICS},
            stats={name: torch.zeros_like(t) for name, t in update.stats.items()},
        )

    def count_noise(self, sampled: int) -> float | None:
        """s_b of adaptive clipping's count (None: fixed clipping): as set, else the clients
        sampled / 20 (Andrew et al.), but at least 2z, so that the updates keep most of the
        noise (eq. P5: z_D <= 1.16 z); refused where it leaves them none."""
        p = self.cfg.privacy
        if p.clipping == "fixed":
            return None
        z = self.noise_multiplier()
        s_b = p.count_noise if p.count_noise is not None else max(sampled / 20, 2 * z)
        if s_b <= z:
            raise ConfigError(
                f"privacy.count_noise: {s_b:g} leaves no noise for the updates; expected more "
                f"than the noise multiplier ({z:.4g})"
            )
        return s_b

    def _adapt(self, fold: PrivateSum) -> None:
        """Adaptive clipping's next norm (eq. P4) from the round's noisy count."""
        if fold.unclipped_fraction is not None:
            p = self.cfg.privacy
            self._clip_norm = adaptive_clip_norm(
                fold.mechanism.clip_norm,
                fold.unclipped_fraction,
                p.target_quantile,
                p.clip_learning_rate,
            )

    def sampling_rng(self, server_round: int) -> np.random.Generator:
        """The generator ``server_round``'s clients are sampled with: for (seed, round), or
        under ``[privacy]`` for (the run's secret, round), since sampling amplifies privacy
        only while nobody else can tell who was sampled."""
        if self._secret_draws():
            return np.random.default_rng(self._private_seed(SAMPLING, server_round))
        return rng_for(self.cfg.seed, SAMPLING, server_round)

    def _secret_draws(self) -> bool:
        p = self.cfg.privacy
        return p.enabled and not p.reproducible_noise

    def draw_secret(self) -> None:
        """The run's secret under ``[privacy]`` (without ``reproducible_noise``): 256 bits from
        the OS, drawn by the server as the run starts and kept only in its checkpoint
        (:meth:`checkpoint_state`), so a resumed run draws the same noise and samples."""
        if self._secret_draws() and self._secret is None:
            self._secret = secrets.randbits(256)

    def _private_seed(self, *keys: int) -> int:
        """A seed for a private draw of the server's: from the run's secret, or from the
        config's seed with ``privacy.reproducible_noise``. Whoever knows a seed can subtract
        the noise it drew."""
        if not self._secret_draws():
            return torch_seed_for(self.cfg.seed, *keys)
        self.draw_secret()  # where no server set the run up (a strategy on its own, in tests)
        assert self._secret is not None
        return torch_seed_for(self._secret, *keys)

    def checkpoint_state(self) -> dict:
        """:meth:`state_dict`, under adaptive clipping the next round's clipping norm, and
        under ``[privacy]`` the run's secret: what a checkpoint keeps and a rolled-back round
        restores."""
        state = self.state_dict()
        if self.cfg.privacy.enabled and self.cfg.privacy.clipping == "adaptive":
            state = {**state, DP_CLIP_NORM: self._clip_norm}
        if self._secret is not None:
            state = {**state, DP_SECRET: f"{self._secret:064x}"}
        return state

    def restore_state(self, state: dict) -> None:
        """The inverse of :meth:`checkpoint_state`."""
        state = dict(state)
        if DP_CLIP_NORM in state:
            self._clip_norm = float(state.pop(DP_CLIP_NORM))
        if DP_SECRET in state:
            self._secret = int(state.pop(DP_SECRET), 16)
        self.load_state_dict(state)

    def bind(self, model: nn.Module) -> None:
        """Called once on the server with the initial global model, before round 1, so an
        algorithm can learn where experts and routers live in the weights. Default: nothing."""
        del model

    def configure_round(self, server_round: int, clients: list[int]) -> None:
        """Called with the round's sampled clients before their tasks are configured, for
        algorithms that assign work jointly. Default: nothing."""
        del server_round, clients

    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> TrainRequest:
        """The request for ``client`` in ``server_round``. Default: all weights."""
        return TrainRequest(global_weights, {})

    @abstractmethod
    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        """A fold over this round's updates, starting from ``global_weights``."""

    def aggregate(
        self, server_round: int, global_weights: Weights, updates: Mapping[int, ClientUpdate]
    ) -> Weights:
        """The next global weights from all of a round's updates, keyed by client id: the
        fold of :meth:`aggregation` in client order (what the strategy computes)."""
        fold = self.aggregation(server_round, global_weights)
        for client in sorted(updates):
            fold.add(client, updates[client])
        weights = fold.finish()
        fold.commit()
        return weights

    # ---- client side -------------------------------------------------------------------
    def train_client(
        self,
        model: nn.Module,
        data: TokenizedDataset,
        request: TrainRequest,
        rng: np.random.Generator,
    ) -> ClientUpdate:
        """Local training; default: every trainable parameter, uploaded in full."""
        load_shared_state(model, request.weights)
        return self._update(model, data, train_local(model, data, self.cfg.train, rng))

    @staticmethod
    def _update(
        model: nn.Module,
        data: TokenizedDataset,
        result: TrainResult,
        weights: Weights | None = None,
    ) -> ClientUpdate:
        """The reply after local training: ``weights`` (default: every trainable parameter),
        |D_c|, metrics and per-expert update counts."""
        trained = (
            weights
            if weights is not None
            else {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        )
        measured = result.peak_memory_increase
        return ClientUpdate(
            weights=trained,
            num_examples=len(data),
            metrics={
                **({} if measured is None else {"memory_measured_bytes": float(measured)}),
                "train_loss": result.mean_loss,
                "train_seconds": result.seconds,
                "steps": float(result.steps),
                "experts_updated": float((result.expert_updates > 0).sum()),
                "experts_routed": float(result.routed.sum()),
                "max_active_per_step": float(result.max_active_per_step),
                "experts_routed_per_step": result.routed_per_step,
            },
            stats={"expert_updates": result.expert_updates},
        )

    def personal_weights(self, global_weights: Weights, memory: Weights) -> Weights | None:
        """A client's personal model, from what its node keeps between rounds (``memory``,
        ``TrainRequest.memory``) and the global weights: the tensors of the global weights it
        replaces, by name (empty: its model is the global one). None (the default): the
        algorithm keeps no personal model, and a client's model is the global one.

        The server evaluates these where it can read the nodes' state (the embedded engine)."""
        del global_weights, memory
        return None

    def round_metrics(self) -> dict[str, float]:
        """Scalars about the last aggregation, recorded in the round's metrics. Default: none."""
        return {}

    # ---- the device budget (client side) -------------------------------------------------
    def device_budget(self, costs: CostModels, tier: DeviceTier | None) -> int:
        """What a client tells the server about its device before round 1 (the server's
        ``budgets``): C_budget(c), the most experts per batch it can train (METHOD.md §6)."""
        return costs.at().expert_budget(tier, self.holds_subset)

    def priced(self, costs: CostModels, request: TrainRequest) -> Price:
        """What ``request`` asks of the client's device (``request.device``): experts per
        batch, experts held; a request beyond the device fails the round."""
        model = costs.at()
        experts = request.requested_experts(model.num_experts)
        return Price(model, experts, experts if self.holds_subset else None)

    # ---- state that outlives a round (resume) ------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


ALGORITHMS: dict[str, type[FederatedAlgorithm]] = {}


def register(cls: type[FederatedAlgorithm]) -> type[FederatedAlgorithm]:
    """Class decorator: make an algorithm selectable by its ``name`` in the config."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm '{cls.name}' registered twice")
    if cls.OPTIONS is not None:
        if cls.SECTION is None:
            raise ValueError(f"algorithm '{cls.name}': OPTIONS needs a SECTION to live in")
        register_section(cls.SECTION, cls.OPTIONS)
    ALGORITHMS[cls.name] = cls
    return cls


def build_algorithm(cfg: ExperimentConfig) -> FederatedAlgorithm:
    try:
        cls = ALGORITHMS[cfg.algorithm]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ConfigError(
            f"algorithm: unknown '{cfg.algorithm}' (expected one of: {known})"
        ) from None
    return cls(cfg)
