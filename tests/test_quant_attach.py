"""attach_quantizers: name policy, errors, enable flag, checkpoints, fp64, and the optimizer guard
(including a few-line reproduction of the released QT-DoG module swap after the optimizer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlens.quant import (
    LSQQuantizer,
    QuantConv2d,
    QuantLinear,
    assert_all_trainable_in_optimizer,
    attach_quantizers,
    eligible_module_names,
    is_quantization_enabled,
    iter_quantizers,
    quantization_state,
    quantized_module_names,
    quantizer_parameter_names,
    set_quantization_enabled,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Net(nn.Module):
    """A small featurizer + classifier with DomainBed-like names."""

    def __init__(self) -> None:
        super().__init__()
        self.featurizer = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block(4), Block(4),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
        self.classifier = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.featurizer(x)))


def make_net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)  # module init only
    return Net().to(dtype)


def batch(dtype=torch.float32):
    return (torch.randn(8, 3, 6, 6, generator=gen(1), dtype=dtype),
            torch.randint(0, 3, (8,), generator=gen(2)))


ALL = ["featurizer.0", "featurizer.2.conv1", "featurizer.2.conv2", "featurizer.3.conv1",
       "featurizer.3.conv2", "featurizer.6", "classifier"]


def test_names_preserved_and_parameters_reused():
    net = make_net()
    before = dict(net.named_parameters())
    rng = torch.get_rng_state()
    names = attach_quantizers(net, keep_float=["classifier"])
    assert torch.equal(rng, torch.get_rng_state())  # attaching consumes no global randomness
    assert names == ALL[:-1] == quantized_module_names(net)
    after = dict(net.named_parameters())
    for n, p in before.items():
        assert after[n] is p  # the very same Parameter objects
    new = sorted(set(after) - set(before))
    assert new == sorted(f"{m}.weight_quantizer.step_size" for m in names)
    assert sorted(quantizer_parameter_names(net)) == new
    assert type(net.classifier) is nn.Linear
    assert isinstance(net.featurizer[0], QuantConv2d) and isinstance(net.featurizer[6], QuantLinear)
    assert [n for n, _ in iter_quantizers(net, "weight")] == [f"{m}.weight_quantizer" for m in names]
    assert list(iter_quantizers(net, "activation")) == []


def test_patterns_and_module_types():
    net = make_net()
    assert eligible_module_names(net) == ALL
    names = attach_quantizers(net, quantize=["featurizer.2.*", "featurizer.0"], module_types=("conv",))
    assert names == ["featurizer.0", "featurizer.2.conv1", "featurizer.2.conv2"]
    # a second attach on the remaining float modules is allowed
    assert attach_quantizers(net, quantize="featurizer.3.*", bits=4) == ["featurizer.3.conv1", "featurizer.3.conv2"]
    assert net.featurizer[3].conv1.weight_quantizer.bits == 4


@pytest.mark.parametrize("kwargs, what", [
    ({"quantize": ["featurizer.*", "fc"]}, "quantize pattern 'fc'"),
    ({"keep_float": ["conv1"]}, "keep_float pattern 'conv1'"),  # QT-DoG's `excepts: conv1, fc`
    ({"quantize": ["classifier"], "module_types": ("conv",)}, "quantize pattern 'classifier'"),
])
def test_unmatched_pattern_raises_with_eligible_names(kwargs, what):
    net = make_net()
    with pytest.raises(ValueError) as info:
        attach_quantizers(net, **kwargs)
    msg = str(info.value)
    assert what in msg and "matches no eligible module" in msg and "featurizer.2.conv1" in msg
    assert "\n" not in msg
    assert quantized_module_names(net) == []  # nothing was replaced


def test_bad_arguments_raise_before_touching_the_model():
    net = make_net()
    with pytest.raises(ValueError, match="module_types"):
        attach_quantizers(net, module_types=("bn",))
    with pytest.raises(ValueError, match="bits"):
        attach_quantizers(net, bits=9)
    assert quantized_module_names(net) == []
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="shared"):
        attach_quantizers(nn.Sequential(shared, nn.ReLU(), shared))


def test_enable_flag_toggles_and_to_float():
    net = make_net().eval()
    x, _ = batch()
    ref = net(x)
    attach_quantizers(net, bits=3)
    assert quantization_state(net) == "off" and not is_quantization_enabled(net)
    assert torch.equal(net(x), ref)  # disabled: the float function, bitwise
    assert set_quantization_enabled(net, True) == 7
    assert quantization_state(net) == "on" and is_quantization_enabled(net)
    assert not torch.allclose(net(x), ref)
    net.featurizer[0].weight_quantizer.set_enabled(False)
    assert quantization_state(net) == "mixed"
    set_quantization_enabled(net, False)
    assert torch.equal(net(x), ref)
    conv = net.featurizer[0].to_float()
    assert type(conv) is nn.Conv2d and conv.weight is net.featurizer[0].weight
    assert quantization_state(make_net()) == "none"


def test_state_dict_round_trip_weights_only(tmp_path):
    net = make_net()
    attach_quantizers(net, activations=True, keep_float=["featurizer.0"])
    set_quantization_enabled(net, True)
    x, _ = batch()
    net.train()
    net(x)  # lazy activation init
    net.eval()
    out = net(x)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict()}, path)
    sd = torch.load(path, weights_only=True)["model"]
    assert sd["featurizer.2.conv1.weight_quantizer.enabled"].dtype == torch.bool
    fresh = make_net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # make sure everything comes from the checkpoint
    attach_quantizers(fresh, activations=True, keep_float=["featurizer.0"])
    assert quantization_state(fresh) == "off"
    fresh.load_state_dict(sd)
    assert quantization_state(fresh) == "on"
    assert all(q.is_initialized() for _, q in iter_quantizers(fresh))
    assert torch.equal(fresh.eval()(x), out)


def test_float64_model():
    net = make_net(torch.float64)
    attach_quantizers(net, activations=True, act_signed=True, enabled=True)
    for _, q in iter_quantizers(net):
        assert q.step_size.dtype == torch.float64
    x, y = batch(torch.float64)
    net.train()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert loss.dtype == torch.float64
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in net.parameters())


def test_reinit_on_enable_updates_in_place():
    net = make_net()
    attach_quantizers(net, activations=True, act_signed=True)
    q = net.featurizer[2].conv1.weight_quantizer
    s_param, s_old = q.step_size, q.step_size.detach().clone()
    with torch.no_grad():
        net.featurizer[2].conv1.weight.mul_(3.0)  # weights trained before q_step
    set_quantization_enabled(net, True, reinit=True)
    assert q.step_size is s_param
    torch.testing.assert_close(q.step_size.detach(), 3.0 * s_old)
    assert not any(a.is_initialized() for _, a in iter_quantizers(net, "activation"))


def qtdog_swap(model: nn.Module) -> None:
    """The released QT-DoG pattern: new modules with NEW Parameter objects, swapped in place."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            new = QuantConv2d.from_float(m)
            new.weight = nn.Parameter(m.weight.detach())  # QuanConv2d: nn.Parameter(m.weight.detach())
            setattr(parent, child, new)


