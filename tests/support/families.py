"""Tiny random configurations of every supported Hugging Face MoE family (2 MoE layers or more,
4 experts, hidden size 32), for tests that must run in seconds."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128  # enough for random token ids; a model used with a real tokenizer needs its size


def _common(vocab: int, **extra) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )


def _deepseek(vocab: int, **extra) -> dict:
    common = _common(vocab)
    common["num_key_value_heads"] = 4  # multi-head latent attention: as many as the heads
    return dict(
        common,
        intermediate_size=64,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        v_head_dim=8,
        qk_nope_head_dim=8,
        n_group=1,
        topk_group=1,
        **extra,
    )


FAMILIES = {
    "switch_transformers": lambda v: T.SwitchTransformersForConditionalGeneration(
        T.SwitchTransformersConfig(
            vocab_size=v,
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=2,
            num_experts=4,
            expert_capacity=64,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    ),
    "mixtral": lambda v: T.MixtralForCausalLM(
        T.MixtralConfig(
            **_common(v, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
        )
    ),
    "qwen2_moe": lambda v: T.Qwen2MoeForCausalLM(
        T.Qwen2MoeConfig(
            **_common(
                v,
                intermediate_size=64,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
                num_experts=4,
                num_experts_per_tok=2,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        )
    ),
    "qwen3_moe": lambda v: T.Qwen3MoeForCausalLM(
        T.Qwen3MoeConfig(
            **_common(
                v,
                intermediate_size=64,
                moe_intermediate_size=32,
                num_experts=4,
                num_experts_per_tok=2,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                head_dim=8,
            )
        )
    ),
    "olmoe": lambda v: T.OlmoeForCausalLM(
        T.OlmoeConfig(**_common(v, intermediate_size=32, num_experts=4, num_experts_per_tok=2))
    ),
    "deepseek_v2": lambda v: T.DeepseekV2ForCausalLM(
        T.DeepseekV2Config(**_deepseek(v, topk_method="greedy"))
    ),
    "deepseek_v3": lambda v: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**_deepseek(v))),
}


def build(family: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family](vocab)
    # random init leaves routers near-uniform; spread them so that routing is decisive
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.classifier.weight")):
                p.normal_(0, 1.0)
    return model.eval()


def batch(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two sequences of 7 tokens, the second padded after 5."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "switch_transformers":
        out["decoder_input_ids"] = ids[:, :5].contiguous()
    return out
