"""Typed experiment configuration, parsed once at the edge.

An experiment is one TOML file of differences from the defaults below. Every section is a
frozen pydantic model that rejects unknown keys, so a typo is an error naming the key, not a
silently ignored setting. Components receive only their own section.

The resolved config travels to the Flower apps as JSON inside ``context.run_config`` (see
:func:`ExperimentConfig.to_json`), so the embedded engine, ``flwr run`` and a deployment all
parse the same object.
"""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hfedmoe.foundation.errors import ConfigError
from hfedmoe.foundation.files import cause

#: What a run trains the model for (see ``hfedmoe.model.factory`` for which models fit which).
Task = Literal["classification", "language-modeling", "multiple-choice", "instruction"]

#: Data sets whose rows carry a natural id (``hfedmoe.data.datasets``), and what it is.
GROUPED_DATASETS = {"rotten_tomatoes": "movie", "qa_mix": "task"}

#: The shipped data sets, and the task each one is (``data.dataset = "local"``: the user's own)
SHIPPED_TASKS = {
    "bbc_news": "classification",
    "rotten_tomatoes": "classification",
    "qa_mix": "multiple-choice",
}


class Section(BaseModel):
    """Base for config sections: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: the config sections plugins add, by name: a plugin algorithm's ``OPTIONS`` under its
#: ``SECTION`` (``hfedmoe.algorithms.register`` fills it; the config cannot import algorithms)
PLUGIN_SECTIONS: dict[str, type[Section]] = {}


def _import_modules(modules: list[str]) -> None:
    """Import each plugin module once (Python caches it): importing registers what it defines
    (algorithms, model families, config sections), in this process, whichever engine started
    it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure of a user's module is a config error
            raise ValueError(
                f"plugins: cannot import '{module}' ({type(exc).__name__}: {exc})"
            ) from None


def register_section(name: str, options: type[Section]) -> None:
    """Make ``[name]`` a config section of its own, validated by ``options``."""
    if name in ExperimentConfig.model_fields or PLUGIN_SECTIONS.get(name, options) is not options:
        raise ValueError(f"config section '{name}' exists already")
    PLUGIN_SECTIONS[name] = options


class LoraConfig(Section):
    """Parameter-efficient fine-tuning: LoRA adapters (PEFT) instead of full weights."""

    rank: int = Field(8, gt=0, description="r, the rank of each LoRA adapter.")
    alpha: float = Field(
        16.0, gt=0, description="LoRA's alpha: the adapter's output is scaled by alpha / r."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Must be 0 with fused experts (PEFT).")
    targets: list[Literal["experts", "attention", "routers"]] = Field(
        ["experts", "attention"], min_length=1, description="What gets adapters."
    )
    quantize: Literal["nf4", "fp4", "int8"] | None = Field(
        None,
        description="Quantise the frozen base's linear layers with bitsandbytes (QLoRA-style; "
        "needs hfedmoe[qlora]); null = fp32 base.",
    )


class SpecialiseConfig(Section):
    """How ``model.construction = "cluster"`` builds specialised experts from the dense parent
    (``hfedmoe.construction``) on the specialisation corpus (``data.holdout_fraction``)."""

    corpus_examples: int = Field(
        600, gt=0, description="Rows of the specialisation corpus the build reads."
    )
    drop_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Drop-Upcycling: share of each expert's FFN neurons re-initialised "
        "(0 = exact copies: routers specialise, experts stay interchangeable).",
    )
    router_steps: int = Field(
        300, ge=0, description="Full-batch steps fitting each router to the domains."
    )
    expert_steps: int = Field(
        300, ge=0, description="Steps distilling the dense FFN into the routed experts."
    )
    expert_lr: float = Field(
        1e-3, gt=0, description="Learning rate of the experts' distillation steps."
    )
    tokens_per_step: int = Field(2048, gt=0, description="Tokens per expert-distillation step.")
    max_tokens: int = Field(
        60_000, gt=0, description="Tokens kept per MoE layer (a random subset beyond this)."
    )
    seed: int = Field(0, ge=0, description="The build's own seed (not the run's).")


class AdapterShape(Section):
    """What an MoE adapter is, shared by ``[fftmoe]`` (where a user sets it) and
    ``model.moe_adapters`` (what the model layer builds from)."""

    experts: int = Field(16, gt=0, description="M, experts per adapter (the same for all).")
    hidden: int = Field(64, gt=0, description="Hidden size of each adapter expert.")
    scale: float = Field(1.0, description="s, the adapter output's scale.")


class MoEAdapterConfig(AdapterShape):
    """Sparse MoE adapters beside the frozen FFNs of the dense parent (FFT-MoE, METHOD.md §9b
    step 1; ``hfedmoe.model.adapters``). Derived from ``[fftmoe]`` by ``algorithm = "fftmoe"``
    (:meth:`FFTMoEConfig.adapters`); not set by hand."""

    top_k: int = Field(4, gt=0, description="Experts per token (a client may use fewer).")
    layers: list[int] | Literal["all"] = Field(
        "all", description="Transformer blocks that get an adapter."
    )
    router_init_std: float = Field(0.02, ge=0, description="Std of the routers' normal init.")

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> MoEAdapterConfig:
        if self.top_k > self.experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be <= the adapter's experts ({self.experts})"
            )
        return self


