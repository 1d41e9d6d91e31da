"""FLUX (Chen, Wan, Li, Su, Yu; arXiv 2508.19078; EuroSys 2026): federated fine-tuning of MoE
models on small devices by tuning a few experts and merging the rest.

Neither the paper's full text nor its code could be had; METHOD.md §9a specifies it from the
abstract and secondary notes, and every choice it leaves open is an option of ``[flux]``
(``FluxConfig``) with METHOD.md's default. Per participant i and round r, the eight steps:

1. **Stale profiling** (client, :func:`profile_experts`): a forward pass over all of D_i, in
   eval mode, of the previous global model: per expert the share f_e of the tokens routed to
   it, the samples D_i^e routed to it, and a_e, the mean attention the tokens routed to it
   receive in the block's own attention (the column mean of the attention probabilities over
   real queries, averaged over heads; 1 where the model exposes no attention weights). FLUX
   profiles a 4-bit copy; here it is fp32 (METHOD.md allows it on small models;
   ``profile_precision`` in the metrics says so): the bitsandbytes 4-bit kernels need a GPU.
   Which model, and how it is charged: the note "Profiling" below (``profiling``).
2. **Utility** (FLUX's eq. (3), ``maths.flux.utility``): u_i(e) = |D_i^e| sqrt(mean g_k), g_k a
   sample's squared gradient norm w.r.t. expert e. Decision: g_k is estimated per batch, as
   the squared norm of the batch loss's gradient w.r.t. e (every sample of the batch shares
   it); per-sample gradients would cost a backward pass per sample. A client's first report
   gives u = f_e for every expert; an expert without a fresh estimate keeps its last utility
   (the server keeps each client's table).
3. **Roles** (server, FLUX's eq. (4), ``maths.flux.assign_roles``): E_i = the top-B_tune(i)
   experts by utility; the best eps_t |E_i| are *exploit* experts (trained), the rest
   *explore* experts drawn at random outside E_i (held unmerged, forward-only; their utility
   is refreshed by SPSA: one two-sided probe per local batch, sigma = 1e-3, in eval mode,
   the explore experts taken in turn, and only on a batch that routed a token to the probed
   one: the note "SPSA" below, ``spsa_batches``). eps_t = min(eps_max, eps_0 + delta t),
   0.3 to 0.9 at half the rounds. A client the server has no utilities for yet is assigned by
   its own f_e: the note "Roles before a first report" below (``first_roles``).
4. **Merge budget** (FLUX's eq. (1), ``maths.flux.merge_budget``): B_non(i) merged experts
   in all, from the memory the device has left once the B_tune experts are held and trained
   (the cost model of ``hfedmoe.budget``, a merged expert costing one expert), shared among the
   layers by b_l = (L - l + 1) / (v_l + 1e-8), at least one per layer and at most the layer's
   non-tuned experts. A device that holds every expert merges nothing.
5. **Clustering** (``maths.flux.cluster_experts``): per layer, the non-tuned experts into
   B_non(l) groups by cosine k-means (k-means++, 20 iterations) on a 32-dimensional PCA of
   their flattened weights; never across layers.
6. **Merge** (FLUX's eq. (2), ``maths.flux.merge_weights``): W = sum (alpha_e / sum alpha)
   W_e, alpha_e = f_e a_e. The router is kept: every index of a cluster points at its one
   merged module, and a token routed to two of them computes it once with their gate weights
   summed (``MoEFeedForward``). Merged experts are frozen and discarded after the round.
7. **Local training** of the customised model (tuned + merged experts) on D_i: only exploit
   experts are updated; routers and shared parameters are frozen (``train_shared`` trains
   them too, FedAvg'd by |D_i|), except a classifier's new head: FLUX fine-tunes LLMs, which
   have no new head; a random one that never trained would leave a classifier at chance, so
   it trains and is FedAvg'd, as under every other method.
8. **Upload** of the tuned (exploit, updated) experts and the utilities; the server averages
   each expert over its tuners weighted by |D_i^e| (at least 1 for a tuner).

The client really holds the merged experts in place of the originals while it trains: the
non-tuned modules leave the model for the round (``memory_held_bytes`` counts the weights the
customised model holds; ``memory_unmerged_bytes`` the whole model's), and the cost model
predicts the same (``CostModel.resident``). Experts must be per-module (hfedmoe's upcycled and
built models, Switch); fused expert tensors are not merged.

Notes on the decisions (METHOD.md §9a; each an option of ``[flux]``, default first)
-----------------------------------------------------------------------------------

**Roles before a first report** (``first_roles = "profile"``; ``"draw"``). §9a step 2 says
round 1 ranks by u = f_e, and step 1 makes f_e the client's: a profile of a global model over
its local data. The server holds no training data, so it cannot profile for a client; the only
f_e there can be is the client's own profile of the global model it is about to train, made
before its roles are fixed. So a client the server has no utilities for (round 1, or its first
participation later) is sent its role sizes (B_tune, eps_t) and the seed of the explore draw
instead of its roles; it profiles the global model it received (in round 1 the initial one:
nothing older exists to profile stale) and applies eq. (4) to its f_e with the server's sizes
and seed (:func:`profile_roles`). These are the roles the server would assign had f_e come up
first in an exchange of its own; this saves that round trip. The server checks them: it
applies the same eq. (4) to the f_e the client reports and merges only the exploit experts
that gives (such a request lists no assigned experts for validation to check against).
``"draw"``, before: the mean of the other clients' tables, or a seeded draw before anyone has
reported.

**SPSA** (``spsa_batches = "routed"``; ``"all"``). A probe moves an explore expert by
+-sigma z and compares the losses; on a batch that routed no token to that expert both losses
are equal, so the estimate is an exact zero that says nothing about the expert and would drag
its mean (and its utility) down. So each batch probes the next explore expert, in turn, among
those it routed at least one token to (none routed: no probe, nothing counted), and an
expert's estimate is the mean over the batches that probed it. ``"all"``, before: the next in
turn whatever the batch routed, its zeros counted.

**Profiling** (``profiling = "stale"``; ``"current"``). §9a step 1: the client profiles the
previous global model and uses the profile in the next round, so the pass overlaps the
server's aggregation. Here: a client merges, ranks and reports with the profile of the global
model it received at its previous participation (kept in its node's memory,
``TrainRequest.memory``); the profile of the model it receives now is kept for its next one.
The simulation makes that pass at the start of the round, when the client holds the received
weights (no copy), where a real client makes it after uploading: the same model, data and
eval mode, so the same numbers. At a first participation no earlier profile exists: the
client profiles the model it receives and uses it, on the round's critical path.

How it is charged (the simulation cannot overlap): a pass on the critical path (a first
participation; every round with ``"current"``) counts as before, its time in
``usage_seconds`` and its forward FLOPs (cost model, padded tokens) in
``extra_flops_predicted``, which the time on the devices adds (``experiment.paired``). An
overlapped pass is reported apart: ``overlapped_seconds`` and ``overlapped_flops_predicted``.
The report counts those FLOPs in the clients' compute (the device does the work) but not in
the round's time on the devices: §9a takes the pass to be hidden by the aggregation. That is
FLUX's claim taken as stated; it holds while a pass is shorter than the time from the upload
to the next request (the server's aggregation, and the wait for the round's slowest client),
which the simulation does not model. Clustering and merging need the received weights and the
roles, so they are on the critical path in both modes (``usage_seconds``).
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.base import Aggregation, FederatedAlgorithm, register
from hfedmoe.algorithms.maths.flux import (
    assign_roles,
    cluster_experts,
    exploit_share,
    merge_budget,
    merge_weights,
    role_sizes,
    spsa_squared_norm,
    utility,
)
from hfedmoe.algorithms.mechanics.assignment import ASSIGNED, assigned_mask, mask_of, own_or_mean
from hfedmoe.algorithms.mechanics.layout import ExpertLayout, expert_key
from hfedmoe.algorithms.mechanics.transfer import upload_weights
from hfedmoe.algorithms.mechanics.uploads import (
    EXAMPLES,
    EXPERTS,
    Range,
    Statistic,
    UploadSpec,
    partial_upload,
)
from hfedmoe.algorithms.messages import BUDGET, ClientUpdate, Scalar, TrainRequest, Weights
from hfedmoe.budget import CostModel, CostModels, Price
from hfedmoe.data.tokenized import TokenizedDataset, sequential_batches
from hfedmoe.foundation.config import DeviceTier
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.seeding import FLUX_PROBES, FLUX_ROLES, rng_for
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.routing import lean_forward
from hfedmoe.model.state import experts_only, held_bytes, load_shared_state, new_head
from hfedmoe.training import StepHooks, train_local
from hfedmoe.training.device import on_device, to_device
from hfedmoe.training.objective import task_loss

EXPLORE = "explore-experts"  # request config: flat indices of the explore experts
MERGED = "merged-budget"  # request config (client side): B_non(i)
# request config of a client the server has no utilities for: its roles come from its own f_e
# (eq. (4) with these: |E_i|, eps_t and the seed of the explore draw; ``profile_roles``)
TUNE, EXPLOIT_SHARE, ROLE_SEED = "tune-budget", "exploit-share", "role-seed"
PROFILE_MEMORY = "profile/"  # prefix of the stale profile's tensors in the node's memory
#: what each reply carries per expert: u_i(e) and whether it is fresh, f_e and |D_i^e|
STATS = {
    "utility": Statistic(Range()),
    "fresh": Statistic(Range(0, 1, integer=True)),
    "frequency": Statistic(Range(0, 1)),
    "routed_samples": Statistic(Range(0, EXAMPLES, integer=True)),
}


# ---- step 1: profiling -------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """What step 1 measures of one client's data, per expert (L, E)."""

    frequency: torch.Tensor  # f_e: share of the real tokens routed to e
    routed_samples: torch.Tensor  # |D_i^e|: samples with at least one token routed to e
    attention: torch.Tensor  # a_e: mean attention received by the tokens routed to e
    tokens: int  # tokens run forward (padded), for the FLOP count

    def remember(self, memory: Weights) -> None:
        """Keep this profile in a node's memory, for the client's next participation."""
        for name in _PROFILED:
            memory[PROFILE_MEMORY + name] = getattr(self, name)

    @staticmethod
    def remembered(memory: Weights) -> Profile | None:
        """The profile a node's memory keeps (its tokens were charged when it was made), or
        None if it keeps none."""
        if not all(PROFILE_MEMORY + name in memory for name in _PROFILED):
            return None
        return Profile(*(memory[PROFILE_MEMORY + name] for name in _PROFILED), tokens=0)


