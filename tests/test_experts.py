"""The expert interface, on every supported MoE family and on the upcycled BERT.

Each test states one rule of the interface (METHOD.md §1, §3, §7) and checks it on
tiny random models of all families."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from hfedmoe.foundation.assets import shipped_path
from hfedmoe.foundation.config import LoraConfig, ModelConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model import build_causal_lm, build_classifier, load_tokenizer
from hfedmoe.model.experts import ExpertEntry, ExpertModel
from hfedmoe.model.hf import load_moe_model
from hfedmoe.model.lora import add_lora
from hfedmoe.training import to_device
from hfedmoe.training.optimizer import ExpertAxis, MaskedAdamW

from .support import families
from .support.configs import TEST_DEVICE

UPCYCLED = ["upcycled_bert", "upcycled_llama"]
WITH_LORA = ["mixtral+lora", "switch_transformers+lora", "upcycled_bert+lora"]
ALL = [*families.FAMILIES, *UPCYCLED, *WITH_LORA]
LORA = LoraConfig(rank=2, targets=["experts", "attention", "routers"])


@pytest.fixture
def moe(request, tiny_bert_dir, tiny_llama_dir):
    """(model, a padded batch, labels) for the family named by the test's parameter, on the
    tests' device (``HFEDMOE_TEST_DEVICE``)."""
    family, _, lora = request.param.partition("+")
    if family == "upcycled_bert":
        cfg = ModelConfig(
            name_or_path=str(tiny_bert_dir), num_experts=4, top_k=2, lora=LORA if lora else None
        )
        model = build_classifier(cfg, ("a", "b", "c"), seed=0).eval()
        with torch.no_grad():
            for block in ExpertModel(model).layers:
                block.router.weight.normal_(0, 1.0)
        batch = dict(
            load_tokenizer(cfg)(
                ["one two three four five", "six seven"], padding=True, return_tensors="pt"
            )
        )
        return _on_test_device(model, batch, {"labels": torch.tensor([0, 2])})
    if family == "upcycled_llama":
        cfg = ModelConfig(name_or_path=str(tiny_llama_dir), num_experts=4, top_k=2)
        model = build_causal_lm(cfg, seed=0).eval()
        with torch.no_grad():
            for block in ExpertModel(model).layers:
                block.router.weight.normal_(0, 1.0)
        batch = dict(
            load_tokenizer(cfg)(
                ["one two three four five", "six seven"], padding=True, return_tensors="pt"
            )
        )
        return _on_test_device(model, batch, {"labels": batch["input_ids"]})
    model, batch = families.build(family), families.batch(family)
    if lora:
        model = add_lora(model, LORA)
    target = batch.get("decoder_input_ids", batch["input_ids"])
    return _on_test_device(model, batch, {"labels": target})


def _on_test_device(model, batch: dict, labels: dict) -> tuple:
    device = torch.device(TEST_DEVICE)
    return model.to(device), to_device(batch, device), to_device(labels, device)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("moe", ALL, indirect=True)
def test_parameter_groups_partition_every_parameter(moe):
    model, _, _ = moe
    em = ExpertModel(model)
    groups = em.param_groups()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(groups["experts"] + groups["routers"] + groups["shared"]) == sorted(names)
    for layer in em.layers:  # every MoE layer's gating network (with its LoRA, if any)
        assert [n for n in groups["routers"] if n.startswith(layer.name + ".")]
    assert groups["experts"] and groups["shared"]
    assert len(em.experts()) == em.num_layers * em.num_experts


@pytest.mark.parametrize("moe", ALL, indirect=True)
def test_sample_probabilities_average_the_real_tokens_softmax(moe):
    model, batch, _ = moe
    em = ExpertModel(model)
    with torch.no_grad(), em.capture() as cap:
        model(**batch)
    probs = cap.sample_probs(batch["attention_mask"])
    assert probs.shape == (em.num_layers, 2, em.num_experts)
    torch.testing.assert_close(probs.sum(-1), torch.ones(em.num_layers, 2))

    # padding does not count: changing the padded tokens changes nothing
    repadded = dict(batch, input_ids=batch["input_ids"].clone())
    pad = batch["attention_mask"] == 0
    repadded["input_ids"][pad] = (repadded["input_ids"][pad] + 7) % 100
    with torch.no_grad(), em.capture() as cap2:
        model(**repadded)
    torch.testing.assert_close(cap2.sample_probs(batch["attention_mask"]), probs)
    assert torch.equal(cap2.routed(batch["attention_mask"]), cap.routed(batch["attention_mask"]))

    maxed = cap.sample_probs(batch["attention_mask"], reduce="max")
    assert (maxed >= probs - 1e-6).all()


