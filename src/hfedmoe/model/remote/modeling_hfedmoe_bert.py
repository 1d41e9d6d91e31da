"""An upcycled BERT-family encoder classifier with top-k routed MoE feed-forward layers, as
hfedmoe trains it; shipped inside an ``hfedmoe export`` and loaded with
``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)``.

Standalone on purpose (torch and transformers only): transformers has no BERT MoE class. The
layer named in ``moe_layers`` replaces BERT's feed-forward (``intermediate`` and the
``output.dense`` projection) with ``num_experts`` experts, each ``fc_out(act(fc_in(x)))``, and a
router: softmax over the experts of a bias-free linear map, each token's top-k weights
renormalised to sum to 1, ``y = sum_k w_k E_k(x)`` (hfedmoe's METHOD.md eq. (1)-(2)).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.activations import ACT2FN


class HFedMoEBertConfig(BertConfig):
    model_type = "hfedmoe_bert"

    def __init__(self, moe_layers=(), num_experts=8, num_experts_per_tok=2, **kwargs):
        super().__init__(**kwargs)
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok


class TopKRouter(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x):
        logits = nn.functional.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        return logits, weights / weights.sum(dim=-1, keepdim=True), indices


class ExpertFFN(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc_in = nn.Linear(hidden, intermediate)
        self.act = ACT2FN[act]
        self.fc_out = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class MoEFeedForward(nn.Module):
    def __init__(self, config: HFedMoEBertConfig):
        super().__init__()
        h = config.hidden_size
        self.gate = TopKRouter(h, config.num_experts, config.num_experts_per_tok)
        self.experts = nn.ModuleList(
            ExpertFFN(h, config.intermediate_size, config.hidden_act)
            for _ in range(config.num_experts)
        )

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        _, weights, indices = self.gate(x)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class HFedMoEBertForSequenceClassification(BertForSequenceClassification):
    config_class = HFedMoEBertConfig

    def __init__(self, config: HFedMoEBertConfig):
        super().__init__(config)
        for i in config.moe_layers:
            layer = self.bert.encoder.layer[i]
            layer.intermediate = MoEFeedForward(config)  # replaces the dense FFN's first half
            layer.output.dense = nn.Identity()  # and its second: the experts project back
        self.post_init()
