"""Measurement core: ParamSpace selection and exact restore, Objective against ground truth, no side effects."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import flatlens as fl
from flatlens.errors import FlatlensError
from conftest import flat_loss
from flatlens.measure.objective import Objective
from flatlens.measure.params import ParamSpace, SideEffectError, model_state_hash, parameter_groups, select_parameters


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, bias=True), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5))


def test_parameter_groups_and_selection():
    net = _bn_net()
    g = parameter_groups(net)
    assert g["weights"] == ["0.weight", "4.weight"] and g["biases"] == ["0.bias", "4.bias"]
    assert g["norm"] == ["1.weight", "1.bias"] and g["scales"] == [] and len(g["all"]) == 6
    assert select_parameters(net) == ["0.weight", "4.weight"]
    assert select_parameters(net, ("weights", "norm")) == ["0.weight", "1.weight", "1.bias", "4.weight"]
    assert select_parameters(net, select=r"^4\.") == ["4.weight", "4.bias"]
    assert select_parameters(net, ("all",), exclude="bias") == ["0.weight", "1.weight", "4.weight"]
    with pytest.raises(FlatlensError, match="matches no trainable parameter"):
        select_parameters(net, select="nothing")
    with pytest.raises(FlatlensError, match="unknown parameter group"):
        select_parameters(net, ("filters",))


class _MixedLayers(nn.Module):
    """Attention, a GRU, a transposed convolution, a position embedding and a PReLU slope."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(3, 4)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 2, 4))
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.rnn = nn.GRU(4, 3, batch_first=True)
        self.up = nn.ConvTranspose1d(3, 2, 2)
        self.act = nn.PReLU()
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = self.emb(x.view(-1, 2, 3)) + self.pos
        h, _ = self.rnn(h + self.att(h, h, h, need_weights=False)[0])
        return self.head(self.act(self.up(h.transpose(1, 2)).mean(2)))