_PROFILED = ("frequency", "routed_samples", "attention")  # the Profile's (L, E) tensors


@torch.no_grad()
def profile_experts(
    model: nn.Module, data: TokenizedDataset, batch_size: int, device: str = "cpu"
) -> Profile:
    """Step 1 over every sample of ``data`` (eval mode, no gradients); attention weights come
    from eager attention, switched on for the pass where the model supports it."""
    em = ExpertModel(model)
    L, E = em.shape
    blocks = [layer.transformer_block for layer in em.layers]
    count, samples, attention = (torch.zeros(L, E, dtype=torch.float64) for _ in range(3))
    real_tokens, tokens = 0, 0
    lean = lean_forward(model)  # routers and attention are read, the logits are not
    with on_device(model, device) as dev, _eager_attention(model) as has_attention:
        model.eval()
        for idx in sequential_batches(len(data), batch_size):
            batch = data.inputs(idx)
            mask_BT = batch["attention_mask"].bool()
            with em.capture() as capture:
                out = model(**to_device(batch, dev), output_attentions=has_attention, **lean)
            received = _received_attention(out, mask_BT) if has_attention else None
            for layer, (_, chosen_NE, sample_N) in zip(
                em.layers, capture.tokens(batch["attention_mask"]), strict=True
            ):
                pos = layer.position
                chosen = chosen_NE.double()
                count[pos] += chosen.sum(0)
                hit_BE = torch.zeros(len(idx), E, dtype=torch.float64)
                hit_BE.index_add_(0, sample_N, chosen)
                samples[pos] += (hit_BE > 0).double().sum(0)
                if received is not None and blocks[pos] is not None:
                    attention[pos] += (chosen * received[blocks[pos]][:, None]).sum(0)
                else:
                    attention[pos] += chosen.sum(0)  # a_e = 1
            real_tokens += int(mask_BT.sum())
            tokens += int(mask_BT.numel())
    a = torch.where(count > 0, attention / count.clamp_min(1), torch.ones_like(count))
    return Profile(count / max(real_tokens, 1), samples, a, tokens)