class ModelConfig(Section):
    """The MoE model: a dense pretrained model made into experts (sparse upcycling, or a
    specialising construction)."""

    name_or_path: str = Field(
        "all-MiniLM-L6-v2",
        description="A shipped model name or a local Hugging Face model directory.",
    )
    num_experts: int = Field(8, gt=0, description="Experts per MoE layer (E).")
    top_k: int = Field(2, gt=0, description="Experts each token is routed to.")
    moe_layers: list[int] | Literal["all"] = Field(
        "all", description="Indices of the transformer layers whose FFN is upcycled."
    )
    router_init_std: float = Field(
        0.02, ge=0, description="Std of the normal init of router weights (0 = uniform routing)."
    )
    expert_noise_std: float = Field(
        0.0,
        ge=0,
        description="Noise added to each expert copy, relative to each weight's std "
        "(0 = identical experts, exactly the dense model at initialisation).",
    )
    max_length: int = Field(128, gt=0, description="Tokens per example after truncation.")
    expert_compute: Literal["auto", "loop", "grouped"] = Field(
        "auto",
        description="How an upcycled MoE block computes its experts: loop (one product per "
        "expert that receives tokens: the reference), grouped (tokens sorted by expert, one "
        "torch._grouped_mm per projection, no host synchronisation in the forward pass; the "
        "loop where the kernel, dtype or layout do not allow it), or auto (grouped on CUDA, the "
        "loop on the CPU, where every fp32 value stays bit for bit). Native MoE families use "
        "their own experts.",
    )
    construction: Literal["upcycle", "cluster"] = Field(
        "upcycle",
        description="upcycle: identical expert copies; cluster: routers fitted to k-means "
        "domains of the specialisation corpus, Drop-Upcycled experts distilled on the tokens "
        "routed to them (built once with `hfedmoe prepare`, cached).",
    )
    specialise: SpecialiseConfig = Field(
        SpecialiseConfig(), description="Options of the 'cluster' construction."
    )
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters on a frozen base; absent = full fine-tuning."
    )
    moe_adapters: MoEAdapterConfig | None = Field(
        None,
        description="The dense parent, frozen, with MoE adapters beside its FFNs instead of an "
        "MoE made from it (FFT-MoE; set by algorithm = 'fftmoe'); absent = an MoE.",
    )

    frozen_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="The dtype of the parameters no method trains (a LoRA or QLoRA base, "
        "FFT-MoE's dense parent): bf16 holds them in half the bytes, and every forward pass of "
        "the model (training, evaluation, probes) then runs under bf16 autocast, so it needs "
        "train.precision = 'bf16'. What trains (adapters, heads) stays fp32 and travels as "
        "fp32. Needs a frozen base (model.lora or model.moe_adapters).",
    )

    @property
    def frozen_base(self) -> bool:
        """Whether only adapters (and a classifier head) train: every party then builds the
        base itself and only the trainable tensors travel (``hfedmoe.model.state``)."""
        return self.lora is not None or self.moe_adapters is not None

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"model.top_k ({self.top_k}) must be <= model.num_experts ({self.num_experts})"
            )
        if isinstance(self.moe_layers, list) and len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError("model.moe_layers must not repeat a layer")
        if self.frozen_dtype != "fp32" and not self.frozen_base:
            raise ValueError(
                f"model.frozen_dtype: '{self.frozen_dtype}' applies to a frozen base, and full "
                "fine-tuning trains every parameter; expected 'fp32', or model.lora"
            )
        return self


class DataColumns(Section):
    """Which columns of a local data set (``data.dataset = "local"``) hold what; each task
    reads only its own."""

    text: str = Field("text", description="classification, language-modeling: the text.")
    text_pair: str | None = Field(
        None, description="classification: a second text, encoded as a pair with the first."
    )
    label: str = Field(
        "label", description="classification: the class, as a name or an integer id."
    )
    prompt: str = Field("prompt", description="instruction: the user's turn.")
    response: str = Field("response", description="instruction: the answer trained on.")
    messages: str | None = Field(
        None,
        description="instruction: a chat column (a list of {role, content}) instead of prompt "
        "and response; the last message is the assistant's answer trained on. Default: a "
        "column named 'messages' where the data has no prompt and response columns.",
    )
    question: str = Field("question", description="multiple-choice: the prompt.")
    choices: str = Field("choices", description="multiple-choice: the candidate answers.")
    answer: str = Field(
        "answer", description="multiple-choice: the right answer, as an index or its text."
    )
    group: str | None = Field(
        None,
        description="Each row's natural group (a speaker, a source, a task): for "
        "partitioner = 'natural', partition_by = 'group' and per-group test metrics.",
    )