def test_weights_cover_attention_recurrent_and_transposed_layers_and_the_rest_is_named():
    """``weights`` was the weight of Conv/Linear modules only: a ViT's Q/K/V projections (the
    ``in_proj_weight`` of nn.MultiheadAttention), every matrix of an LSTM/GRU and a ConvTranspose's
    kernel were left out of every default measure, without a word."""
    from flatlens.measure.directions import landscape_parameters

    net = _MixedLayers().double().eval()
    g = parameter_groups(net)
    assert g["weights"] == ["emb.weight", "att.in_proj_weight", "att.out_proj.weight", "rnn.weight_ih_l0",
                            "rnn.weight_hh_l0", "up.weight", "head.weight"]
    assert g["biases"] == ["emb.bias", "att.in_proj_bias", "att.out_proj.bias", "rnn.bias_ih_l0", "rnn.bias_hh_l0",
                           "up.bias", "head.bias"]
    assert g["other"] == ["pos", "act.weight"] and len(g["all"]) == 16
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.arange(5) % 3)]
    with pytest.warns(UserWarning, match=r"2 trainable tensor\(s\) belong to no layer group and are not measured: "
                                         r"pos, act.weight; include them with include='weights,other'"):
        obj = Objective(net, batches=batches, kernel="double_backward")
    assert obj.space.names == g["weights"] and obj.left_out == ["pos", "act.weight"]
    for kwargs in ({"include": "weights,other"}, {"include": "all"}, {"select": "att"}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert Objective(net, batches=batches, **kwargs).left_out == []
    # the HVP through attention, the GRU and the transposed convolution against the dense Hessian
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        H = torch.autograd.functional.hessian(flat_loss(obj), obj.space.origin_vector())
    v = torch.randn(H.shape[0], generator=gen, dtype=torch.float64)
    for kernel in ("graph_reuse", "double_backward", "forward_over_reverse"):
        o = Objective(net, batches=batches, kernel=kernel, include="weights,other", exclude="pos|act")
        assert torch.allclose(o.hvp(v), H @ v, atol=1e-10), kernel
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert fl.hessian.eigenvalues(obj, k=1, tol=1e-6).values[0] == pytest.approx(top, rel=1e-5)
    # random directions move what the Objective moves: group `other` only where the selection holds it
    assert landscape_parameters(net) == g["weights"]
    assert landscape_parameters(net, restrict=select_parameters(net, ("weights", "other"))) == \
        [n for n in g["all"] if n in g["weights"] + g["other"]]


def test_weight_norm_and_spectral_norm_weights_are_weights_with_a_right_hessian():
    """``parametrizations.weight_norm`` / ``spectral_norm`` move a layer's weight into
    ``parametrizations.weight.original*``, which ``weights`` did not hold: the default selection of such
    a model was empty, an error. The old ``weight_norm``'s ``weight_g``/``weight_v`` were 'biases'.
    And PyTorch's double backward of ``torch._weight_norm`` is wrong (an asymmetric Hessian, 0.4 off):
    the ground truth here is central differences of the (right) gradient."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    net = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 3)), nn.Tanh(),
                        parametrizations.spectral_norm(nn.Linear(3, 3))).double().eval()
    g = parameter_groups(net)
    assert g["weights"] == ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1",
                            "2.parametrizations.weight.original"] and g["biases"] == ["0.bias", "2.bias"]
    assert g["other"] == []
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.arange(7) % 3
    obj = Objective(net, batches=[(x, y)])
    w, grad = obj.space.origin_vector(), torch.func.grad(flat_loss(obj))
    H = torch.stack([(grad(w + 1e-5 * e) - grad(w - 1e-5 * e)) / 2e-5 for e in torch.eye(len(w), dtype=w.dtype)])
    assert torch.allclose(H, H.T, atol=1e-8)
    v = torch.randn(len(w), generator=gen, dtype=torch.float64)
    for kernel in ("graph_reuse", "double_backward", "forward_over_reverse"):
        assert torch.allclose(Objective(net, batches=[(x, y)], kernel=kernel).hvp(v), H @ v, atol=1e-8), kernel
    eig = fl.hessian.eigenvalues(obj, k=2, tol=1e-6)
    assert np.allclose(eig.values, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        old = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 3))).double().eval()
    assert parameter_groups(old)["weights"] == ["0.weight_g", "0.weight_v"]
    obj = Objective(old, batches=[(x, y)], kernel="double_backward")
    w, v = obj.space.origin_vector(), torch.randn(15, generator=gen, dtype=torch.float64)
    grad = torch.func.grad(flat_loss(obj))
    assert torch.allclose(obj.hvp(v), (grad(w + 1e-6 * v) - grad(w - 1e-6 * v)) / 2e-6, atol=1e-8)


def test_an_op_without_a_second_derivative_is_one_line_naming_the_way_out():
    """nn.EmbeddingBag's backward has no derivative: every kernel failed with a NotImplementedError (an
    explicit kernel) or a ValueError (auto) traceback from deep inside autograd."""
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag, self.head = nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.bag((x.abs() * 3).long().clamp(max=9)))

    torch.manual_seed(0)
    net = Bag().eval()
    batches = [(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)), torch.arange(5) % 3)]
    with pytest.raises(FlatlensError, match=r"the model uses an op PyTorch cannot differentiate twice \(the "
                                            r"derivative for '_embedding_bag_backward' is not implemented.\); "
                                            r"replace that op .* \(--exclude / --params\)$"):
        fl.hessian.eigenvalues(Objective(net, batches=batches, include="all", kernel="double_backward"))
    with pytest.raises(FlatlensError, match=r"^no HVP kernel works for this model \(graph_reuse: NotImplementedError"):
        fl.hessian.trace(Objective(net, batches=batches, include="all"))
    assert fl.hessian.eigenvalues(Objective(net, batches=batches, include="all", exclude="bag")).values[0] > 0


def test_hard_sigmoid_models_such_as_mobilenet_v3_get_right_hvps():
    """hardsigmoid_backward has no derivative: every HVP of a MobileNetV3 (nn.Hardsigmoid in its
    squeeze-excitation blocks) failed with a RuntimeError traceback. nn.Hardsigmoid now runs as the same
    piecewise-linear clamp; a functional F.hardsigmoid, which flatlens cannot see, fails in one line."""
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    for net, x, y in ((nn.Sequential(nn.Linear(6, 6), nn.Hardsigmoid(), nn.Linear(6, 3)),
                       3 * torch.randn(5, 6, generator=gen), torch.arange(5) % 3),
                      (mobilenet_v3_small(num_classes=4), torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([0, 3]))):
        net, x = net.double().eval(), x.double()
        obj = Objective(net, batches=[(x, y)], kernel="double_backward")
        grad = torch.func.grad(flat_loss(obj))
        w = obj.space.origin_vector()
        v = torch.randn(len(w), generator=gen, dtype=torch.float64)
        v /= v.norm()  # a step of 1e-6 in all: ReLU/hardswish kinks stay uncrossed
        fd = (grad(w + 1e-6 * v) - grad(w - 1e-6 * v)) / 2e-6
        for kernel in ("graph_reuse", "double_backward", "forward_over_reverse"):
            hv = Objective(net, batches=[(x, y)], kernel=kernel).hvp(v)
            assert float((hv - fd).norm() / fd.norm()) < 1e-6, kernel

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(nn.functional.hardsigmoid(self.a(x)))

    batches = [(torch.randn(5, 6, generator=gen), torch.arange(5) % 3)]
    for kernel, said in (("double_backward", r"derivative for aten::hardsigmoid_backward is not implemented"),
                         ("forward_over_reverse", r"Trying to use forward AD with aten::hardsigmoid_backward")):
        with pytest.raises(FlatlensError, match=r"^the model uses an op PyTorch cannot differentiate twice \(" + said):
            Objective(Functional().eval(), batches=batches, kernel=kernel).hvp(torch.ones(54))


def test_rnn_models_run_their_differentiated_forward_without_cudnn():
    """cuDNN has no double backward for its fused RNNs: on a GPU every HVP of an LSTM model would fail
    (PyTorch: "Double backwards is not supported for CuDNN RNNs"). The differentiated forward of a model with an RNN runs
    with cuDNN off and puts the flag back; models without one keep it. (The GPU failure itself cannot be
    reproduced on this CPU-only machine; this checks the switch.)"""
    from flatlens.measure.hvp import make_forward_fn

    class Recorded(nn.Module):
        def __init__(self, rnn: nn.Module) -> None:
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(4, 2)

        def forward(self, x):
            seen.append(torch.backends.cudnn.enabled)
            h = self.rnn(x.view(-1, 2, 3))
            return self.head((h[0] if isinstance(h, tuple) else h)[:, -1])

    seen: list[bool] = []
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    before = torch.backends.cudnn.enabled
    for rnn in (nn.LSTM(3, 4, batch_first=True), nn.Linear(3, 4)):
        net = Recorded(rnn).eval()
        make_forward_fn(net)(dict(net.named_parameters()), (x,))
        assert torch.backends.cudnn.enabled == before
    assert seen == [False, before]


def test_a_compiled_model_is_measured_through_its_original_module():
    """A torch.compile'd model failed at the first HVP: its compiled backward refuses create_graph
    ("compiled with non-empty donated buffers which requires create_graph=False")."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    batches = [(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 3)]
    compiled = torch.compile(net)
    before = model_state_hash(compiled)
    obj = Objective(compiled, batches=batches)
    assert obj.space.names == ["0.weight", "2.weight"] and obj.model is net  # the same parameters, eagerly
    assert torch.equal(fl.hessian.eigenvalues(obj).values, fl.hessian.eigenvalues(Objective(net, batches=batches)).values)
    assert model_state_hash(compiled) == before
    inner = nn.Sequential(torch.compile(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, 3)).eval()
    with pytest.raises(FlatlensError, match=r"^module '0' is torch.compile'd, and compiled graphs cannot be "
                                            r"differentiated twice; build the model without torch.compile"):
        Objective(inner, batches=batches)