def _received_attention(out, mask_BT: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per transformer block, each real token's mean attention received: the column mean of
    the attention probabilities over real queries, averaged over heads; (N,) real tokens."""
    received = {}
    q_BT1 = mask_BT.unsqueeze(-1).float()
    for b, a_BHTT in enumerate(out.attentions or ()):
        a_BTT = a_BHTT.float().mean(1).cpu()  # over heads
        col_BT = (a_BTT * q_BT1).sum(1) / q_BT1.sum(1).clamp_min(1)  # over real queries
        received[b] = col_BT[mask_BT].double()
    return received


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[bool]:
    """Eager attention (which returns its weights) for the block; whether it is available."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if not hasattr(model, "set_attn_implementation") or before is None:
        yield False
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError):
        yield False
        return
    try:
        yield True
    finally:
        model.set_attn_implementation(before)


# ---- steps 4-6: the customised model -------------------------------------------------------


def merged_total(costs: CostModel, tier: DeviceTier | None, b_tune: int, layers: int) -> int:
    """Step 4's B_non(i): the most merged experts the device holds besides the B_tune tuned
    ones while training them, at least one per layer; with no device limit, every non-tuned
    expert stays itself (nothing is merged)."""
    rest = costs.num_experts - b_tune
    if tier is None:
        return rest
    for n in range(rest, layers - 1, -1):
        if costs.fits(b_tune, tier, held=b_tune + n):
            return n
    return min(layers, rest)