class DataConfig(Section):
    """The data set, its train/test (and validation) split and its non-IID partition over
    clients."""

    dataset: Literal["bbc_news", "rotten_tomatoes", "qa_mix", "local"] = Field(
        "bbc_news",
        description="A shipped data set, or 'local': the user's own files at data.path (CSV, "
        "JSON Lines, Parquet, or a directory saved with datasets' save_to_disk).",
    )
    task: Task = Field(
        "classification",
        description="classification: predict the label; language-modeling: next-token loss "
        "on the texts (decoders and native MoE models); multiple-choice (qa_mix or local): "
        "next-token loss on the right answer, scored by answer likelihood; instruction "
        "(local): next-token loss on the response after the tokenizer's chat template, "
        "evaluated by loss and perplexity.",
    )
    path: str | None = Field(
        None,
        description="Local copy of a shipped data set (default: the installed package's "
        "files), or the training data of a local one.",
    )
    test_path: str | None = Field(
        None,
        description="A local data set's test file; without one, data.test_fraction of "
        "data.path is the test split.",
    )
    clients: Literal["partition", "own"] = Field(
        "partition",
        description="partition: every client's data is a partition of one data set (each "
        "party rebuilds it from the config and the seed); own: every client reads its own "
        "file and nothing else (data.client_paths in simulation, the SuperNode's "
        "--node-config data-path=... on a deployment), and the server reads no training data, "
        "only data.test_path.",
    )
    client_paths: list[str] | None = Field(
        None,
        description="data.clients = 'own': one file or directory per client, in partition "
        "order (any format data.path takes; the same columns and task). A node config's "
        "data-path wins where both are given.",
    )
    columns: DataColumns = DataColumns()
    label_names: list[str] | None = Field(
        None,
        description="classification, local data: the class names in id order; labels outside "
        "them are an error. Default: the data's own names (a ClassLabel column), else its "
        "distinct labels, sorted.",
    )
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Share of the data set (per stratum, drawn with the seed) that is the "
        "server's test split, where there is no test file.",
    )
    holdout_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the data set (per stratum, with a fixed seed) held out before the "
        "train/test split: never seen by clients or the test split, it is the specialisation "
        "corpus of a constructed model.",
    )
    client_test_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each client's own rows (drawn with the seed, per client, at "
        "least one) held out of its training for federated evaluation (eval.mode); 0: none.",
    )
    validation_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the training split (per stratum: task, else label; drawn with "
        "the seed) held out before it is partitioned among clients: the validation split, on "
        "which the server evaluates the global model every round beside the test split "
        "(validation_* metrics), so hyperparameters are tuned without the test split. A "
        "fraction of the training rows as the test split and the caps leave them: the test "
        "split and the specialisation corpus are those of a run without one; only the "
        "clients' rows shrink. 0: no validation split.",
    )
    partitioner: Literal["dirichlet", "iid", "natural"] = Field(
        "dirichlet",
        description="dirichlet: Dir(alpha) shares of each label (or group); iid: equal random "
        "shares; natural: whole groups (movies) per client.",
    )
    partition_by: Literal["label", "group"] = Field(
        "label", description="What the Dirichlet partition skews: labels, or groups (tasks)."
    )
    dirichlet_alpha: float = Field(0.5, gt=0, description="Smaller = more skewed labels.")
    min_partition_size: int = Field(
        10, ge=0, description="Dirichlet resamples until every client has this many examples."
    )
    max_examples_per_group: int | None = Field(
        None, gt=0, description="Keep at most this many random rows of each group (task)."
    )
    max_train_examples: int | None = Field(None, gt=0, description="Cap for quick runs.")
    max_test_examples: int | None = Field(None, gt=0, description="Cap for quick runs.")

    @model_validator(mode="after")
    def _own_data(self) -> DataConfig:
        if self.clients == "partition":
            if self.client_paths is not None:
                raise ValueError("data.client_paths: only with data.clients = 'own'")
            return self
        needs = {
            "data.dataset": (self.dataset == "local", "'local' (each client's own files)"),
            "data.label_names": (
                self.task != "classification" or self.label_names is not None,
                "the class names in id order (the server reads no training data to learn them)",
            ),
            "data.validation_fraction": (
                self.validation_fraction == 0,
                "0 with data.clients = 'own' (the server holds no training rows to hold out)",
            ),
            "data.holdout_fraction": (
                self.holdout_fraction == 0,
                "0 with data.clients = 'own' (the server holds no training rows to hold out)",
            ),
        }
        for field, (ok, expected) in needs.items():
            if not ok:
                raise ValueError(f"{field}: expected {expected}")
        if self.client_paths is not None and not self.client_paths:
            raise ValueError("data.client_paths: one path per client, or leave it out")
        return self

    @model_validator(mode="after")
    def _fits_dataset(self) -> DataConfig:
        local = self.dataset == "local"
        if local and not self.path and self.clients == "partition":
            raise ValueError("data.path: a local data set needs the path of its training data")
        if self.test_path and not local:
            raise ValueError("data.test_path: only a local data set takes a test file")
        if self.label_names is not None and (not local or len(set(self.label_names)) < 2):
            raise ValueError(
                "data.label_names: two or more distinct names, for a local data set only"
            )
        shipped = SHIPPED_TASKS.get(self.dataset)
        lm_ok = self.task == "language-modeling" and shipped == "classification"
        if shipped is not None and self.task != shipped and not lm_ok:
            raise ValueError(
                f"data.task: data set '{self.dataset}' is {shipped}"
                + (" (or language-modeling of its texts)" if shipped == "classification" else "")
                + f", not '{self.task}'"
            )
        grouped = self.partitioner == "natural" or self.partition_by == "group"
        grouped = grouped or self.max_examples_per_group is not None
        has_groups = self.columns.group is not None if local else self.dataset in GROUPED_DATASETS
        if grouped and not has_groups:
            raise ValueError(
                f"data.dataset: '{self.dataset}' has no groups for a natural or per-group "
                f"partition (grouped data sets: {', '.join(GROUPED_DATASETS)}, or a local one "
                "with data.columns.group)"
            )
        return self


class FederationConfig(Section):
    """How many clients exist, how many train per round, for how many rounds; what the server
    accepts from them."""

    num_clients: int = Field(8, gt=0, description="C, the clients of the federation.")
    clients_per_round: int = Field(
        4, gt=0, description="Clients sampled each round, without replacement."
    )
    rounds: int = Field(10, gt=0, description="Federated rounds (round 0 is the initial model).")
    round_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds the server waits for each client's reply; null = for all of them. "
        "On the embedded engine a client in the server's own process cannot be stopped, so a "
        "set timeout runs the clients in worker processes (federation.workers of them, even "
        "1), where a client still running at the timeout is stopped.",
    )
    max_update_ratio: float = Field(
        10.0,
        gt=0,
        description="Reject an update whose distance from the global weights exceeds this "
        "multiple of their norm (an absurd update, whatever the optimizer).",
    )
    defences: bool = Field(
        True,
        description="Bound what one client can do to the aggregate: the weight of its data is "
        "the size the server knows, its reported statistics can buy it at most "
        "max_client_share of any group, and no group moves further than the optimizer can "
        "move it (update_bound). false: trust what clients report (to measure attacks).",
    )
    max_examples_per_client: int | None = Field(
        None,
        gt=0,
        description="The most examples any client's weight counts; null = no cap where the "
        "server made the partitions, and where nodes declare their own sizes (data.clients = "
        "own) with defences on, 4 times the median declared size.",
    )
    max_client_share: float = Field(
        0.5,
        ge=0.5,
        le=1,
        description="The largest share of a group's aggregation weight a client's reported "
        "statistics can buy it (beyond its share of the group's examples); 1 = no cap.",
    )
    update_bound: Literal["reject", "clip"] = Field(
        "reject",
        description="A group (expert, router, shared parameters) moved further than the "
        "optimizer's steps can move it: reject the reply, or pull the group back to the bound.",
    )
    robust: Literal["none", "median", "trimmed-mean"] = Field(
        "none",
        description="Aggregate each group by the coordinate-wise median or trimmed mean of the "
        "round's replies (holds every reply of the round; groups with fewer than 3 replies fall "
        "back to the weighted mean).",
    )
    trim_fraction: float = Field(
        0.25,
        gt=0,
        lt=0.5,
        description="robust = trimmed-mean: the share of values dropped at each end.",
    )
    descent_check: bool = Field(
        False,
        description="Reject an update that points uphill on the server's validation split: "
        "its cosine with the validation loss's descent direction at the round's global weights "
        "below min_descent_cosine (reason descent). Needs data.validation_fraction > 0; costs "
        "the server one backward pass over the validation split a round and a gradient as "
        "large as the trained weights. Catches a sign-flipped update, which no size bound can.",
    )
    min_descent_cosine: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="descent_check: the least cosine accepted between an update (w_c - w) and "
        "minus the validation loss's gradient at w.",
    )
    sum_precision: Literal["wide", "native"] = Field(
        "wide",
        description="The running sums of the aggregation: wide (float64 for 32-bit weights, "
        "float32 for 16-bit ones: every metric reproducible to the last bit) or native (the "
        "weights' own dtype: half the memory of the running sums, each mean within about "
        "K u max|x| of the wide one for K replies, u the dtype's unit roundoff: 6e-8 for "
        "float32). A private round's sums stay wide.",
    )
    check_wire: bool = Field(
        False,
        description="Embedded engine: every message crosses Flower's wire format (serialised "
        "and back), as on the other engines; off: tensors go by reference within the process.",
    )
    poll_interval: float = Field(
        0.5,
        gt=0,
        description="Seconds between the server's pulls for replies on Flower's engines "
        "(Flower's own send_and_receive waits 3 s).",
    )
    workers: int = Field(
        1,
        gt=0,
        description="Embedded engine: train the sampled clients in this many worker processes "
        "at once, each with its own resident model (use with threads = cores / workers).",
    )

    @model_validator(mode="after")
    def _sample_within_population(self) -> FederationConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.clients_per_round}) must be <= "
                f"federation.num_clients ({self.num_clients})"
            )
        return self