def test_optimizer_guard_catches_qtdog_swap_and_passes_correct_order():
    x, y = batch()
    # QT-DoG: optimizer first, modules swapped later -> new weights and step sizes are not trained
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    qtdog_swap(net)
    set_quantization_enabled(net, True)
    with pytest.raises(RuntimeError, match="missing from the optimizer.*stale") as info:
        assert_all_trainable_in_optimizer(net, opt)
    assert "featurizer.0.weight" in str(info.value) and "\n" not in str(info.value)
    w_before = net.featurizer[0].weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    assert torch.equal(net.featurizer[0].weight, w_before)  # silently frozen

    # our attach after the optimizer: the weights stay in it, but the step sizes are missing
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    attach_quantizers(net)
    with pytest.raises(RuntimeError, match="step_size"):
        assert_all_trainable_in_optimizer(net, opt)

    # listed twice (torch only warns about duplicates inside one group)
    net = make_net()
    ps = list(net.parameters())
    with pytest.warns(UserWarning, match="duplicate"):
        opt = torch.optim.SGD([{"params": ps + ps[:1]}], lr=0.1)
    with pytest.raises(RuntimeError, match="listed more than once"):
        assert_all_trainable_in_optimizer(net, opt)

    # correct order: attach, then the optimizer with the step sizes in their own group
    net = make_net()
    attach_quantizers(net, activations=True, act_signed=True, keep_float=["classifier"])
    qn = set(quantizer_parameter_names(net))
    named = dict(net.named_parameters())
    opt = torch.optim.Adam([{"params": [p for n, p in named.items() if n not in qn]},
                            {"params": [p for n, p in named.items() if n in qn], "weight_decay": 0.0}], lr=1e-3)
    assert_all_trainable_in_optimizer(net, opt)
    set_quantization_enabled(net, True)
    net.train()
    net(x)  # lazy activation init before taking snapshots
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    for n, p in net.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"


def test_lsq_quantizer_is_found_anywhere():
    model = nn.Sequential(nn.Linear(2, 2), LSQQuantizer(4))
    assert [n for n, _ in iter_quantizers(model)] == ["1"]
    assert quantizer_parameter_names(model) == ["1.step_size"]
    with pytest.raises(ValueError, match="role"):
        list(iter_quantizers(model, "bias"))