def plan_merges(
    model: nn.Module, profile: Profile, tuned_LE: torch.Tensor, b_non: int, cfg, seed: int
) -> dict[int, list[list[int]]]:
    """Steps 4-5: per MoE layer, the clusters of its non-tuned experts (lists of indices)."""
    em = ExpertModel(model)
    per_layer = merge_budget(profile.frequency, b_non)
    plan: dict[int, list[list[int]]] = {}
    for layer in em.layers:
        pos = layer.position
        rest = [e for e in range(layer.num_experts) if not tuned_LE[pos, e]]
        if not rest:
            continue
        k = min(per_layer[pos], len(rest))
        flat = torch.stack(
            [torch.cat([p.detach().flatten() for p in layer.modular[e].values()]) for e in rest]
        )
        labels = cluster_experts(flat, k, cfg.pca_components, cfg.kmeans_iterations, seed)
        clusters: dict[int, list[int]] = {}
        for e, c in zip(rest, labels, strict=True):
            clusters.setdefault(c, []).append(e)
        plan[pos] = list(clusters.values())
    return plan


@contextlib.contextmanager
def customised(
    model: nn.Module, plan: dict[int, list[list[int]]], profile: Profile, train_shared: bool
) -> Iterator[int]:
    """Steps 6-7: the model with each cluster of two or more experts replaced by its merged
    expert (eq. (2)) at every index of the cluster, routers and shared parameters frozen
    (unless ``train_shared``); yields the bytes of the weights it holds. Restored on exit."""
    em = ExpertModel(model)
    if any(layer.fused for layer in em.layers):
        raise HFedMoEError(
            "algorithm: FLUX merges per-module experts; this model stores its experts as fused "
            "tensors (expected an hfedmoe-built MoE or Switch)"
        )
    swapped: list[tuple[nn.ModuleList, int, nn.Module]] = []
    experts = {id(p) for layer in em.layers for d in layer.modular for p in d.values()}
    for layer in em.layers:
        modules = layer.block.experts
        f, a = profile.frequency[layer.position], profile.attention[layer.position]
        for cluster in plan.get(layer.position, []):
            if len(cluster) < 2:
                continue
            w = merge_weights(f[cluster], a[cluster])
            merged = copy.deepcopy(modules[cluster[0]])
            with torch.no_grad():
                for name, p in merged.named_parameters():
                    parts = [dict(modules[e].named_parameters())[name] for e in cluster]
                    p.copy_(sum(float(w[i]) * x for i, x in enumerate(parts)))
                    p.requires_grad_(False)
            for e in cluster:
                swapped.append((modules, e, modules[e]))
                modules[e] = merged
    try:
        with contextlib.nullcontext() if train_shared else experts_only(model, experts):
            yield held_bytes(model)
    finally:
        for block_experts, e, original in reversed(swapped):
            block_experts[e] = original