def test_quantizer_step_sizes_are_their_own_group():
    from flatlens.quant import attach_quantizers

    net = _bn_net()
    attach_quantizers(net, keep_float=["4"], enabled=True)
    g = parameter_groups(net)
    assert g["scales"] == ["0.weight_quantizer.step_size"]
    assert "0.weight_quantizer.step_size" not in select_parameters(net)


def test_step_sizes_of_disabled_quantizers_are_left_out_or_refused_in_one_line():
    """A disabled quantizer's step size does not enter the loss: differentiating it raised autograd's
    'element 0 of tensors does not require grad' from deep inside (--space dequant --include scales)."""
    from flatlens.quant import attach_quantizers

    net = _bn_net().eval()
    attach_quantizers(net, enabled=True, bits=4)
    batches = [(torch.randn(6, 1, 6, 6, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 5)]
    with torch.no_grad():
        net(batches[0][0])  # lazy init of the quantizers
    steps = ["0.weight_quantizer.step_size", "4.weight_quantizer.step_size"]
    lat = Objective(net, batches=batches, space="latent", include=("all",))
    assert lat.space.names[-1] == steps[1]
    assert lat.differentiated == ("straight-through surrogate of the quantized model (latent weights and step sizes, "
                                  "LSQ gradient scale off)")
    assert Objective(net, batches=batches).differentiated.endswith("(latent weights)")
    deq = Objective(net, batches=batches, space="dequant", include=("all",))  # weight quantizers off: no steps
    assert not set(steps) & set(deq.space.names) and "0.weight" in deq.space.names
    assert deq.hvp(torch.ones(deq.space.numel, dtype=torch.float32)).isfinite().all()
    for space, why in (("dequant", "space 'dequant' turns the weight quantizers off"),):
        with pytest.raises(FlatlensError, match=f"all step sizes of disabled quantizers: {why}"):
            Objective(net, batches=batches, space=space, include=("scales",))
    with pytest.raises(FlatlensError, match="space 'scales' moves quantizer step sizes only, and the selection "
                                            "holds '0.weight'"):  # its results would call a weight a step size
        Objective(net, batches=batches, space="scales", select=r"^0\.weight$")
    fl.quant.set_quantization_enabled(net, False)  # a checkpoint from before quantization started
    with pytest.raises(FlatlensError, match="the quantizers of this model are off"):
        Objective(net, batches=batches, space="scales")
    lat = Objective(net, batches=batches, space="latent", include=("all",))
    assert not set(steps) & set(lat.space.names)
    deq = Objective(net, batches=batches, space="dequant")  # the float model: nothing is rounded
    assert deq.loss() == lat.loss() and deq.differentiated.startswith("float model (its weight quantizers are off")
    v = torch.ones(deq.space.numel)
    assert torch.equal(deq.hvp(v), Objective(net, batches=batches).hvp(v))


def test_bad_explicit_batches_are_one_line_errors():
    """Mistakes in batches= were tracebacks from inside cross-entropy or tuple unpacking; a non-finite
    Hessian-vector product surfaced as numpy's 'Eigenvalues did not converge'."""
    net = _bn_net().eval()
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 4, 2])
    for batches, msg in (((x, y), r"batches\[0\] is not an \(inputs, labels\) pair"),
                         ([(x, y.float())], r"labels are torch.float32 of shape \(4,\); pass a 1-D integer"),
                         ([(x, y[:3])], "holds 4 inputs and 3 labels"),
                         ([(x, y - 1)], "holds label -1; labels must be class indices >= 0"),
                         ([(x, y + 1)], r"label 5, and the model has 5 outputs; labels must be class indices in \[0, 5\)")):
        with pytest.raises(FlatlensError, match=msg):
            Objective(net, batches=batches)
    obj = Objective(net, batches=[(torch.full_like(x, float("nan")), y)])
    with pytest.raises(FlatlensError, match="Hessian-vector product is not finite"):
        fl.hessian.eigenvalues(obj)
    assert Objective(net, batches=[(x, y)]).n_forward == 0  # the label check is not a counted pass
    # a rank (or a caller) with only empty batches has nothing to check; the total count decides
    with pytest.raises(FlatlensError, match="split 'custom' holds no samples"):
        Objective(net, batches=[(x[:0], y[:0])])


