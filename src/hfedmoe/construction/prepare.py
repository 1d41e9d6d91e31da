"""Build a specialised model once, keyed by its recipe, and cache it as a local checkpoint.

A constructed model depends on its recipe only: the dense parent, the MoE shape, the
construction and its options, the specialisation corpus and the build's own seed (never the
run's seed: one build serves every seed of a comparison). The recipe's hash names the cache
folder, ``$HFEDMOE_CACHE/models/<construction>-<hash>``, which is an ordinary hfedmoe
checkpoint (``hfedmoe.model.checkpoint``): ``model.name_or_path`` may point at it (or at a copy
on another machine) like any local model directory. ``build.json`` beside the weights records
the recipe, what each step measured and how long it took.

The build (``hfedmoe prepare CONFIG``, or the first ``hfedmoe run`` that needs it):

1. read the specialisation corpus (``data.holdout_fraction``'s rows, at most
   ``model.specialise.corpus_examples``, as many from each group as the others where the data
   set has groups) and upcycle the parent with identical experts;
2. one eval-mode pass: each document's mean-pooled final hidden state, and each MoE layer's
   FFN input for every real token (at most ``max_tokens`` kept, the same tokens in every layer);
3. per MoE layer, the steps of :mod:`hfedmoe.construction.cluster`: domains, router, dropped
   neurons, distillation against the dense FFN (an expert before dropping: upcycled copies are
   the dense FFN).

Every layer sees the dense model's own inputs (one pass), not those of the layers already
converted before it; the distillation error (in build.json) bounds the difference.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hfedmoe.construction.cluster import (
    distil_experts_,
    drop_neurons_,
    fit_router,
    kmeans_domains,
    relative_error,
)
from hfedmoe.data.datasets import cap_per_group, load_holdout
from hfedmoe.data.text import TextDataset
from hfedmoe.data.tokenized import TokenizedDataset, sequential_batches, tokenize_for
from hfedmoe.foundation.config import ExperimentConfig, SpecialiseConfig
from hfedmoe.foundation.errors import ConfigError, HFedMoEError
from hfedmoe.foundation.seeding import CONSTRUCTION, rng_for
from hfedmoe.model import build_model, load_tokenizer, save_checkpoint
from hfedmoe.model.checkpoint import BUILD_FILE, META_FILE
from hfedmoe.model.sources import cache_dir
from hfedmoe.model.sources import model_dir as resolve_model_dir
from hfedmoe.model.upcycle import moe_blocks

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when a change to the build changes what a recipe produces

#: progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


def recipe(cfg: ExperimentConfig) -> dict:
    """Everything the built model depends on (and nothing it does not, e.g. the run's seed)."""
    m, d = cfg.model, cfg.data
    parent = resolve_model_dir(m.name_or_path) / "config.json"
    return {
        "version": RECIPE_VERSION,
        "parent": m.name_or_path,
        "parent_config_sha256": hashlib.sha256(parent.read_bytes()).hexdigest(),
        "task": d.task,
        "num_experts": m.num_experts,
        "top_k": m.top_k,
        "moe_layers": m.moe_layers,
        "max_length": m.max_length,
        "construction": m.construction,
        "specialise": m.specialise.model_dump(),
        "corpus": {"dataset": d.dataset, "path": d.path, "holdout_fraction": d.holdout_fraction},
    }


def prepared_dir(cfg: ExperimentConfig) -> Path:
    """Where the model of ``cfg``'s recipe is cached."""
    text = json.dumps(recipe(cfg), sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{cfg.model.construction}-{key}"


def is_prepared(directory: Path) -> bool:
    return (directory / BUILD_FILE).is_file() and (directory / META_FILE).is_file()


def ensure_prepared(cfg: ExperimentConfig, progress: Progress | None = None) -> Path:
    """The cached model of ``cfg``'s recipe, built first if it is not there yet."""
    directory = prepared_dir(cfg)
    if is_prepared(directory):
        return directory
    log.info("building the %s model %s (once; cached)", cfg.model.construction, directory.name)
    with torch.random.fork_rng(devices=[]):  # the build seeds torch; the caller's RNG stays
        model, tokenizer, report = build(cfg, progress)
    # saved as built: full weights in fp32 (a run's LoRA and bf16 base go on when it loads)
    bare = cfg.model.model_copy(update={"lora": None, "frozen_dtype": "fp32"})
    try:
        save_checkpoint(model, tokenizer, bare, directory, cfg.data.task, extra=report)
    except (HFedMoEError, OSError):
        if not is_prepared(directory):  # not another process finishing the same build first
            raise
    return directory


def build(
    cfg: ExperimentConfig, progress: Progress | None = None
) -> tuple[nn.Module, object, dict]:
    """The specialised model of ``cfg`` (see the module docstring), its tokenizer and a report."""
    if cfg.model.construction != "cluster":
        raise ConfigError(f"model.construction: '{cfg.model.construction}' is not built")
    if cfg.model.expert_noise_std > 0:
        raise ConfigError(
            "model.expert_noise_std: the 'cluster' construction drops neurons instead; expected 0"
        )
    spec = cfg.model.specialise
    progress = progress or (lambda stage, done, total: None)
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    rng = rng_for(spec.seed, CONSTRUCTION)
    corpus = _sample(load_holdout(cfg.data), spec.corpus_examples, rng)
    tokenizer = load_tokenizer(cfg.model)
    bare = cfg.model.model_copy(
        update={"lora": None, "construction": "upcycle", "frozen_dtype": "fp32"}
    )
    model = build_model(bare, cfg.data.task, corpus.label_names, seed=spec.seed)
    model.eval()
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError("model.construction: the model has no upcycled MoE layer to specialise")
    data = tokenize_for(cfg, corpus, tokenizer)
    docs_SD, inputs_LNH, doc_N = _capture(model, blocks, data, spec.max_tokens, rng, progress)
    captured = time.perf_counter()
    E = blocks[0].num_experts
    domain_S = torch.as_tensor(kmeans_domains(docs_SD, E, spec.seed))
    domain_N = domain_S[doc_N]
    generator = torch.Generator().manual_seed(spec.seed)
    layers = [
        _specialise_layer(
            block, x_NH, domain_N, spec, generator, progress, f"layer {i + 1}/{len(blocks)}"
        )
        for i, (block, x_NH) in enumerate(zip(blocks, inputs_LNH, strict=True))
    ]
    report = {
        "construction": recipe(cfg),
        "corpus_examples": len(corpus),
        "tokens": len(doc_N),
        "domain_sizes": np.bincount(domain_S.numpy(), minlength=E).tolist(),
        **_domains_against_known(corpus, domain_S.numpy(), E),
        "layers": layers,
        "capture_seconds": captured - started,
        "build_seconds": time.perf_counter() - started,
    }
    return model, tokenizer, report


def _specialise_layer(
    block: nn.Module,
    x_NH: torch.Tensor,
    domain_N: torch.Tensor,
    spec: SpecialiseConfig,
    generator: torch.Generator,
    progress: Progress,
    stage: str,
) -> dict:
    """Steps 2-4 of :mod:`hfedmoe.construction.cluster` on one MoE block, in place; what they
    reached, for build.json."""
    started = time.perf_counter()
    dense = copy.deepcopy(block.experts[0])  # upcycled copies are the dense FFN
    with torch.no_grad():
        target_NH = torch.cat([dense(x) for x in x_NH.split(4096)])
    weight_EH, accuracy = fit_router(x_NH, domain_N, block.num_experts, spec.router_steps)
    with torch.no_grad():
        block.gate.weight.copy_(weight_EH)
    for expert in block.experts:
        drop_neurons_(expert, spec.drop_fraction, generator)
    before = _error(block, x_NH, target_NH)
    steps = iter(range(1, spec.expert_steps + 1))
    distil_experts_(
        block, x_NH, target_NH, spec.expert_steps, spec.expert_lr, spec.tokens_per_step,
        generator, lambda: progress(f"{stage}: experts", next(steps), spec.expert_steps),
    )  # fmt: skip
    return {
        "router_accuracy": accuracy,
        "error_after_drop": before,
        "error_after_distillation": _error(block, x_NH, target_NH),
        "seconds": time.perf_counter() - started,
    }


def _domains_against_known(corpus: TextDataset, domain_S: np.ndarray, E: int) -> dict:
    """How the unsupervised domains line up with what the data set knows (its groups, else its
    labels): a (domain, group) table of document counts, for build.json."""
    by = "group" if corpus.groups is not None else "label"
    known = corpus.groups if corpus.groups is not None else corpus.labels
    names = corpus.group_names if corpus.groups is not None else corpus.label_names
    table = np.zeros((E, len(names)), dtype=np.int64)
    np.add.at(table, (domain_S, known), 1)
    return {"domains_by": by, "known_names": list(names), "domain_counts": table.tolist()}


def _sample(corpus: TextDataset, n: int, rng: np.random.Generator) -> TextDataset:
    """At most ``n`` random rows, the same number from each group where the corpus has groups
    (so that BoolQ's 12,697 questions do not crowd out the other tasks' 1,500)."""
    if len(corpus) <= n:
        return corpus
    if corpus.groups is None:
        return corpus.subset(np.sort(rng.choice(len(corpus), n, replace=False)))
    per_group = max(1, n // len(np.unique(corpus.groups)))
    return corpus.subset(cap_per_group(corpus.groups, per_group, rng))


@torch.no_grad()
def _error(block: nn.Module, x_NH: torch.Tensor, target_NH: torch.Tensor) -> float:
    out = torch.cat([block(x.unsqueeze(0))[0] for x in x_NH.split(4096)])
    return float(relative_error(out, target_NH))


@torch.no_grad()
def _capture(
    model: nn.Module,
    blocks: list[nn.Module],
    data: TokenizedDataset,
    max_tokens: int,
    rng: np.random.Generator,
    progress: Progress,
    batch_size: int = 32,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """One pass: documents' mean-pooled final states (S, D), each MoE layer's FFN inputs of the
    real tokens (L x (N, H), the same N tokens in every layer) and each token's document (N,)."""
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [
        block.register_forward_hook(lambda m, args, out, i=i: inputs[i].append(args[0]))
        for i, block in enumerate(blocks)
    ]
    docs, owner = [], []
    try:
        batches = list(sequential_batches(len(data), batch_size))
        for n, idx in enumerate(batches):
            batch = data.batch(idx)
            mask_BT = batch["attention_mask"]
            hidden_BTD = model.base_model(input_ids=batch["input_ids"], attention_mask=mask_BT)[0]
            m = mask_BT.unsqueeze(-1).to(hidden_BTD.dtype)
            docs.append((hidden_BTD * m).sum(1) / m.sum(1))
            real = mask_BT.reshape(-1).bool()
            for per_layer in inputs:
                x = per_layer.pop()
                per_layer.append(x.reshape(-1, x.shape[-1])[real].float())
            owner.append(torch.as_tensor(idx).repeat_interleave(mask_BT.sum(1)))
            progress("routing the corpus", n + 1, len(batches))
    finally:
        for hook in hooks:
            hook.remove()
    doc_N = torch.cat(owner)
    keep = torch.arange(len(doc_N))
    if len(doc_N) > max_tokens:
        keep = torch.as_tensor(np.sort(rng.choice(len(doc_N), max_tokens, replace=False)))
    return torch.cat(docs), [torch.cat(x)[keep] for x in inputs], doc_N[keep]