# ---- steps 2, 3 and 7: what local training measures -----------------------------------------


class TuneAndExplore(StepHooks):
    """Step 7's updates (exploit experts only) and step 2-3's fresh utility estimates: squared
    gradient norms of the exploit experts after each backward pass, and one SPSA probe of an
    explore expert per batch: the next in turn, among those the batch routed a token to unless
    ``every_batch`` (the note "SPSA" in the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        exploit_LE: torch.Tensor,
        explore_LE: torch.Tensor,
        sigma: float,
        rng: np.random.Generator,
        every_batch: bool = False,
    ):
        self.model, self.em = model, ExpertModel(model)
        self.exploit_LE, self.sigma, self.rng = exploit_LE, sigma, rng
        self.every_batch = every_batch
        self.explore = [tuple(x) for x in explore_LE.nonzero().tolist()]
        self.rng.shuffle(self.explore)
        self.grad_sq = torch.zeros(exploit_LE.shape, dtype=torch.float64)  # sum over batches
        self.batches = torch.zeros(exploit_LE.shape, dtype=torch.float64)
        self.probe_tokens = 0
        self.turn = 0  # the explore expert whose turn it is (an index into ``explore``)

    def select_experts(self, capture, batch, routed_LE):
        self.batch, self.routed_LE = batch, routed_LE
        return routed_LE & self.exploit_LE

    def after_backward(self, active_LE: torch.Tensor) -> None:
        for pos, e in active_LE.nonzero().tolist():
            params = self.em.layers[pos].modular[e].values()
            sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
            self.grad_sq[pos, e] += sq
            self.batches[pos, e] += 1
        expert = self._next_probe()
        if expert is not None:  # after the backward pass: the probe moves weights in place
            self.grad_sq[expert] += self._probe(expert, self.batch)
            self.batches[expert] += 1
            self.probe_tokens += 2 * int(self.batch["input_ids"].numel())

    def _next_probe(self) -> tuple[int, int] | None:
        """The explore expert this batch probes, and the turn moves past it: the next in turn
        that the batch routed a token to (any, with ``every_batch``); None if there is none."""
        n = len(self.explore)
        for k in range(n):
            i = (self.turn + k) % n
            if self.every_batch or self.routed_LE[self.explore[i]]:
                self.turn = i + 1
                return self.explore[i]
        return None

    @torch.no_grad()
    def _probe(self, expert: tuple[int, int], batch: dict[str, torch.Tensor]) -> float:
        """Step 3's SPSA estimate of ||grad||^2 for ``expert``: two forward passes with it moved
        by +-sigma z, in eval mode."""
        pos, e = expert
        params = list(self.em.layers[pos].modular[e].values())
        saved = [p.detach().clone() for p in params]
        z = [torch.from_numpy(self.rng.standard_normal(p.shape)).to(p) for p in params]
        device = params[0].device
        was_training = self.model.training
        self.model.eval()
        losses = []
        for sign in (1.0, -1.0):
            for p, p0, dz in zip(params, saved, z, strict=True):
                p.copy_(p0 + sign * self.sigma * dz)
            losses.append(float(task_loss(self.model, to_device(batch, device))))
        for p, p0 in zip(params, saved, strict=True):
            p.copy_(p0)
        self.model.train(was_training)
        return spsa_squared_norm(losses[0], losses[1], self.sigma)


# ---- the server: roles, aggregation ----------------------------------------------------------


def profile_roles(
    config: Mapping[str, object], frequency_LE: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 for a client the server has no utilities for (round 1's u = f_e, §9a step 2): eq.
    (4) on its f_e (as it reports it, float32, so that client and server rank alike), with the
    |E_i|, eps_t and explore-draw seed of its request. (exploit_LE, explore_LE)."""
    b_tune, eps, seed = int(config[TUNE]), float(config[EXPLOIT_SHARE]), int(config[ROLE_SEED])
    u_X = frequency_LE.float().flatten()
    exploit, explore = assign_roles(u_X, b_tune, eps, np.random.default_rng(seed))
    return exploit.view(frequency_LE.shape), explore.view(frequency_LE.shape)