@pytest.mark.parametrize("moe", ALL, indirect=True)
def test_routed_set_holds_every_tokens_top_k(moe):
    model, batch, _ = moe
    em = ExpertModel(model)
    with torch.no_grad(), em.capture() as cap:
        model(**batch)
    routed = cap.routed(batch["attention_mask"])
    assert routed.shape == em.shape and routed.dtype == torch.bool
    for layer in em.layers:  # at least one token was sent to k distinct experts
        assert int(routed[layer.position].sum()) >= layer.top_k


def test_routing_capture_by_hand(tiny_bert_dir):
    """Router logits (0, 9, 0, 9) for every token; real tokens sent to experts {1, 3}, padding
    to {0, 2}: E_union is {1, 3} and G(x) = softmax(0, 9, 0, 9) = (a, b, a, b) with
    a = 1 / (2 + 2 e^9) = 6.1697e-5 and b = e^9 / (2 + 2 e^9) = 0.49993830."""
    cfg = ModelConfig(name_or_path=str(tiny_bert_dir), num_experts=4, top_k=2, moe_layers=[1])
    model = build_classifier(cfg, ("a", "b"), seed=0).eval()
    em = ExpertModel(model)
    batch = load_tokenizer(cfg)(["a b c d e", "f"], padding=True, return_tensors="pt")
    real_N = batch["attention_mask"].reshape(-1).bool()
    logits = torch.tensor([0.0, 9.0, 0.0, 9.0])

    def forced(module, args, out):
        indices = torch.where(real_N[:, None], torch.tensor([1, 3]), torch.tensor([0, 2]))
        return logits.expand_as(out[0]), out[1], indices

    em.layers[0].router.register_forward_hook(forced)
    with torch.no_grad(), em.capture() as cap:
        model(**batch)
    assert cap.routed(batch["attention_mask"]).tolist() == [[False, True, False, True]]
    assert cap.routed(None).tolist() == [[True, True, True, True]]  # padding counted
    a, b = 6.1697e-5, 0.49993830
    expected = torch.tensor([[[a, b, a, b], [a, b, a, b]]])
    torch.testing.assert_close(
        cap.sample_probs(batch["attention_mask"]), expected, atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("moe", ALL, indirect=True)
def test_strict_mode_never_routes_outside_the_subset(moe):
    model, batch, _ = moe
    em = ExpertModel(model)
    allowed = torch.zeros(em.shape, dtype=torch.bool)
    allowed[:, 1] = True
    allowed[0, 3] = True
    with torch.no_grad(), em.restrict_routing(allowed), em.capture() as cap:
        model(**batch)
    routed = cap.routed(batch["attention_mask"])
    assert not (routed & ~allowed).any()
    assert routed[:, 1].all()


@pytest.mark.parametrize("moe", ALL, indirect=True)
def test_strict_mode_with_every_expert_allowed_is_the_models_own_routing(moe):
    model, batch, _ = moe
    em = ExpertModel(model)
    with torch.no_grad():
        free = model(**batch).logits
        with em.restrict_routing(torch.ones(em.shape, dtype=torch.bool)):
            strict = model(**batch).logits
    torch.testing.assert_close(strict, free, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe", ALL, indirect=True)
def test_expert_read_write_round_trips_and_touches_nothing_else(moe):
    model, _, _ = moe
    em = ExpertModel(model)
    before = _state(model)
    em.write_expert((0, 1), em.read_expert((0, 1)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    experts_before = {x: em.read_expert(x) for x in em.experts()}
    target = (em.num_layers - 1, 2)
    new = {n: torch.full_like(t, 0.5) for n, t in experts_before[target].items()}
    em.write_expert(target, new)
    assert all(torch.equal(t, new[n]) for n, t in em.read_expert(target).items())
    for x, tensors in experts_before.items():
        if x != target:
            assert all(torch.equal(em.read_expert(x)[n], t) for n, t in tensors.items())
    groups = em.param_groups()
    state = model.state_dict()
    for name in groups["routers"] + groups["shared"]:
        assert torch.equal(state[name], before[name])


@pytest.mark.parametrize("moe", ["mixtral", "upcycled_bert"], indirect=True)
def test_expert_writes_are_checked(moe):
    model, _, _ = moe
    em = ExpertModel(model)
    tensors = em.read_expert((0, 0))
    with pytest.raises(KeyError, match="expected tensors"):
        em.write_expert((0, 0), {**tensors, "bogus": torch.zeros(1)})
    name = next(iter(tensors))
    with pytest.raises(ValueError, match="shape"):
        em.write_expert((0, 0), {**tensors, name: torch.zeros(3)})
    with pytest.raises(IndexError):
        em.read_expert((0, em.num_experts))
    # routers are addressed by their state-dict names (what aggregation uses)
    routers = [n for names in em.router_entries().values() for n in names]
    assert sorted(routers) == sorted(em.param_groups()["routers"])


@pytest.mark.parametrize("moe", ALL, indirect=True)
def test_inactive_experts_and_their_optimizer_state_do_not_move(moe):
    """METHOD.md §7: outside E_active no gradient, no Adam-moment step, no weight decay."""
    model, batch, labels = moe
    model.train()
    em = ExpertModel(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, expert_axes=em.expert_axes())
    model(**batch, **labels).loss.backward()  # step 1: everything moves, moments become non-zero
    opt.step()
    opt.zero_grad(set_to_none=True)

    active = torch.zeros(em.shape, dtype=torch.bool)
    active[:, 0] = True
    params_before = {x: em.read_expert(x) for x in em.experts()}
    state_before = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}

    model(**batch, **labels).loss.backward()
    opt.step(em.expert_grad_mask(active))

    def unchanged(x) -> bool:
        return all(torch.equal(em.read_expert(x)[n], t) for n, t in params_before[x].items())

    assert all(unchanged(x) for x in em.experts() if not active[x])
    assert not all(unchanged(x) for x in em.experts() if active[x])
    for layer in em.layers:
        for e in range(em.num_experts):
            if active[layer.position, e]:
                continue
            one = torch.zeros(em.num_experts, dtype=torch.bool)
            one[e] = True
            owned = (  # (parameter, expert e's part of a tensor shaped like it)
                [
                    (
                        p,
                        lambda t, a=a, one=one: t.index_select(
                            a.dim, a.positions(one).to(t.device)
                        ),
                    )
                    for p, a in layer.axes.values()
                ]
                if layer.axes
                else [(p, lambda t: t) for p in layer.trainable[e].values()]
            )
            for p, part in owned:
                now, was = opt.state.get(p, {}), state_before.get(p, {})
                assert now.keys() == was.keys()  # an expert never trained has no state at all
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in was:
                        assert torch.equal(part(now[key]), part(was[key])), (layer.name, e, key)
                if "step" in was and layer.axes:
                    assert now["step"][e] == was["step"][e]


@pytest.mark.parametrize("moe", UPCYCLED, indirect=True)
def test_update_only_skips_exactly_the_inactive_experts_weight_gradients(moe):
    """Backward-only mode with the choice made after the forward pass (eq. (15)): inactive
    experts compute no weight gradient, and every other gradient is what full backward gives."""
    model, batch, labels = moe
    em = ExpertModel(model)
    model(**batch, **labels).loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    active = torch.zeros(em.shape, dtype=torch.bool)
    active[0, :2] = True
    active[-1, 3] = True
    loss = model(**batch, **labels).loss
    with em.update_only(active):
        loss.backward()

    inactive = {
        name
        for layer in em.layers
        for e, params in enumerate(layer.modular)
        if not active[layer.position, e]
        for name, p in model.named_parameters()
        if any(p is q for q in params.values())
    }
    assert inactive
    for name, p in model.named_parameters():
        if name in inactive:
            assert p.grad is None, name
        elif name in full:
            torch.testing.assert_close(p.grad, full[name], atol=1e-6, rtol=1e-5)
    assert all(getattr(m, "trainable", True) for m in model.modules())  # flags restored


def test_masked_adamw_equals_torch_adamw_when_nothing_is_masked():
    torch.manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(3, 4, 5))
    dense = torch.nn.Parameter(torch.randn(6))
    ref = [torch.nn.Parameter(fused.detach().clone()), torch.nn.Parameter(dense.detach().clone())]
    ours = MaskedAdamW(
        [fused, dense], lr=0.01, weight_decay=0.1, expert_axes={fused: ExpertAxis.rows(3)}
    )
    theirs = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, foreach=False)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(3, 4, 5, generator=g), torch.randn(6, generator=g)]
        for p, q, gr in zip([fused, dense], ref, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(fused, ref[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dense, ref[1], atol=1e-6, rtol=1e-6)


def test_cost_accounting_by_hand(tiny_bert_dir):
    """Tiny BERT: H=32, I=64, 2 layers upcycled into 4 experts (top-2), 3 labels."""
    cfg = ModelConfig(name_or_path=str(tiny_bert_dir), num_experts=4, top_k=2)
    em = ExpertModel(build_classifier(cfg, ("a", "b", "c"), seed=0))
    cost = em.param_bytes()
    # expert = fc_in (64x32 + 64) + fc_out (32x64 + 32) float32 parameters
    assert cost.per_expert == ((2048 + 64 + 2048 + 32) * 4,) * 2
    assert cost.experts == 2 * 4 * 4192 * 4
    assert cost.routers == 2 * (4 * 32) * 4
    forward, backward = em.flops_per_token()
    # matmul weights per token: attention q,k,v,o 2 x 4 x 32x32, pooler 32x32, classifier 3x32;
    # routers 2 x 4x32; experts 2 layers x top-2 x (64x32 + 32x64)
    shared, routers, routed = 2 * 4 * 1024 + 1024 + 96, 2 * 128, 2 * 2 * 4096
    assert forward == 2 * (shared + routers + routed)
    assert backward == forward + 2 * (shared + routers + routed)
    half = torch.tensor([[True, True, False, False]] * 2)
    assert em.flops_per_token(half)[1] == forward + 2 * (shared + routers + routed / 2)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_families_load_from_a_local_directory(family, tmp_path):
    model = families.build(family)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(shipped_path("all-MiniLM-L6-v2")).save_pretrained(tmp_path)
    loaded = load_moe_model(tmp_path)
    batch = families.batch(family)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    assert ExpertModel(loaded).shape == ExpertModel(model).shape


def test_unsupported_architecture_is_an_input_error(tiny_bert_dir, tmp_path):
    with pytest.raises(HFedMoEError, match=r"architecture 'bert' is not a supported MoE family"):
        load_moe_model(tiny_bert_dir)
    with pytest.raises(HFedMoEError, match=r"has no config\.json"):
        load_moe_model(tmp_path)


def test_an_experts_lora_slice_is_its_own_weight_delta():
    """PEFT's stacked LoRA: writing expert 2's slices changes expert 2's effective weight only."""
    model = add_lora(families.build("mixtral"), LoraConfig(rank=2, targets=["experts"]))
    em = ExpertModel(model)
    for expert in em.experts():  # all deltas zero
        em.write_expert(expert, {n: torch.zeros_like(t) for n, t in em.read_expert(expert).items()})
    g = torch.Generator().manual_seed(0)
    em.write_expert(
        (1, 2), {n: torch.randn(t.shape, generator=g) for n, t in em.read_expert((1, 2)).items()}
    )
    for layer in em.layers:
        wrappers = [m for m in layer.block.experts.modules() if hasattr(m, "parameter_name")]
        assert len(wrappers) == 2  # gate_up_proj and down_proj
        for wrapper in wrappers:
            delta = wrapper.get_delta_weight("default")  # (E, ...) like the fused weight
            for e in range(em.num_experts):
                changed = bool(delta[e].abs().sum() > 0)
                assert changed == (layer.position == 1 and e == 2), (wrapper.parameter_name, e)


def test_a_contiguous_expert_part_is_a_view_and_writes_land_in_place():
    """Reading an expert of a fused tensor copies nothing; writing one changes only its rows."""
    fused = torch.arange(24.0).reshape(4, 3, 2)
    row = ExpertEntry("w", dim=0, index=torch.tensor([2]))
    part = row.take(fused)
    assert part.data_ptr() == fused[2].data_ptr() and part.shape == (1, 3, 2)
    scattered = ExpertEntry("w", dim=0, index=torch.tensor([0, 2]))
    assert torch.equal(scattered.take(fused), fused[[0, 2]])
    before = fused.clone()
    row.write_(fused, torch.zeros(1, 3, 2))
    assert torch.equal(fused[2], torch.zeros(3, 2))
    assert torch.equal(fused[[0, 1, 3]], before[[0, 1, 3]])


@pytest.mark.parametrize("moe", ALL, indirect=True)
def test_each_moe_layer_knows_its_transformer_block_from_the_module_tree(moe):
    # the block is its index in the list of blocks that holds it, the order attention outputs
    # follow (FLUX's attention-weighted profile reads them by it)
    model, _, _ = moe
    for layer in ExpertModel(model).layers:
        block = layer.transformer_block
        assert isinstance(block, int)
        assert any(
            isinstance(m, torch.nn.ModuleList) and len(m) > block
            and any(sub is layer.block for sub in m[block].modules())
            for m in model.modules()
        )  # fmt: skip