def test_a_data_loader_or_generator_and_int32_labels_are_taken_as_batches(monkeypatch):
    """A notebook's DataLoader (or a generator) passed as batches= was refused ("pass a list of pairs"),
    and int32 labels passed the check, then failed inside cross_entropy ("expected target dtype to be
    Long or Byte, but got Int")."""
    from torch.utils.data import DataLoader, TensorDataset

    import flatlens.measure.objective as O

    net = _bn_net().eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 1, 6, 6, generator=gen), torch.arange(10) % 5
    pairs = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    want = fl.hessian.eigenvalues(Objective(net, batches=pairs), seed=1).values
    for batches in (DataLoader(TensorDataset(x, y), batch_size=4), (b for b in pairs),
                    [(b, t.int()) for b, t in pairs], [(b, t.to(torch.uint8)) for b, t in pairs]):
        obj = Objective(net, batches=batches)
        assert obj.n_samples == 10 and all(t.dtype == torch.int64 for _, t in obj.batches)
        assert torch.equal(fl.hessian.eigenvalues(obj, seed=1).values, want)
    for batches in (x, {"x": x, "y": y}, 3):
        with pytest.raises(FlatlensError, match=r"^batches= got a (Tensor|dict|int); pass \[\(x, y\), \.\.\.\]"):
            Objective(net, batches=batches)
    monkeypatch.setattr(O, "available_bytes", lambda device: 3 * 4 * 36 * 4)  # room for 3 batches of 4 inputs
    with pytest.raises(FlatlensError, match=r"the first 3 batches of the iterable passed as batches= already take "
                                            r".* pass a subset, e.g. itertools.islice\(loader, 8\)$"):
        Objective(net, batches=DataLoader(TensorDataset(x.repeat(9, 1, 1, 1), y.repeat(9)), batch_size=4))
    assert Objective(net, batches=pairs * 9).n_samples == 90  # a list is already in memory: nothing to refuse