class _ByTuners(Aggregation):
    """Step 8: each expert over the participants that tuned it, weighted by |D_i^e|; routers
    and shared parameters by |D_i| when they train (``train_shared``). Keeps the utilities.

    A client assigned by its own f_e (:func:`profile_roles`) counts only for the exploit experts
    eq. (4) gives on the f_e it reports: the roles the server would have assigned it."""

    def __init__(self, algorithm: Flux, server_round: int, global_weights: Weights):
        self.algorithm, self.server_round = algorithm, server_round
        self.merge = algorithm.merge(global_weights, algorithm.layout)
        self.reports: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, client: int, update: ClientUpdate) -> None:
        tuned_LE = update.stats["expert_updates"] > 0
        if (config := self.algorithm.roles_by_profile(self.server_round, client)) is not None:
            tuned_LE &= profile_roles(config, update.stats["frequency"])[0]
        mass_LE = update.stats["routed_samples"].double().clamp_min(1.0) * tuned_LE
        self.merge.add_experts(update, mass_LE)  # |D_i^e| <= |D_i|: not capped (merging)
        routers = self.algorithm.layout.router_names if self.algorithm.cfg.flux.train_shared else []
        self.merge.add_shared(update, also=routers)  # a new head, and what else trained
        self.reports[client] = {k: update.stats[k] for k in ("utility", "fresh", "frequency")}

    def finish(self) -> Weights:
        return self.merge.finish()

    def commit(self) -> None:
        for client, report in self.reports.items():
            self.algorithm.remember(client, report)


