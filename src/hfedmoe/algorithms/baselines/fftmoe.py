"""FFT-MoE (Hu, Teng, Wu, Wang; arXiv 2508.18663): sparse MoE adapters on a frozen dense model,
a per-client top-k from the device budget, a heterogeneity-aware load-balancing loss, FedAvg.

Neither the paper's full text nor its code could be had; METHOD.md §9b specifies it from the
abstract and secondary notes, and every choice it leaves open is an option of ``[fftmoe]``
(``FFTMoEConfig``) with METHOD.md's default:

1. **Adapter** (``hfedmoe.model.adapters``): in every Transformer block (``blocks = "all"``;
   or ``"moe_layers"``), in parallel with the frozen FFN, h = FFN(x) + s sum_{m in TopK_k(c)}
   g_m(x) W2_m GELU(W1_m x): M = 16 experts of hidden size 64, W2 = 0 at the start, s = 1; the
   router W_R (M x d), g = softmax over the top-k(c) logits. FFT-MoE is a different model
   from the other methods' MoE: the config's ``[model]`` becomes the dense parent
   (``model.name_or_path``) with these adapters (``ExperimentConfig``'s validator), on the
   same data, devices, rounds and seed. Only the adapters (and a classifier's new head) train
   and travel.
2. **Budget**: k(c), the experts each token of client c is routed to, is the largest
   k <= k_max = 4 whose cost (the cost model of ``hfedmoe.budget``, measured with every adapter
   routing to k) fits the client's device; it is what the client reports before round 1, and
   the server asks each client for its own k(c). The pool M is the same for every client.
   The global model is evaluated at k_max (the server has no device).
3. **Loss**: L = L_task + lambda_c M sum_m f_m P_m per adapter layer, averaged over the layers
   (``maths.load_balancing``): f_m the share of the batch's token slots routed to m, P_m the
   mean router probability of m; lambda_c = lambda (1 + KL(P_c || uniform)), lambda = 0.01,
   P_c the client's mean routing distribution over this round's batches so far (detached);
   ``heterogeneity = "none"``: lambda_c = lambda.
4. **Aggregation**: every adapter parameter, routers included, by FedAvg with |D_c| / sum |D|
   (``aggregation = "fedavg"``); option ``"activated"``: each expert over the clients whose
   batches were routed to it, by |D_c| (the rest still by FedAvg).

Local training is the other methods' (``[train]``), with its learning rate unless ``lr`` sets
the adapters' own: METHOD.md names none, and zero-initialised adapters move little at a full
fine-tuning rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.base import Aggregation, FederatedAlgorithm, register
from hfedmoe.algorithms.maths.load_balancing import balance_loss, client_weight
from hfedmoe.algorithms.mechanics.layout import ExpertLayout
from hfedmoe.algorithms.mechanics.merging import Merge
from hfedmoe.algorithms.mechanics.uploads import EXPERTS, Range
from hfedmoe.algorithms.messages import ClientUpdate, TrainRequest, Weights
from hfedmoe.budget import CostModel, CostModels, Price
from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.foundation.config import DeviceTier, TrainConfig
from hfedmoe.model.adapters import routing_top_k
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.state import load_shared_state
from hfedmoe.training import StepHooks, train_local

TOP_K = "top-k"  # request config: k(c), the experts per token this client routes to


class BalancedRouting(StepHooks):
    """Adds FFT-MoE's heterogeneity-aware load-balancing loss (step 3) to every step, from the
    router outputs of the step's forward pass (with their gradients), and keeps P_c."""

    def __init__(self, model: nn.Module, lam: float, heterogeneity: bool):
        self.layers = ExpertModel(model).layers
        self.lam, self.heterogeneity = lam, heterogeneity
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> logits, idx
        self.prob_sum: torch.Tensor | None = None  # P_c: sum over real tokens of P, (L, M)

    @contextlib.contextmanager
    def recording(self) -> Iterator[BalancedRouting]:
        """Record each adapter router's (logits, top-k indices) while the block is open."""
        handles = [
            layer.router.register_forward_hook(self._hook(layer.position)) for layer in self.layers
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, position: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            logits_NM, _, indices_NK = output
            self.outputs[position] = (logits_NM, indices_NK)

        return hook

    def auxiliary_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        mask = batch.get("attention_mask")
        losses, probs = [], []
        for layer in self.layers:
            logits_NM, indices_NK = self.outputs.pop(layer.position)
            real_N = _real_tokens(mask, logits_NM.shape[0], logits_NM.device)
            probs_NM = torch.softmax(logits_NM.float(), dim=-1)[real_N]
            chosen_NM = torch.zeros_like(probs_NM, dtype=torch.bool)
            chosen_NM.scatter_(1, indices_NK[real_N], True)
            losses.append(balance_loss(probs_NM, chosen_NM))
            probs.append(probs_NM.detach().sum(0).cpu())
        prob_sum = torch.stack(probs).double()
        self.prob_sum = prob_sum if self.prob_sum is None else self.prob_sum + prob_sum
        weights = [
            client_weight(self.lam, self.prob_sum[i] if self.heterogeneity else None)
            for i in range(len(self.layers))
        ]
        return sum(w * x for w, x in zip(weights, losses, strict=True)) / len(losses)


def _real_tokens(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """The (N,) mask of the real tokens of a layer's stream of ``n`` (all, if unknown)."""
    if mask is None or mask.numel() != n:
        return torch.ones(n, dtype=torch.bool, device=device)
    return mask.reshape(-1).bool().to(device)


class _FedAvgAdapters(Aggregation):
    """Every adapter parameter (and a classifier head) by |D_c|; with ``activated``, each
    expert over the clients whose batches were routed to it."""

    def __init__(self, merge: Merge, activated: bool):
        self.merge = merge
        self.activated = activated

    def add(self, client: int, update: ClientUpdate) -> None:
        if not self.activated:
            for name, x in update.weights.items():
                self.merge.add(name, x, update.num_examples)
            return
        routed_LE = update.stats["expert_updates"] > 0
        self.merge.add_experts(update, routed_LE.double() * update.num_examples)
        self.merge.add_shared(update, also=self.merge.layout.router_names)

    def finish(self) -> Weights:
        return self.merge.finish()


@register
class FFTMoE(FederatedAlgorithm):
    name = "fftmoe"
    METRICS: ClassVar = {"top_k": Range(1, EXPERTS, integer=True)}
    RATE_KEY = "fftmoe.lr"  # the adapters' own rate (train_settings)
    SECTION = "fftmoe"

    def bind(self, model: nn.Module) -> None:
        self.layout = ExpertLayout.of(model)

    # ---- budget (client side): k(c) ------------------------------------------------------
    def device_budget(self, costs: CostModels, tier: DeviceTier | None) -> int:
        """k(c): the largest k <= k_max whose training (every adapter expert trainable) fits
        the device; 0 if not even k = 1 does."""
        k_max = self.cfg.fftmoe.k_max
        if tier is None:
            return k_max
        fitting = [k for k in range(1, k_max + 1) if _fits_all(costs.at(k), tier)]
        return max(fitting, default=0)

    def priced(self, costs: CostModels, request: TrainRequest) -> Price:
        model = costs.at(self.top_k(request))
        return Price(model, model.num_experts)

    def train_settings(self) -> TrainConfig:
        """``[train]``, at the adapters' own rate where ``fftmoe.lr`` sets one."""
        lr = self.cfg.fftmoe.lr
        return self.cfg.train if lr is None else self.cfg.train.model_copy(update={"lr": lr})

    def top_k(self, request: TrainRequest) -> int:
        return int(request.config.get(TOP_K, self.cfg.fftmoe.k_max))  # type: ignore[arg-type]

    # ---- server side ---------------------------------------------------------------------
    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> TrainRequest:
        k_max = self.cfg.fftmoe.k_max
        k = min(max(self.budgets.get(client, k_max), 1), k_max)
        return TrainRequest(global_weights, {TOP_K: k})

    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        activated = self.cfg.fftmoe.aggregation == "activated"
        return _FedAvgAdapters(self.merge(global_weights, self.layout), activated)

    # ---- client side ---------------------------------------------------------------------
    def train_client(
        self,
        model: nn.Module,
        data: TokenizedDataset,
        request: TrainRequest,
        rng: np.random.Generator,
    ) -> ClientUpdate:
        load_shared_state(model, request.weights)
        f = self.cfg.fftmoe
        hooks = BalancedRouting(model, f.lam, f.heterogeneity == "kl")
        with routing_top_k(model, self.top_k(request)), hooks.recording():
            result = train_local(model, data, self.train_settings(), rng, hooks)
        update = self._update(model, data, result)
        update.metrics["top_k"] = float(self.top_k(request))
        return update


def _fits_all(costs: CostModel, tier: DeviceTier) -> bool:
    return costs.fits(costs.num_experts, tier)