def test_a_batch_norm_without_running_statistics_is_refused():
    """A BatchNorm with track_running_stats=False uses batch statistics in eval mode: the label check's
    one-sample forward died inside torch ("Expected more than 1 value per channel"), and with it out of
    the way the loss and Hessian would depend on the batch size. One line naming the module and the fix."""
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(FlatlensError, match=r"module '1' \(BatchNorm1d\) normalises with each batch's statistics"):
        Objective(net, batches=[(x, y)])
    ok = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    assert Objective(ok, batches=[(x, y)]).n_samples == 8  # running statistics, and per-sample norms, are fine


def test_models_the_measures_cannot_read_are_one_line_errors_and_bfloat16_works():
    """A model returning a tuple or dict was "AttributeError: 'tuple' object has no attribute 'shape'", one
    without parameters a bare StopIteration, and a bfloat16 model died hashing its batches ("Got unsupported
    ScalarType BFloat16": numpy has no bfloat16)."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), x

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(FlatlensError, match=r"the model returns a tuple; the measures need logits of shape"):
        Objective(Pair(), batches=[(x, y)])
    with pytest.raises(FlatlensError, match=r"returns a tensor of shape \(1, 3, 1\)"):
        Objective(nn.Sequential(nn.Linear(4, 3), nn.Unflatten(1, (3, 1))), batches=[(x, y)])
    with pytest.raises(FlatlensError, match="matches no trainable parameter"):
        Objective(nn.Softmax(-1), batches=[(x, y)])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    a = Objective(net, batches=[(x, y)])
    b = Objective(copy.deepcopy(net).to(torch.bfloat16), batches=[(x.to(torch.bfloat16), y)])
    assert len(b.subset_sha256()) == 64 and a.subset_sha256() != b.subset_sha256()
    assert b.describe()["subset_sha256"] == b.subset_sha256()
    import hashlib

    h = hashlib.sha256()  # float data hash as before (the bytes numpy() gives)
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    assert a.subset_sha256() == h.hexdigest()
    e = fl.hessian.eigenvalues(b, k=1)
    assert math.isfinite(float(e.values[0]))


def test_param_space_moves_in_place_and_restores_bitwise():
    net = _bn_net()
    space = ParamSpace(net, select_parameters(net))
    before = model_state_hash(net)
    d = [torch.randn_like(p) for p in space.origin]
    e = [torch.randn_like(p) for p in space.origin]
    space.set_offset([d, e], [0.3, -0.7])
    assert torch.allclose(space.params[0], space.origin[0] + 0.3 * d[0] - 0.7 * e[0], atol=1e-6)
    space.restore()
    assert model_state_hash(net) == before
    flat = space.flatten(d)
    assert flat.numel() == space.numel and all(torch.equal(a, b) for a, b in zip(space.unflatten(flat), d))
    with pytest.raises(SideEffectError):
        with space.guard():
            net[1].running_mean.add_(1.0)  # a buffer write inside a measure is caught


def _batches(n=37, bs=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]  # ragged last batch


def test_objective_values_gradient_and_hvp_against_dense_truth():
    net = _bn_net().double().eval()
    batches = [(x.double(), y) for x, y in _batches()]
    obj = Objective(net, batches=batches, include=("weights", "biases"), kernel="double_backward")
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    f = flat_loss(obj)
    w = obj.space.origin_vector()
    loss, acc, se = obj.loss_and_accuracy()
    assert loss == pytest.approx(float(f(w)), rel=1e-12)
    assert acc == pytest.approx(float((net(x).argmax(1) == y).double().mean()))
    per = nn.functional.cross_entropy(net(x), y, reduction="none").detach()
    assert se == pytest.approx(float(per.std() / len(y) ** 0.5), rel=1e-9)
    assert torch.allclose(obj.grad(), torch.func.grad(f)(w), atol=1e-12)
    H = torch.autograd.functional.hessian(f, w)
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(obj.hvp(v), H @ v, atol=1e-10)
    V = torch.randn(w.numel(), 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(obj.hvp_block(V), H @ V, atol=1e-10)
    assert obj.costs()["n_hvp"] == 4 and obj.costs()["n_grad"] == 1


def test_objective_has_no_side_effects():
    net = _bn_net()
    net.train()  # the caller's mode must come back
    net[4].weight.grad = None
    obj = Objective(net, batches=_batches(), kernel="graph_reuse")
    state = model_state_hash(net)
    rng = torch.get_rng_state()
    obj.loss_and_accuracy()
    obj.grad()
    obj.hvp(torch.ones(obj.space.numel))
    assert net.training and net[1].training
    assert model_state_hash(net) == state and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in net.parameters())


def test_a_split_too_large_to_cache_is_refused_before_loading(tiny_run, monkeypatch):
    """The Objective caches its samples as tensors; a whole large split (DomainNet's train split at
    224x224 is ~90 GB) ran the machine out of memory while loading. It is refused first, naming --samples."""
    import flatlens.measure.memory as L

    run = fl.load_checkpoint(tiny_run / "model.pt")
    loads = []
    monkeypatch.setattr(type(run.dataset.domains[0]), "load", lambda self, idx: loads.append(idx))
    monkeypatch.setattr(L, "available_bytes", lambda device: 10 * 16 * 16 * 4)  # room for 10 samples
    with pytest.raises(FlatlensError, match=r"caching 1,200 samples of split 'train' needs 1.2 MiB \(1,200 x 1 x 16 "
                                            r"x 16 float32 values\) .*pass --samples N"):
        Objective(run, split="train")
    assert not loads


def test_a_batch_whose_hvp_graph_cannot_fit_is_refused_with_a_batch_size_that_fits(tiny_run, monkeypatch):
    """Every kernel holds one batch's double-backward graph; a ResNet-50 batch of 256 at 224x224 keeps
    tens of GB (OOM-killed on CPU, every kernel failing on CUDA). The graph of two samples is counted
    and scaled; too large, the first HVP is a one-line error naming a --batch-size that fits."""
    import flatlens.measure.memory as L
    from flatlens.measure.hvp import graph_bytes, make_loss_fn

    run = fl.load_checkpoint(tiny_run / "model.pt")
    obj = Objective(run, samples=64, batch_size=32)
    x, y = obj.batches[0]
    params = dict(zip(obj.space.names, obj.space.params))
    with obj._eval():
        one, two, four = (graph_bytes(make_loss_fn(obj.model), params, (x[:k], y[:k])) for k in (1, 2, 4))
    per_sample = two - one
    assert per_sample > 0 and four == pytest.approx(one + 3 * per_sample, rel=0.02)  # affine in the samples
    monkeypatch.setattr(L, "available_bytes", lambda device: int(10 * one))
    with pytest.raises(FlatlensError, match=r"one batch of 32 samples keeps ~.* for its Hessian-vector products "
                                            r"and cpu has .* available; pass --batch-size \d+ or less") as err:
        obj.hvp(torch.ones(obj.space.numel))
    assert obj.n_hvp == 0
    import re

    fit = int(re.search(r"--batch-size (\d+)", str(err.value)).group(1))
    assert 1 <= fit < 32
    smaller = Objective(run, samples=64, batch_size=fit)  # the suggested size passes the same check
    assert smaller.hvp(torch.ones(smaller.space.numel)).isfinite().all()
    forced = Objective(run, samples=64, batch_size=fit, kernel="graph_reuse")  # all 64 samples' graphs: too much
    with pytest.raises(FlatlensError, match=r"--kernel graph_reuse keeps the graphs of all \d+ batches .* use "
                                            r"--kernel auto or double_backward"):
        forced.hvp(torch.ones(forced.space.numel))


def test_objective_on_a_checkpoint(tiny_run):
    run = fl.load_checkpoint(tiny_run / "model.pt")
    state = model_state_hash(run.model)
    obj = Objective(run, split="env0_out")
    loss, acc, _ = obj.loss_and_accuracy()
    assert loss == pytest.approx(run.metrics["env0_out_loss"], rel=1e-5)
    assert acc == pytest.approx(run.metrics["env0_out_acc"], abs=1e-9)
    a = Objective(run, split="target", samples=50, seed=3)
    b = Objective(run, split="target", samples=50, seed=3)
    c = Objective(run, split="target", samples=50, seed=4)
    assert a.n_samples == 50 and a.subset_sha256() == b.subset_sha256() != c.subset_sha256()
    # a numpy or 0-d tensor seed draws what the int draws (np.int64's repr used to give another subset)
    for same in (np.int64(3), torch.tensor(3)):
        d = Objective(run, split="target", samples=50, seed=same)
        assert d.subset_sha256() == a.subset_sha256() and type(d.seed) is int
    for bad, what in ((1.5, "is not an int"), (True, "is not an int"), ("3", "is not an int"),
                      (2**63, "does not fit in 64 bits")):  # were hashed as their repr / failed in h5py at the end
        with pytest.raises(FlatlensError, match=f"seed=.* {what}"):
            Objective(run, split="target", samples=50, seed=bad)
    assert set(a.sample_ids[:, 0].tolist()) == {0}
    info = a.describe()
    assert info["checkpoint_sha256"] == run.sha256 and info["param_names"] == a.space.names
    assert info["differentiated"] == "float model" and info["bn_mode"] == "eval"
    assert model_state_hash(run.model) == state
    with pytest.raises(FlatlensError, match="needs a quantized model"):
        Objective(run, space="dequant")
    for bad in (10.5, "10", 0):  # were TypeErrors from the slicing inside (or a check after loading the split)
        with pytest.raises(FlatlensError, match=r"--samples=.* is not an int >= 1"):
            Objective(run, samples=bad)
    with pytest.raises(FlatlensError, match="kernel='fast'; pass 'auto' or one of"):  # at once, not at the first HVP
        Objective(run, kernel="fast")
    # more of the notebook API's bad or CLI-style inputs (were TypeErrors, a torch RuntimeError, a re.error,
    # or include="weights" read as the groups 'w', 'e', 'i', ...)
    assert Objective(run, samples=8, include="weights,biases").space.names == \
        Objective(run, samples=8, include=("weights", "biases")).space.names
    assert Objective(run, samples=8, device="auto").device == torch.device("cpu")
    for kwargs, message in (({"split": 3}, "split=3 is not a split name"),
                            ({"device": "gpu"}, "device 'gpu' is not a device"),
                            ({"exclude": "["}, r"--exclude regex '\[' is invalid"),
                            ({"include": "weight"}, r"unknown parameter group\(s\) \['weight'\]")):
        with pytest.raises(FlatlensError, match=message):
            Objective(run, samples=8, **kwargs)
    with pytest.raises(FlatlensError, match="a checkpoint path is a str or Path, not NoneType"):
        fl.load_checkpoint(None)


def test_a_run_or_a_model_passed_for_an_objective_says_how_to_wrap_it(tiny_run):
    """A notebook's first try, ``fl.hessian.eigenvalues(run)``, said "got Run as an operator; pass a
    SymmetricOperator..." and ``fl.landscape.surface(run)`` died with "'Run' object has no attribute 'space'"."""
    from flatlens.measure import gauss_newton, landscape

    run = fl.load_checkpoint(tiny_run / "model.pt")
    calls = {"a Hessian measure": (fl.hessian.eigenvalues, fl.hessian.trace, fl.hessian.density, fl.hessian.spectrum,
                                   fl.hessian.layer_traces, fl.hessian.power_iteration,
                                   lambda o: fl.hessian.trace(o, "gauss-newton")),
             "a loss surface": (landscape.surface,), "the Gauss-Newton diagonal": (gauss_newton.hessian_diagonal,)}
    for what, fns in calls.items():
        for fn in fns:
            with pytest.raises(FlatlensError, match=rf"^{what} of a Run: it needs an Objective.*; wrap the run: "
                                                    r"fl\.Objective\(run\)"):
                fn(run)
            with pytest.raises(FlatlensError, match=rf"^{what} of a Classifier: .*fl\.Objective\(model, batches="):
                fn(run.model)