@register
class Flux(FederatedAlgorithm):
    name = "flux"
    NOT_PRIVATE = "its server sets roles from the utilities and counts clients report"
    SECTION = "flux"
    METRICS: ClassVar = {
        "usage_seconds": Range(),
        "overlapped_seconds": Range(),
        "overlapped_flops_predicted": Range(),
        "memory_unmerged_bytes": Range(),
        "memory_held_predicted_bytes": Range(),
        "experts_exploit": Range(0, EXPERTS, integer=True),
        "experts_explore": Range(0, EXPERTS, integer=True),
        "experts_merged": Range(0, EXPERTS, integer=True),
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self._costs: weakref.WeakKeyDictionary[nn.Module, CostModels] = weakref.WeakKeyDictionary()

    def bind(self, model: nn.Module) -> None:
        self.layout = ExpertLayout.of(model)
        self.utilities: dict[int, torch.Tensor] = {}  # client -> u_i(e), (L, E)

    # ---- budgets -----------------------------------------------------------------------------
    def device_budget(self, costs: CostModels, tier: DeviceTier | None) -> int:
        """B_tune(i): the most experts the device can hold and train with one merged expert
        per layer besides them."""
        model = costs.at(experts_only=not self.cfg.flux.train_shared)
        X, L = model.num_experts, ExpertModel(costs.model).num_layers
        if tier is None:
            return X
        fitting = [b for b in range(1, X + 1) if model.fits(b, tier, held=min(b + L, X))]
        return max(fitting, default=0)

    def priced(self, costs: CostModels, request: TrainRequest) -> Price:
        """Training the exploit experts while holding the tuned ones and B_non merged ones."""
        model = costs.at(experts_only=not self.cfg.flux.train_shared)
        b_tune = _tune_budget(request)
        b_non = merged_total(model, request.device, b_tune, ExpertModel(costs.model).num_layers)
        return Price(model, request.requested_experts(model.num_experts), b_tune + b_non)

    # ---- server side -------------------------------------------------------------------------
    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> TrainRequest:
        if (config := self.roles_by_profile(server_round, client)) is not None:
            return TrainRequest(global_weights, config)
        L, E = self.layout.shape
        rng = rng_for(self.cfg.seed, FLUX_ROLES, server_round, client)
        table = own_or_mean(self.utilities, client, rng, (L, E))
        b_tune = self.budgets.get(client, L * E)
        exploit, explore = assign_roles(table.flatten(), b_tune, self._eps(server_round), rng)
        config = {
            BUDGET: int(exploit.sum()),
            ASSIGNED: assigned_mask(exploit),
            EXPLORE: assigned_mask(explore),
        }
        return TrainRequest(global_weights, config)

    def roles_by_profile(self, server_round: int, client: int) -> dict[str, Scalar] | None:
        """The request config of a client assigned by its own f_e (``first_roles =
        "profile"``, and no utilities of it yet): |E_i|, eps_t and the explore draw's seed, with
        its number of exploit experts as its budget. None: the server assigns its roles."""
        if client in self.utilities or self.cfg.flux.first_roles != "profile":
            return None
        L, E = self.layout.shape
        eps = self._eps(server_round)
        b_tune, n_exploit = role_sizes(self.budgets.get(client, L * E), eps, L * E)
        seed = int(rng_for(self.cfg.seed, FLUX_ROLES, server_round, client).integers(2**31))
        return {BUDGET: n_exploit, TUNE: b_tune, EXPLOIT_SHARE: eps, ROLE_SEED: seed}

    def _eps(self, server_round: int) -> float:
        flux = self.cfg.flux
        return exploit_share(server_round, self.cfg.federation.rounds, flux.eps_0, flux.eps_max)

    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _ByTuners(self, server_round, global_weights)

    def remember(self, client: int, report: dict[str, torch.Tensor]) -> None:
        """Step 2's table: u = f_e at a client's first report, then fresh estimates over it."""
        table = self.utilities.get(client, report["frequency"].double()).clone()
        fresh = report["fresh"] > 0
        table[fresh] = report["utility"].double()[fresh]
        self.utilities[client] = table

    def state_dict(self) -> dict:
        return {"utilities": dict(self.utilities)}

    def load_state_dict(self, state: dict) -> None:
        self.utilities = {int(k): v for k, v in state.get("utilities", {}).items()}

    def upload_spec(self, model: nn.Module) -> UploadSpec:
        """Tuned experts and a classifier's new head (and routers and shared parameters with
        ``train_shared``)."""
        layout = ExpertLayout.of(model)
        head = new_head(model)
        heads = {id(p) for p in head.parameters()} if head is not None else set()
        shared = frozenset(
            n
            for n, p in model.named_parameters()
            if n not in layout.expert_names and id(p) not in heads
        )
        exclude = frozenset() if self.cfg.flux.train_shared else shared
        return partial_upload(model, exclude=exclude, stats=STATS).declare(self.METRICS)

    # ---- client side -------------------------------------------------------------------------
    def train_client(
        self,
        model: nn.Module,
        data: TokenizedDataset,
        request: TrainRequest,
        rng: np.random.Generator,
    ) -> ClientUpdate:
        load_shared_state(model, request.weights)
        flux = self.cfg.flux
        costs = self._costs.setdefault(model, CostModels(model, self.cfg)).at(
            experts_only=not flux.train_shared
        )
        em = ExpertModel(model)
        L = em.num_layers
        started = time.perf_counter()
        received = profile_experts(model, data, self.cfg.eval.batch_size, self.cfg.train.device)
        profile_seconds = time.perf_counter() - started
        profile, overlapped = self._profile_for_round(received, request.memory)
        exploit, explore = _roles(request, profile.frequency)
        started = time.perf_counter()
        b_tune = int((exploit | explore).sum())
        b_non = merged_total(costs, request.device, b_tune, L)
        seed = int(rng.integers(2**31))
        plan = plan_merges(model, profile, exploit | explore, b_non, flux, seed)
        plan_seconds = time.perf_counter() - started
        unmerged = held_bytes(model)
        probes = rng_for(self.cfg.seed, FLUX_PROBES, int(rng.integers(2**31)))
        every_batch = flux.spsa_batches == "all"
        hooks = TuneAndExplore(model, exploit, explore, flux.sigma, probes, every_batch)
        with customised(model, plan, profile, flux.train_shared) as held:
            result = train_local(model, data, self.cfg.train, rng, hooks)
        tuned = result.expert_updates > 0
        weights = upload_weights(model, tuned, em.expert_entries())
        if not flux.train_shared:  # step 8: the tuned experts only (and a new head)
            keep = {expert_key(x, ex) for ex, es in em.expert_entries().items() for x in es}
            keep |= set(self.upload_spec(model).required)
            weights = {k: t for k, t in weights.items() if k in keep}
        update = self._update(model, data, result, weights)
        fresh = hooks.batches > 0
        u = utility(profile.routed_samples, hooks.grad_sq / hooks.batches.clamp_min(1))
        update.stats.update(
            utility=torch.where(fresh, u, torch.zeros_like(u)).float(),
            fresh=fresh.float(),
            frequency=profile.frequency.float(),
            routed_samples=profile.routed_samples.float(),
        )
        merged = sum(len(c) > 1 for clusters in plan.values() for c in clusters)
        kept = sum(len(c) == 1 for clusters in plan.values() for c in clusters)
        # the profiling pass: on this round's critical path, or overlapping the server's
        # aggregation (the note "Profiling" in the module docstring)
        if overlapped:
            update.metrics.update(
                overlapped_seconds=profile_seconds, overlapped_tokens=float(received.tokens)
            )
        update.metrics.update(
            usage_seconds=plan_seconds + (0.0 if overlapped else profile_seconds),
            forward_tokens=float(hooks.probe_tokens + (0 if overlapped else received.tokens)),
            memory_held_bytes=float(held),
            memory_unmerged_bytes=float(unmerged),
            memory_held_predicted_bytes=float(costs.resident(b_tune + merged + kept)),
            experts_exploit=float(exploit.sum()),
            experts_explore=float(explore.sum()),
            experts_merged=float(merged),
        )
        return update

    def _profile_for_round(self, received: Profile, memory: Weights) -> tuple[Profile, bool]:
        """Step 1: the profile this round merges, ranks and reports with, and whether the pass
        that made ``received`` (the model just received) is off the round's critical path.

        ``profiling = "stale"``: the profile the node kept from its previous participation, and
        ``received`` is kept for its next one (overlapped); at a first participation there is
        none, and ``received`` is used (on the critical path). ``"current"``: ``received``."""
        if self.cfg.flux.profiling == "current":
            return received, False
        stale = Profile.remembered(memory)
        received.remember(memory)
        return (received, False) if stale is None else (stale, True)


def _roles(request: TrainRequest, frequency_LE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3's (exploit_LE, explore_LE): from the client's own f_e where the request gives the
    sizes for it (:func:`profile_roles`), else as the request lists them."""
    if ROLE_SEED in request.config:
        return profile_roles(request.config, frequency_LE)
    shape = tuple(frequency_LE.shape)
    return _mask(request, ASSIGNED, shape), _mask(request, EXPLORE, shape)


def _tune_budget(request: TrainRequest) -> int:
    """|E_i|, the experts a request has the client hold unmerged (exploit and explore)."""
    if TUNE in request.config:
        return int(request.config[TUNE])
    return len(request.config.get(ASSIGNED, [])) + len(request.config.get(EXPLORE, []))


def _mask(request: TrainRequest, key: str, shape: tuple[int, int]) -> torch.Tensor:
    """The (L, E) mask of the experts a request lists under ``key`` (none: all False)."""
    found = mask_of(request, shape, key)
    return torch.zeros(shape, dtype=torch.bool) if found is None else found