class TrainConfig(Section):
    """Local training on a client in one round."""

    local_steps: int = Field(5, gt=0, description="Optimizer steps per client per round.")
    batch_size: int = Field(16, gt=0, description="Examples per local step.")
    lr: float = Field(1e-4, gt=0, description="AdamW's learning rate on the clients.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's decoupled weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip norm; null = no clipping.")
    inactive_expert_state: Literal["drop", "keep"] = Field(
        "drop",
        description="An expert inactive in a local step (every method; METHOD.md §7): its Adam "
        "moments and step count are dropped and restart when it is next active (at most the "
        "step's experts hold state, as the cost model counts), or kept frozen and resumed",
    )
    device: str = Field(
        "cpu",
        description="Where local training and the server's evaluation run: cpu, cuda, cuda:N, "
        "or auto (cuda when torch sees one). Aggregation always runs on the CPU.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="The local training's forward and loss: fp32, or bf16 or fp16 under "
        "torch.autocast (mixed precision: the weights, gradients and AdamW's moments stay fp32; "
        "activations are 16-bit, on the CPU as on a GPU). fp16 adds dynamic loss scaling "
        "(torch.amp.GradScaler): a step whose gradients overflow is skipped. The budget cost "
        "model measures a step's activations under the same autocast.",
    )

    activation_checkpointing: bool = Field(
        False,
        description="Keep only each transformer layer's input in the forward pass and "
        "recompute the layer's activations in the backward pass (transformers' activation "
        "checkpointing): activation memory falls to the layers' inputs plus one layer's "
        "activations, for about one more forward pass of time; values are unchanged. The "
        "budget cost model measures activations the same way.",
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", value):
            raise ValueError("expected cpu, auto, cuda or cuda:N")
        return value


class EvalConfig(Section):
    """Where the global model is evaluated: on the server's test split (central), on each
    client's own held-out share (federated), or both."""

    batch_size: int = Field(64, gt=0, description="Examples per evaluation batch.")
    mode: Literal["central", "federated", "both"] = Field(
        "central",
        description="central: the server evaluates on its test split; federated: clients "
        "evaluate on their own held-out share (data.client_test_fraction) and the server "
        "records each value and the mean weighted by their examples, which is then the run's "
        "test_accuracy and test_loss (the server needs no test data); both: central test_* "
        "and federated_* beside them.",
    )
    federated_clients: Literal["sampled", "all"] = Field(
        "sampled",
        description="Who evaluates after a round: its sampled clients, or every client. Every "
        "client evaluates in round 0 and in the last round either way.",
    )


class HFedMoEConfig(Section):
    """HFedMoE (METHOD.md §2-§7). Options are the paper's ambiguities, defaults as METHOD.md §7.

    lambda, beta and tau were not recovered from the paper; docs/SWEEP.md gives the sweep
    behind the defaults. C_budget(c) comes from the client's device (``[devices]``, METHOD.md
    §6, ``hfedmoe.budget``).
    """

    lam: float = Field(0.5, ge=0, le=1, description="lambda of eq. (5)")
    beta: float = Field(0.1, ge=0, description="beta of eq. (14)")
    tau: float = Field(0.05, ge=0, le=1, description="tau of eqs. (17)-(20)")
    ranking: Literal["ib", "importance"] = Field(
        "ib", description="rank experts in eq. (15) by I_b (eq. (14)) or by s_b alone (eq. (5))"
    )
    budget_scope: Literal["global", "per_layer"] = Field(
        "global",
        description="C_budget over every (layer, expert) pair, or split evenly per layer "
        "(METHOD.md §7).",
    )
    expert_used: Literal["usage_and_updated", "usage"] = Field(
        "usage_and_updated", description="who counts for an expert in eq. (17)"
    )
    router_alpha: Literal["normalized", "as_written"] = Field(
        "normalized", description="alpha(c) of eq. (21) normalised to sum to 1, or as written"
    )
    router_alpha_scope: Literal["per_layer", "all_layers"] = Field(
        "per_layer",
        description="alpha(c) of eqs. (19)-(20) with S_c and S_global taken per MoE layer, so "
        "each layer's router has its own client weights, or over all layers: one alpha(c) per "
        "client for every router (the text's reading; METHOD.md §7)",
    )
    expert_aggregation: Literal["eq17", "holders"] = Field(
        "eq17", description="experts by eq. (17), or averaged over all who updated them (ablation)"
    )
    router_aggregation: Literal["eq21", "fedavg"] = Field(
        "eq21", description="routers by eqs. (19)-(21), or by FedAvg (ablation)"
    )
    usage_over: Literal["data", "batches"] = Field(
        "data",
        description="u_c(e) of eq. (16) over all of D_c after local training, in eval mode (one "
        "extra forward pass; METHOD.md §7), or over the batches drawn while training",
    )
    mode: Literal["backward-only", "strict"] = Field(
        "backward-only",
        description="backward-only: route normally, update only E_active (the paper); strict: "
        "a client holds only C_budget experts, routes among them, downloads and uploads them",
    )


class FFTMoEConfig(AdapterShape):
    """FFT-MoE (METHOD.md §9b): sparse MoE adapters on the frozen dense parent, a per-client
    top-k(c) from the device budget, a heterogeneity-aware load-balancing loss, FedAvg of the
    adapters. Defaults are METHOD.md's decisions."""

    k_max: int = Field(4, gt=0, description="The most experts per token a client may use.")
    blocks: Literal["all", "moe_layers"] = Field(
        "all", description="Adapters in every block, or in model.moe_layers only."
    )
    lam: float = Field(0.01, ge=0, description="lambda of the load-balancing loss.")
    heterogeneity: Literal["kl", "none"] = Field(
        "kl",
        description="lambda_c = lambda (1 + KL(P_c || uniform)), or lambda for every client",
    )
    aggregation: Literal["fedavg", "activated"] = Field(
        "fedavg",
        description="every adapter parameter by FedAvg over |D_c|, or each expert over the "
        "clients that activated it",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the adapters; null = train.lr (adapters that start at "
        "zero usually want a larger one than full fine-tuning)",
    )

    def adapters(self, moe_layers: list[int] | Literal["all"], router_init_std: float) -> dict:
        """``model.moe_adapters`` of an FFT-MoE run: this section's shape, on every block or
        on the experiment's ``moe_layers``."""
        shape = AdapterShape.model_fields
        return {
            **{k: getattr(self, k) for k in shape},
            "top_k": self.k_max,
            "layers": moe_layers if self.blocks == "moe_layers" else "all",
            "router_init_std": router_init_std,
        }

    @model_validator(mode="after")
    def _k_within_experts(self) -> FFTMoEConfig:
        if self.k_max > self.experts:
            raise ValueError(
                f"fftmoe.k_max ({self.k_max}) must be <= fftmoe.experts ({self.experts})"
            )
        return self


class FluxConfig(Section):
    """FLUX (METHOD.md §9a): stale profiling, Oort-style utilities with zeroth-order estimates
    for exploring experts, exploit/explore roles, merged frozen experts in place of the ones a
    client does not tune. Defaults are METHOD.md's decisions."""

    eps_0: float = Field(0.3, gt=0, le=1, description="Exploit share of E_i in round 1.")
    eps_max: float = Field(0.9, gt=0, le=1, description="Exploit share from half the rounds on.")
    sigma: float = Field(1e-3, gt=0, description="SPSA perturbation of an exploring expert.")
    pca_components: int = Field(32, gt=0, description="PCA dimensions before clustering.")
    kmeans_iterations: int = Field(20, gt=0, description="k-means iterations of the merge.")
    profile_precision: Literal["fp32"] = Field(
        "fp32",
        description="Precision of the profiling pass. FLUX profiles a 4-bit model; here it is "
        "fp32 (METHOD.md allows it and the metrics flag it): bitsandbytes' 4-bit kernels "
        "need a GPU.",
    )
    train_shared: bool = Field(
        False, description="Also train routers and shared parameters (FedAvg by |D_c|)."
    )
    first_roles: Literal["profile", "draw"] = Field(
        "profile",
        description="Roles of a client the server has no utilities for (round 1, or a first "
        "participation): by eq. (4) on its own f_e, profiled on the global model it receives "
        "(METHOD.md §9a: round 1 ranks by u = f_e), or the mean of the other clients' tables "
        "and, before anyone has reported, a seeded draw.",
    )
    spsa_batches: Literal["routed", "all"] = Field(
        "routed",
        description="Which batches probe an exploring expert: only those that routed a token to "
        "it (the next such explore expert in turn), or every batch, the next in turn, whose "
        "probe of an expert no token reached counts an exact zero.",
    )
    profiling: Literal["stale", "current"] = Field(
        "stale",
        description="stale (METHOD.md §9a): a client uses the profile of the global model it "
        "received at its previous participation, and the pass over the model it receives now, "
        "kept for the next one, overlaps the server's aggregation: its FLOPs count as the "
        "client's compute, not as the round's time (overlapped_flops_predicted); current: it "
        "profiles the model it receives, on the round's critical path (extra_flops_predicted).",
    )

    @model_validator(mode="after")
    def _eps_grows(self) -> FluxConfig:
        if self.eps_max < self.eps_0:
            raise ValueError(f"flux.eps_max ({self.eps_max}) must be >= flux.eps_0 ({self.eps_0})")
        return self


#: How an injected faulty client misbehaves (``hfedmoe.federation.faults``).
FaultKind = Literal[
    "dropout",  # never replies
    "exception",  # raises during training
    "deadline",  # replies after federation.round_timeout
    "nan",
    "inf",
    "shape",
    "dtype",
    "unknown-key",
    "missing-key",
    "norm",  # an update far too large
    "hang",  # never returns (needs federation.round_timeout)
    "crash",  # its process dies at once (needs federation.round_timeout)
    # attacks (persistent with faults.attackers): what a hostile client sends
    "inflate-examples",  # claims 10^12 examples
    "sign-flip",  # its update negated: w_global - delta
    "scale-update",  # its update times faults.scale
    "noise",  # its weights plus Gaussian noise at each tensor's own scale
    "inflate-stats",  # every statistic at the edge of its declared range
    "inf-metric",  # a metric that is infinite
]
FAULT_KINDS: tuple[str, ...] = FaultKind.__args__  # type: ignore[attr-defined]
#: the attacks, which faults.rate draws only where faults.kinds lists them
ATTACK_KINDS = FAULT_KINDS[FAULT_KINDS.index("inflate-examples") :]


class FaultEvent(Section):
    """One injected fault: client ``partition`` misbehaves in ``round``."""

    round: int = Field(gt=0, description="The round the fault happens in.")
    partition: int = Field(ge=0, description="The client (partition id) that misbehaves.")
    kind: FaultKind = Field(description="What it does (the kinds of faults.rate).")


class FaultsConfig(Section):
    """Client faults injected for tests and experiments (none by default)."""

    rate: float = Field(
        0.0, ge=0, le=1, description="Probability that a sampled client misbehaves in a round."
    )
    kinds: list[FaultKind] = Field(
        default_factory=lambda: [
            k for k in FAULT_KINDS if k not in ("deadline", "hang", "crash", *ATTACK_KINDS)
        ],
        min_length=1,
        description="What a faulty client does, drawn uniformly (deadline, hang and crash need "
        "federation.round_timeout).",
    )
    events: list[FaultEvent] = Field(
        default_factory=list, description="Faults at fixed (round, partition), besides rate."
    )
    attackers: list[int] = Field(
        default_factory=list,
        description="Clients (partition ids) that do faults.attack whenever they are sampled.",
    )
    attack: FaultKind | None = Field(
        None,
        description="What the attackers do (any fault kind; dropout: they take no part); "
        "without attackers, nothing.",
    )
    scale: float = Field(10.0, gt=0, description="The factor of a scale-update attack.")


class DeviceTier(Section):
    """A kind of client device (METHOD.md §6): what it can spend on one round of training."""

    name: str = Field(min_length=1, description="The tier's name (devices.assignment uses it).")
    memory: ByteSize = Field(
        description="Memory for training: weights, gradients, optimizer state, activations "
        '(bytes, or a string such as "900MiB")'
    )
    flops: float | None = Field(None, gt=0, description="Sustained FLOP/s; null = not limited.")
    deadline_seconds: float | None = Field(
        None, gt=0, description="Seconds of local training per round; needs flops."
    )
    share: float = Field(1.0, gt=0, description="Relative share of the client population.")

    @model_validator(mode="after")
    def _deadline_needs_flops(self) -> DeviceTier:
        if self.deadline_seconds is not None and self.flops is None:
            raise ValueError(f"tier '{self.name}': deadline_seconds needs flops")
        return self


class DevicesConfig(Section):
    """The clients' devices. No tiers: every client can train the whole model."""

    tiers: list[DeviceTier] = Field(
        default_factory=list, description="Device tiers, spread over clients by share."
    )
    assignment: list[str] | None = Field(
        None, description="An explicit tier name per client (partition order), instead of shares."
    )

    @model_validator(mode="after")
    def _names(self) -> DevicesConfig:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError("devices.tiers: tier names must be unique")
        for i, name in enumerate(self.assignment or []):
            if name not in names:
                raise ValueError(
                    f"devices.assignment[{i}]: unknown tier '{name}' (expected one of: "
                    f"{', '.join(names) or 'no tiers defined'})"
                )
        return self


class PrivacyConfig(Section):
    """Client-level differential privacy (DP-FedAvg; docs/PRIVACY.md): every client's update
    clipped to ``clip_norm`` as one vector, Gaussian noise on the round's sum, a fixed
    denominator, and the epsilon spent after each round from dp-accounting's RDP accountant."""

    enabled: bool = Field(False, description="Train with client-level differential privacy.")
    clip_norm: float | None = Field(
        None,
        gt=0,
        description="C: the L2 norm each client's whole update (every tensor it sends, minus "
        "the global weights) is clipped to.",
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="z: the noise's standard deviation over the sum's sensitivity (2C); set "
        "this or target_epsilon.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="The epsilon the planned rounds may spend: z is calibrated to it.",
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="delta of (epsilon, delta); null = min(1e-5, 1/num_clients^1.1).",
    )
    noise: Literal["server", "client"] = Field(
        "server",
        description="Who adds the noise: server (a trusted aggregator adds it to the round's "
        "sum); client (local DP: each client clips its update and adds N(0, (2zC)^2) itself, so "
        "the server never sees an update in the clear; FedAvg only, fixed clipping).",
    )
    clipping: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="fixed: every round clips at clip_norm; adaptive: clip_norm is the first "
        "round's, and each round moves it towards the target_quantile of the clients' update "
        "norms from a noisy count (Andrew et al. 2021; docs/PRIVACY.md).",
    )
    target_quantile: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="gamma of adaptive clipping: the share of clients whose update the clipping "
        "norm should leave unclipped.",
    )
    clip_learning_rate: float = Field(
        0.2, gt=0, description="eta of adaptive clipping: C' = C exp(-eta (b - gamma))."
    )
    count_noise: float | None = Field(
        None,
        gt=0,
        description="Standard deviation of the noise on adaptive clipping's count of unclipped "
        "clients; null = clients sampled a round / 20 (Andrew et al.). It takes its share of "
        "the privacy budget: the updates get the rest (eq. P5), so it must exceed the noise "
        "multiplier.",
    )
    reproducible_noise: bool = Field(
        False,
        description="false: the noise and each private round's client sample come from a "
        "secret the server draws from the OS when the run starts and keeps in its checkpoint "
        "only (with noise = client, each client draws its own for every reply). true: from "
        "the config's seed, so a rerun repeats them bit for bit; for experiments only, since "
        "whoever knows the seed (every client is sent the config) can subtract the noise.",
    )

    @property
    def local(self) -> bool:
        """Private with the noise on each client (local DP): no sampling amplification, and
        the server adds no noise of its own."""
        return self.enabled and self.noise == "client"

    @model_validator(mode="after")
    def _complete(self) -> PrivacyConfig:
        if not self.enabled:
            return self
        if self.clip_norm is None:
            raise ValueError(
                "privacy.clip_norm: needed with privacy.enabled (the L2 norm each client's "
                "update is clipped to)"
            )
        if self.noise == "client" and self.clipping == "adaptive":
            raise ValueError(
                "privacy.clipping: expected 'fixed' with privacy.noise = 'client' (each client "
                "clips alone; there is no count to release)"
            )
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "privacy: set exactly one of noise_multiplier and target_epsilon "
                "(the noise, or the epsilon it is calibrated to)"
            )
        return self