def test_a_float32_model_is_measured_in_float64_on_a_copy(tiny_run):
    """The summary of a float32 model said "the HVPs cannot certify a smaller error (float64 can)" and nothing
    offered float64: dtype= (--dtype) measures a float64 copy of the same weights on the same samples."""
    net = _bn_net().eval()
    batches = _batches()
    state = model_state_hash(net)
    f32 = Objective(net, batches=batches, include=("all",), kernel="double_backward")
    f64 = Objective(net, batches=batches, include=("all",), kernel="double_backward", dtype="float64")
    assert model_state_hash(net) == state and next(net.parameters()).dtype == torch.float32  # untouched
    assert f64.space.dtype == torch.float64 and all(x.dtype == torch.float64 for x, _ in f64.batches)
    assert f64.describe()["dtype"] == "float64" and f32.describe()["dtype"] == "float32"
    assert "tensors, float64)" in repr(f64) and "tensors, float32)" in repr(f32)  # a notebook shows which
    # the same function: the float64 Hessian of the float32 weights, against a float64 model built by hand
    truth = Objective(copy.deepcopy(net).double(), batches=[(x.double(), y) for x, y in batches], include=("all",),
                      kernel="double_backward")
    v = torch.randn(f64.space.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(f64.hvp(v), truth.hvp(v))
    e32 = fl.hessian.eigenvalues(f32, k=2, tol=1e-9, max_iter=60)
    e64 = fl.hessian.eigenvalues(f64, k=2, tol=1e-9, max_iter=60)
    assert e32.at_rounding_floor and "--dtype float64" in repr(e32)
    assert e64.all_converged and not e64.at_rounding_floor and float(e64.rel_error_bound.max()) <= 1e-9
    assert torch.allclose(e32.values, e64.values, rtol=1e-4)
    # a checkpoint: the Run's model stays float32; a quantized model in both spaces
    run = fl.load_checkpoint(tiny_run / "model.pt")
    obj = Objective(run, samples=16, dtype=torch.float64)
    assert obj.space.dtype == torch.float64 and next(run.model.parameters()).dtype == torch.float32
    from flatlens.quant import attach_quantizers

    q = _bn_net().eval()
    attach_quantizers(q, enabled=True, bits=4)
    qstate = model_state_hash(q)
    for space in ("latent", "dequant"):
        qo = Objective(q, batches=batches, space=space, dtype="float64")
        assert qo.space.dtype == torch.float64 and math.isfinite(fl.hessian.eigenvalues(qo, k=1).values[0].item())
    assert model_state_hash(q) == qstate
    with pytest.raises(FlatlensError, match=r"dtype='float16'; pass float32, float64 \(or a floating torch.dtype\)"):
        Objective(net, batches=batches, dtype="float16")
    with pytest.raises(FlatlensError, match="dtype=torch.int64"):
        Objective(net, batches=batches, dtype=torch.int64)


def test_sharpness_dtype_float64_certifies_below_the_float32_floor(tiny_run, tmp_path, capsys):
    from flatlens.cli import main

    out = tmp_path / "a.h5"
    assert main(["sharpness", str(tiny_run / "model.pt"), "--measures", "hessian", "--samples", "32", "--tol", "1e-8",
                 "--dtype", "float64", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.splitlines()[0].endswith(", in float64") and "converged to the rounding floor" not in said
    r = fl.hessian.read(out)
    assert r["attrs"]["dtype"] == "float64" and float(np.max(r["eigenvalue_residuals"] / r["eigenvalues"])) < 1e-8
