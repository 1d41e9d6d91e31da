"""A trained model out of hfedmoe: a standard Hugging Face directory that
``AutoModelForCausalLM.from_pretrained`` loads without hfedmoe installed.

| the run's model                              | exported as                                |
| -------------------------------------------- | ------------------------------------------ |
| an upcycled Llama / Mistral / Qwen2 decoder  | Qwen2-MoE (``Qwen2MoeForCausalLM``)        |
| a native MoE (Mixtral, Qwen-MoE, OLMoE, ...) | its own architecture                       |
| an upcycled BERT-family classifier           | custom code (``auto_map``), see below      |
| either with LoRA adapters                    | the same, adapters merged into the weights |

Why Qwen2-MoE: it is the one transformers MoE decoder that expresses an upcycled model exactly.
Its dense layers (``mlp_only_layers``) keep the parent's MLP, its router is a bias-free linear
map with softmax over all experts and renormalised top-k weights (``norm_topk_prob``), as
hfedmoe's (METHOD.md eq. (1)-(2)), and its experts are SwiGLU MLPs, as the parent's. Its
attention is Llama's (query/key/value biases optional: a Qwen2 parent's are kept). The shared
expert it adds is given zero width, so it adds nothing. Serving engines that know Qwen2-MoE
(vLLM, llama.cpp via conversion, TGI) can run the result.

An upcycled BERT-family classifier has no transformers class: it is exported with Hugging
Face's convention for custom architectures, a standalone modeling file beside the weights
(``hfedmoe.model.remote``) named in ``auto_map``, loaded with ``trust_remote_code=True``.

Not exported: FFT-MoE's adapters (no standard architecture has MoE adapters beside a dense
FFN), a Qwen3 parent (its query/key norms need Qwen3-MoE, not built yet), and a Llama with an
output bias on its attention or biases on its MLP (Qwen2-MoE has neither).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.adapters import BertOutputWithAdapter, ParallelAdapter
from hfedmoe.model.checkpoint import load_checkpoint
from hfedmoe.model.frozen import widen
from hfedmoe.model.moe import GatedExpertFFN, MoEFeedForward
from hfedmoe.model.upcycle import LLAMA_LIKE, transformer_blocks


def export_model(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``checkpoint`` (a run's ``model/`` directory, or the run directory) to ``out_dir``
    as a standard transformers model with its tokenizer; atomic (a temporary folder renamed
    into place), and ``out_dir`` must not hold files already."""
    source = Path(checkpoint)
    if (source / "model").is_dir():
        source = source / "model"
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise HFedMoEError(f"output directory '{out}' already holds files; choose a new one")
    model, tokenizer = load_checkpoint(source)
    standard = standard_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        standard.save_pretrained(staging)
        _save_tokenizer(tokenizer, staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def standard_model(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` (hfedmoe's, in eval mode) as a model of a standard transformers class, in fp32
    (a bf16 frozen base is widened before LoRA's adapters merge into it)."""
    widen(model)
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
        model = model.merge_and_unload()
    blocks = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if any(isinstance(m, (ParallelAdapter, BertOutputWithAdapter)) for m in model.modules()):
        raise HFedMoEError("export: FFT-MoE's MoE adapters have no standard architecture")
    if not blocks:  # a native MoE (or a dense model): already a transformers class
        return model
    model_type = model.config.model_type
    if model_type == "bert":
        return to_remote_bert(model)
    if model_type not in LLAMA_LIKE or model_type == "qwen3":
        raise HFedMoEError(
            f"export: an upcycled '{model_type}' model has no standard MoE architecture here "
            "(decoders upcycled from llama, mistral or qwen2 export as Qwen2-MoE)"
        )
    return to_qwen2_moe(model)


def to_qwen2_moe(model: PreTrainedModel) -> PreTrainedModel:
    """An upcycled Llama-style causal LM as ``Qwen2MoeForCausalLM`` with the same weights."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    c = model.config
    if getattr(c, "mlp_bias", False):
        raise HFedMoEError("export: Qwen2-MoE has no MLP biases (the parent has mlp_bias)")
    qkv_bias = c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
    layers = transformer_blocks(model)
    if c.model_type != "qwen2" and getattr(c, "attention_bias", False):
        raise HFedMoEError("export: Qwen2-MoE has no attention output bias (attention_bias)")
    moe = {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, MoEFeedForward)}
    first = next(iter(moe.values()))
    expert = first.experts[0]
    assert isinstance(expert, GatedExpertFFN)
    sliding = getattr(c, "sliding_window", None) if c.model_type == "mistral" else None
    config = Qwen2MoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=getattr(c, "rope_parameters", None),
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        use_sliding_window=sliding is not None,
        sliding_window=sliding,
        max_window_layers=c.num_hidden_layers,
        layer_types=[("sliding_attention" if sliding else "full_attention")] * c.num_hidden_layers,
        decoder_sparse_step=1,
        moe_intermediate_size=expert.gate_proj.out_features,
        shared_expert_intermediate_size=0,
        num_experts_per_tok=first.top_k,
        num_experts=first.num_experts,
        norm_topk_prob=True,
        mlp_only_layers=[i for i in range(len(layers)) if i not in moe],
        qkv_bias=qkv_bias,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}.mlp."
        if i not in moe:
            state.update({prefix + k: v for k, v in layer.mlp.state_dict().items()})
            continue
        block = moe[i]
        experts = list(block.experts)
        state[prefix + "gate.weight"] = block.gate.weight
        state[prefix + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]
        )
        state[prefix + "experts.down_proj"] = torch.stack([e.down_proj.weight for e in experts])
        hidden = c.hidden_size
        state[prefix + "shared_expert.gate_proj.weight"] = torch.zeros(0, hidden)
        state[prefix + "shared_expert.up_proj.weight"] = torch.zeros(0, hidden)
        state[prefix + "shared_expert.down_proj.weight"] = torch.zeros(hidden, 0)
        state[prefix + "shared_expert_gate.weight"] = torch.zeros(1, hidden)
    with torch.device("meta"):
        exported = Qwen2MoeForCausalLM(config)
    missing, unexpected = exported.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and c.tie_word_embeddings)]
    if missing or unexpected:
        raise HFedMoEError(f"export: weights do not map onto Qwen2-MoE ({missing or unexpected})")
    if c.tie_word_embeddings:
        exported.tie_weights()
    # built on the meta device (no second copy of the weights); the rotary embedding's buffers
    # are not in a state dict, so it is built again for real
    exported.model.rotary_emb = type(exported.model.rotary_emb)(config=config)
    meta = [n for n, t in [*exported.named_parameters(), *exported.named_buffers()] if t.is_meta]
    assert not meta, f"export left tensors unset: {meta}"
    exported.generation_config = model.generation_config
    return exported.eval()


def to_remote_bert(model: PreTrainedModel) -> PreTrainedModel:
    """An upcycled BERT classifier as the standalone class shipped with the export
    (``hfedmoe.model.remote.modeling_hfedmoe_bert``), registered for the Auto classes so that
    ``save_pretrained`` copies its modeling file and writes ``auto_map``."""
    from hfedmoe.model.remote import modeling_hfedmoe_bert as remote

    layers = transformer_blocks(model)
    moe = [i for i, layer in enumerate(layers) if isinstance(layer.intermediate, MoEFeedForward)]
    first = layers[moe[0]].intermediate
    settings = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        settings.pop(key, None)
    config = remote.HFedMoEBertConfig(
        moe_layers=moe,
        num_experts=first.num_experts,
        num_experts_per_tok=first.top_k,
        **settings,
    )
    remote.HFedMoEBertConfig.register_for_auto_class()
    remote.HFedMoEBertForSequenceClassification.register_for_auto_class(
        "AutoModelForSequenceClassification"
    )
    with torch.device("meta"):
        exported = remote.HFedMoEBertForSequenceClassification(config)
    exported.load_state_dict(model.state_dict(), strict=True, assign=True)
    return exported.eval()


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    tokenizer.save_pretrained(directory)