#: The end points the comparison report can take as its primary one (hfedmoe.experiment.report):
#: the final round's test accuracy, the mean of the last rounds' (steadier when a few skewed
#: clients are sampled a round) and the final per-client accuracy (the mean client's, each on
#: its own distribution). Time to a target is not one: a seed that never reaches the target has
#: no time to pair, so it is reported as a censored median, never tested.
PrimaryEndPoint = Literal["final", "last-rounds", "per-client"]


class ReportConfig(Section):
    """What the comparison report decides on, declared before any result exists: ``hfedmoe
    compare`` records it with the grid (``protocol.json``), and once a run of the grid has
    finished a report or compare that chooses otherwise is refused unless asked with
    ``--change-end-point`` (then the report says so). A verdict follows the primary end point
    alone; every other end point is shown as secondary."""

    primary: PrimaryEndPoint = Field(
        "final",
        description="The end point the verdicts follow: final (final-round test accuracy), "
        "last-rounds (the mean of the last 3 rounds') or per-client (the final mean "
        "per-client accuracy).",
    )
    target: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Test accuracy for rounds, compute and device time to target; null = none "
        "declared (those columns stay empty).",
    )
    reference: str = Field(
        "hfedmoe",
        min_length=1,
        description="The method every other is compared with, seed by seed.",
    )


