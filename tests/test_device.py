"""``train.device``: local training and the server's evaluation run on the device the config
names, and give what the CPU gives; everything else (selection, aggregation, the wire) stays on
the CPU. The CUDA tests run where torch sees a GPU; ``HFEDMOE_TEST_DEVICE=cuda`` also moves the
end-to-end runs and the expert interface's tests there (docs/TESTING.md)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tomli_w
import torch

from hfedmoe.algorithms.maths.importance import select_active
from hfedmoe.federation.workload import client_data, client_model, label_names, server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.foundation.errors import ConfigError, HFedMoEError
from hfedmoe.training import StepHooks, evaluate, resolve_device, train_local

from .support.cli import run_cli
from .support.configs import tiny_raw

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def test_auto_is_cuda_where_torch_sees_one_else_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def _tiny_config(tmp_path, tiny_bert_dir, **sections):
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(tiny_raw(tiny_bert_dir, **sections)))
    return str(path)


def test_a_device_torch_cannot_see_is_a_one_line_error(tiny_bert_dir, tmp_path):
    with pytest.raises(HFedMoEError, match=r"^train\.device: 'cuda:99', but torch sees no such"):
        resolve_device("cuda:99")
    out = tmp_path / "run"
    config = _tiny_config(tmp_path, tiny_bert_dir, train={"device": "cuda:99"})
    proc = run_cli("run", config, "-o", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "hfedmoe: error: train.device: 'cuda:99', but torch sees no such CUDA device"
    )
    assert not out.exists()


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", ""])
def test_device_names_are_checked(tiny_bert_dir, bad):
    with pytest.raises(ConfigError) as exc:
        validate(tiny_raw(tiny_bert_dir, train={"device": bad}))
    assert str(exc.value) == f"train.device: expected cpu, auto, cuda or cuda:N (got '{bad}')"


def test_a_quantised_base_must_train_on_the_cpu(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir, train={"device": "cuda"})
    raw["model"]["lora"] = {"rank": 2, "quantize": "nf4"}
    with pytest.raises(ConfigError, match=r"^train\.device: a quantised base .* expected 'cpu'"):
        validate(raw)


class TwoLikeliestExperts(StepHooks):
    """Masked training as HFedMoE does it: the routed experts with the highest mean router
    probability, 2 in all (the hooks see the routing on the CPU)."""

    def select_experts(self, capture, batch, routed_LE):
        score_LE = capture.sample_probs(batch["attention_mask"]).mean(1)
        return select_active(score_LE, routed_LE, 2, "global")


@cuda
def test_training_on_cuda_gives_what_the_cpu_gives(tiny_bert_dir):
    """The same client, seed and batches on both devices: the same experts updated, weights
    within float rounding, and the model handed back on the CPU."""
    results, states = {}, {}
    for device in ("cpu", "cuda"):
        cfg = validate(tiny_raw(tiny_bert_dir, train={"device": device}))
        model = client_model(cfg, label_names(cfg))
        for module in model.modules():  # CPU and CUDA draw different dropout masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        data, rng = client_data(cfg, 0, 2), np.random.default_rng(0)
        results[device] = train_local(model, data, cfg.train, rng, TwoLikeliestExperts())
        assert all(p.device.type == "cpu" for p in model.parameters())
        states[device] = copy.deepcopy(model.state_dict())
    assert torch.equal(results["cpu"].expert_updates, results["cuda"].expert_updates)
    assert results["cuda"].max_active_per_step == 2
    assert results["cuda"].mean_loss == pytest.approx(results["cpu"].mean_loss, abs=1e-4)
    for name, tensor in states["cpu"].items():
        torch.testing.assert_close(states["cuda"][name], tensor, atol=1e-4, rtol=1e-4)
    assert results["cuda"].peak_memory_increase > 0  # CUDA allocator statistics


@cuda
def test_evaluation_on_cuda_gives_what_the_cpu_gives(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir))
    model, test = client_model(cfg, label_names(cfg)), server_workload(cfg).test
    on_cpu, on_cuda = evaluate(model, test, 16, "cpu"), evaluate(model, test, 16, "cuda")
    assert on_cuda.accuracy == on_cpu.accuracy
    assert on_cuda.loss == pytest.approx(on_cpu.loss, abs=1e-5)
    assert all(p.device.type == "cpu" for p in model.parameters())


@cuda
def test_a_federated_run_on_cuda(tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    config = _tiny_config(tmp_path, tiny_bert_dir, train={"device": "cuda"})
    proc = run_cli("run", config, "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.json").is_file()