#: what an experiment's name may be: it names the run's folder (``runs/<time>-<name>``), so
#: nothing that leaves that folder or hides it (``/``, ``\``, ``..``, a leading dot, controls)
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


class ExperimentConfig(Section):
    """One experiment: everything a run needs, validated."""

    name: str = Field(
        "default", description="Names the run's folder: 1-100 letters, digits, '.', '_', '-'."
    )
    seed: int = Field(
        0, ge=0, description="One seed controls data, model init, sampling, training."
    )
    plugins: list[str] = Field(
        [],
        description="Python modules imported before anything else, in every process that "
        "reads the config: they register algorithms and model families of their own "
        "(docs/EXTENDING.md).",
    )
    algorithm: str = Field("fedavg", description="A registered algorithm (hfedmoe.algorithms).")
    threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; null = torch's default."
    )
    trim_memory: bool = Field(
        True,
        description="Give what a process frees back to the operating system at once (glibc's "
        "trim threshold 0, as MALLOC_TRIM_THRESHOLD_=0 sets; nothing elsewhere): a round of "
        "the default job peaks at 2,070 instead of 2,457 MiB for 1.13 times its time on a CPU "
        "(docs/BENCHMARKS.md). false keeps glibc's default heap, faster and larger. Set per "
        "process when a run starts, and kept for the process's life.",
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    hfedmoe: HFedMoEConfig = HFedMoEConfig()
    fftmoe: FFTMoEConfig = FFTMoEConfig()
    flux: FluxConfig = FluxConfig()
    devices: DevicesConfig = DevicesConfig()
    faults: FaultsConfig = FaultsConfig()
    report: ReportConfig = ReportConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    sections: dict[str, dict[str, Any]] = Field(
        {},
        description="The sections plugins add (a plugin algorithm's own options, e.g. "
        "[fedavgm]), each validated by the plugin's model; written as top-level tables, kept "
        "here. Read with ExperimentConfig.section(name).",
    )

    @model_validator(mode="before")
    @classmethod
    def _plugin_sections(cls, raw: Any) -> Any:
        """Import the plugins first, then move each table a plugin registered (``[fedavgm]``)
        into ``sections``, validated by its model with the defaults filled in."""
        if not isinstance(raw, dict):
            return raw
        plugins = raw.get("plugins", [])
        _import_modules(plugins if isinstance(plugins, list) else [])
        raw = dict(raw)
        sections = dict(raw.get("sections") or {})
        for name in [k for k in raw if k in PLUGIN_SECTIONS]:
            sections[name] = raw.pop(name)
        for name, table in sections.items():
            model = PLUGIN_SECTIONS.get(name)
            if model is None:
                raise ValueError(f"sections.{name}: no plugin registered this section")
            try:
                sections[name] = model.model_validate(table).model_dump()
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"{name}.{where}: {first['msg']}") from None
        raw["sections"] = sections
        return raw

    def section(self, name: str) -> Section:
        """A plugin's section (``[name]``), its defaults where the config has none."""
        model = PLUGIN_SECTIONS.get(name)
        if model is None:
            raise KeyError(f"no plugin registered the config section '{name}'")
        return model.model_validate(self.sections.get(name, {}))

    @field_validator("name")
    @classmethod
    def _a_folder_name(cls, name: str) -> str:
        if not RUN_NAME.fullmatch(name):
            raise ValueError(
                "expected 1-100 letters, digits, '.', '_' or '-', not starting with '.' (it "
                "names the run's folder)"
            )
        return name

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, modules: list[str]) -> list[str]:
        _import_modules(modules)  # already done before validation; a no-op then
        return modules

    @model_validator(mode="after")
    def _evaluation_has_data(self) -> ExperimentConfig:
        if self.eval.mode != "central" and self.data.client_test_fraction == 0:
            raise ValueError(
                f"data.client_test_fraction: expected more than 0 with eval.mode = "
                f"'{self.eval.mode}' (each client's share to evaluate on)"
            )
        if self.data.clients == "own" and not self.data.test_path and self.eval.mode != "federated":
            raise ValueError(
                "data.test_path: expected the server's test file (with data.clients = 'own' "
                "it reads no training data), or eval.mode = 'federated'"
            )
        return self

    @model_validator(mode="after")
    def _own_data_fits(self) -> ExperimentConfig:
        paths, n = self.data.client_paths, self.federation.num_clients
        if paths is not None and len(paths) != n:
            raise ValueError(
                f"data.client_paths: {len(paths)} paths for federation.num_clients = {n} "
                "(one per client, in partition order)"
            )
        if self.data.clients == "own" and self.model.construction != "upcycle":
            raise ValueError(
                "model.construction: expected 'upcycle' with data.clients = 'own' (the "
                f"'{self.model.construction}' construction reads a corpus held out of one "
                "data set)"
            )
        return self

    @model_validator(mode="after")
    def _faults_fit(self) -> ExperimentConfig:
        kinds = set(self.faults.kinds if self.faults.rate > 0 else [])
        kinds |= {e.kind for e in self.faults.events}
        kinds |= {self.faults.attack} if self.faults.attack else set()
        if "deadline" in kinds and self.federation.round_timeout is None:
            raise ValueError("faults: a 'deadline' fault needs federation.round_timeout")
        if self.faults.attackers and self.faults.attack is None:
            raise ValueError("faults.attack: the attackers need an attack (e.g. 'sign-flip')")
        for i, p in enumerate(self.faults.attackers):
            if p >= self.federation.num_clients:
                raise ValueError(
                    f"faults.attackers[{i}]: {p} is not a client (expected < "
                    f"federation.num_clients = {self.federation.num_clients})"
                )
        if kinds & {"hang", "crash"} and self.federation.round_timeout is None:
            raise ValueError(
                "faults: a 'hang' or 'crash' fault needs federation.round_timeout (which runs "
                "the clients in worker processes, where they can be stopped or die alone)"
            )
        for i, e in enumerate(self.faults.events):
            if e.partition >= self.federation.num_clients:
                raise ValueError(
                    f"faults.events[{i}].partition: {e.partition} is not a client (expected "
                    f"< federation.num_clients = {self.federation.num_clients})"
                )
        return self

    @model_validator(mode="after")
    def _robust_needs_a_mean(self) -> ExperimentConfig:
        if self.federation.robust != "none" and self.hfedmoe.router_alpha == "as_written":
            raise ValueError(
                "federation.robust: eq. (20) as written (hfedmoe.router_alpha) is a sum over "
                "|S_global|, not a mean a robust statistic can replace; expected 'normalized'"
            )
        return self

    @model_validator(mode="after")
    def _descent_needs_validation(self) -> ExperimentConfig:
        if self.federation.descent_check and self.data.validation_fraction == 0:
            raise ValueError(
                "federation.descent_check: the server's reference is the validation split; "
                "expected data.validation_fraction > 0"
            )
        if self.federation.descent_check and self.privacy.local:
            # each client's noise (std 2zC a coordinate, z >= 1) is far longer along g than
            # an update clipped to C, which descends at a cosine of a few hundredths: the
            # check would reject honest replies about half the time, at random
            raise ValueError(
                "federation.descent_check: a client's own noise hides its update's direction; "
                "expected privacy.noise = 'server' with it"
            )
        return self

    @model_validator(mode="after")
    def _privacy_is_one_mean(self) -> ExperimentConfig:
        if self.privacy.enabled and self.federation.robust != "none":
            raise ValueError(
                "federation.robust: the DP sum's sensitivity holds for a sum of clipped "
                "updates, not a robust statistic; expected 'none' with privacy.enabled"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _fftmoe_adapts_the_dense_parent(cls, raw: Any) -> Any:
        """FFT-MoE runs on the dense parent of the other methods' MoE, with its adapters: the
        model section of an FFT-MoE run is that, whatever MoE the experiment builds. Derived
        from ``[fftmoe]`` before validation, so it is validated with the rest."""
        if not isinstance(raw, dict) or raw.get("algorithm") != "fftmoe":
            return raw
        model = raw.get("model") or {}
        if isinstance(model, ModelConfig):  # built in code rather than read from TOML
            model = model.model_dump(exclude_unset=True)
        if not isinstance(model, dict):
            return raw  # the model section's own validation names what is wrong
        if model.get("lora") is not None:
            raise ValueError("model.lora: FFT-MoE trains its own adapters; expected no LoRA")
        try:
            fftmoe = FFTMoEConfig.model_validate(raw.get("fftmoe") or {})
        except ValidationError:
            return raw  # [fftmoe]'s own validation names what is wrong
        defaults = ModelConfig.model_fields
        adapters = fftmoe.adapters(
            model.get("moe_layers", defaults["moe_layers"].default),
            model.get("router_init_std", defaults["router_init_std"].default),
        )
        return {**raw, "model": {**model, "moe_adapters": adapters, "construction": "upcycle"}}

    @model_validator(mode="after")
    def _corpus_for_construction(self) -> ExperimentConfig:
        if self.model.construction != "upcycle" and self.data.holdout_fraction == 0:
            raise ValueError(
                f"data.holdout_fraction: model.construction '{self.model.construction}' needs a "
                "specialisation corpus that no client sees; expected a fraction in (0, 1), "
                "e.g. 0.2"
            )
        return self

    @model_validator(mode="after")
    def _one_device_per_client(self) -> ExperimentConfig:
        assignment = self.devices.assignment
        if assignment is not None and len(assignment) != self.federation.num_clients:
            raise ValueError(
                f"devices.assignment has {len(assignment)} entries, expected one per client "
                f"(federation.num_clients = {self.federation.num_clients})"
            )
        return self

    @model_validator(mode="after")
    def _bf16_base_computes_in_bf16(self) -> ExperimentConfig:
        if self.model.frozen_dtype == "bf16" and self.train.precision != "bf16":
            raise ValueError(
                f"train.precision: '{self.train.precision}' with model.frozen_dtype = 'bf16' "
                "(a bf16 base computes under bf16 autocast); expected 'bf16'"
            )
        return self

    @model_validator(mode="after")
    def _quantized_base_on_cpu(self) -> ExperimentConfig:
        if self.model.lora and self.model.lora.quantize and self.train.device != "cpu":
            raise ValueError(
                "train.device: a quantised base (model.lora.quantize) trains on the CPU only; "
                "expected 'cpu'"
            )
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return validate(json.loads(text))


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping; raise :class:`ConfigError` naming the first bad key."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a TOML experiment file, apply ``key=value`` overrides, validate.

    Overrides use dotted keys (``federation.rounds=3``); values are TOML literals
    (``model.moe_layers=[4,5]``, ``data.path="x"``), and a bare word is taken as a string.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text (byte {exc.start}); expected a TOML file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {cause(exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``raw[a][b] = value`` for ``item == "a.b=value"`` (in place)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. federation.rounds=3")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word: a string
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set '{item}': '{'.'.join(parents[: i + 1])}' is not a section")
    node[leaf] = value


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling; see configs/default.toml)"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}"
