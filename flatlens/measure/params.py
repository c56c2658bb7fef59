"""ParamSpace: which parameters a measure moves, in which space, and how they are put back.

Every measure in flatlens is a question about the loss as a function of a chosen subset of the
parameters. A :class:`ParamSpace` names that subset (by parameter name), holds the live tensors and a
bit-exact copy of their values at creation (the *origin*), moves them in place with ``torch._foreach``
ops (no state-dict loads per point), and restores them exactly.

Selection (``include``): ``weights`` (the weight matrices of the layers that multiply their input by
them: Conv and ConvTranspose 1-3d, Linear, Bilinear, the projections of MultiheadAttention and the
input and hidden matrices of RNN/LSTM/GRU layers and cells; quantized ones included: the default, as
in Li et al. and SWAD-with-exclusions), ``biases`` (their biases), ``norm`` (affine parameters of
BatchNorm/GroupNorm/LayerNorm/InstanceNorm), ``scales`` (LSQ step sizes), ``other`` (trainable
parameters in none of these: embedding tables, position embeddings, PReLU slopes, parameters a custom
module owns directly), ``all`` (every trainable parameter); or ``select`` = a regular expression on
parameter names, optionally with ``exclude`` = another one.

Spaces for quantized models (recorded with every result):

* ``latent`` — the float latent weights, seen through the enabled quantizers. Gradients and HVPs are
  those of the straight-through surrogate; the true loss is piecewise constant in these weights.
* ``dequant`` — a float copy of the model whose weights hold the quantized values w_q and whose weight
  quantizers are off (:func:`flatlens.quant.dequantized_copy`): a smooth function of w_q.
* ``scales`` — the quantizers' step sizes (the default selection becomes ``scales``).

For float models ``latent`` is simply the float weights (recorded as ``float``).
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from flatlens.errors import FlatlensError

SPACES = ("latent", "dequant", "scales")
GROUPS = ("weights", "biases", "norm", "scales", "other", "all")
_LINEAR_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)  # _ConvNd: Conv and ConvTranspose 1-3d
_RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase)  # weight_ih_l0, weight_hh_l0 (weight_hr_l0), bias_ih_l0, ...
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_ATTENTION_BIASES = ("in_proj_bias", "bias_k", "bias_v")  # out_proj is a Linear child: classified as such
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class SideEffectError(RuntimeError):
    """A measure changed the model (a bug in flatlens, never the user's fault)."""


def _quantizer_param_names(model: nn.Module) -> set[str]:
    from flatlens.quant import quantizer_parameter_names

    return set(quantizer_parameter_names(model))


def inert_step_sizes(model: nn.Module) -> set[str]:
    """Names of the step sizes whose quantizer is off: they do not enter the model's function.

    The weight quantizers of the ``dequant`` copy are off by construction, and every quantizer of a QAT
    checkpoint saved before quantization started is off; differentiating such a step size fails deep
    inside autograd (nothing depends on it), so the Objective leaves them out of its space.
    """
    from flatlens.quant import iter_quantizers

    off = {id(p) for _, q in iter_quantizers(model) if not q.is_enabled() for p in q.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in off}


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Names of the trainable parameters in each selection group, in model order."""
    qnames = _quantizer_param_names(model)
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    owner = {}
    modules = dict(model.named_modules())
    for mname, module in modules.items():
        role = _parametrized_tensor(mname, module, modules)
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = role or (module, pname)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups["all"].append(name)
        module, pname = owner[name]
        groups["scales" if name in qnames else _group_of(module, pname)].append(name)
    return groups


def _parametrized_tensor(mname: str, module: nn.Module, modules: dict[str, nn.Module]) -> tuple[nn.Module, str] | None:
    """``(layer, "weight")`` for the ``ParametrizationList`` at ``layer.parametrizations.weight``.

    ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` move a layer's weight into
    ``parametrizations.weight.original*``: those tensors are the layer's weight, classified as such.
    """
    from torch.nn.utils.parametrize import ParametrizationList

    parts = mname.split(".")
    if not isinstance(module, ParametrizationList) or len(parts) < 2 or parts[-2] != "parametrizations":
        return None
    return modules[".".join(parts[:-2])], parts[-1]


def _group_of(module: nn.Module, pname: str) -> str:
    """The selection group of parameter ``pname`` owned directly by ``module`` (step sizes aside).

    Before the recurrent and attention layers were classified, ``weights`` left out the Q/K/V
    projections of every ``nn.MultiheadAttention`` (a torchvision ViT's) and all of an LSTM's matrices,
    and nothing said so.
    """
    if isinstance(module, _LINEAR_TYPES):
        # weight_g / weight_v of the old torch.nn.utils.weight_norm, weight_orig of the old spectral_norm
        return "weights" if pname.startswith("weight") else "biases" if pname.startswith("bias") else "other"
    if isinstance(module, _RECURRENT_TYPES):
        return "weights" if pname.startswith("weight_") else "biases" if pname.startswith("bias_") else "other"
    if isinstance(module, nn.MultiheadAttention):
        return "weights" if pname in _ATTENTION_WEIGHTS else "biases" if pname in _ATTENTION_BIASES else "other"
    if isinstance(module, _NORM_TYPES):
        return "norm"
    return "other"


def left_out_of_groups(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Trainable parameters of group ``other`` that a group selection ``names`` does not hold.

    ``weights`` (the default) is a rule on layer types; a model with an embedding table, a position
    embedding or a parameter its own module owns directly has trainable tensors no such rule names, and
    a measure of "the weights" that silently leaves them out is easy to misread.
    """
    chosen = set(names)
    return [n for n in parameter_groups(model)["other"] if n not in chosen]


def include_groups(include: str | Sequence[str]) -> tuple[str, ...]:
    """``include`` as a tuple of group names: a string is read as ``--include`` writes it
    (``"weights"``, ``"weights,biases"``), not as a sequence of its characters."""
    if isinstance(include, str):
        return tuple(g.strip() for g in include.split(",") if g.strip())
    return tuple(include)


def select_parameters(model: nn.Module, include: Sequence[str] = ("weights",), select: str | None = None,
                      exclude: str | None = None) -> list[str]:
    """Parameter names chosen by groups or by a regex (see module docstring); errors if empty."""
    groups = parameter_groups(model)
    include = include_groups(include)
    if select:
        try:
            pattern = re.compile(select)
        except re.error as exc:
            raise FlatlensError(f"--params regex {select!r} is invalid: {exc}") from None
        names = [n for n in groups["all"] if pattern.search(n)]
    else:
        bad = [g for g in include if g not in GROUPS]
        if bad:
            raise FlatlensError(f"unknown parameter group(s) {bad}; choose from {', '.join(GROUPS)}")
        chosen = set().union(*(groups[g] for g in include))
        names = [n for n in groups["all"] if n in chosen]
    if exclude:
        try:
            pattern = re.compile(exclude)
        except re.error as exc:
            raise FlatlensError(f"--exclude regex {exclude!r} is invalid: {exc}") from None
        names = [n for n in names if not pattern.search(n)]
    if not names:
        raise FlatlensError(f"the parameter selection (include={list(include)}, select={select!r}, "
                            f"exclude={exclude!r}) matches no trainable parameter; available: "
                            + ", ".join(groups["all"][:8]) + (" ..." if len(groups["all"]) > 8 else ""))
    return names


def update_sha256(h: "hashlib._Hash", t: Tensor) -> None:
    """Feed the raw bytes of ``t`` (contiguous, on CPU; any dtype, bfloat16 included) into the hash ``h``.

    The one place flatlens hashes tensor contents (model states, sample subsets, landscape directions, HVP
    journal inputs); the numpy view is fed as it is, without a ``tobytes()`` copy."""
    c = t.detach().contiguous().cpu()
    if c.numel():
        h.update(c.reshape(-1).view(torch.uint8).numpy())


def model_state_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (bytes, dtype, shape), the training flags, the
    ``requires_grad`` flags and whether each ``.grad`` is set: what a measure must leave unchanged."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        data = t.detach()
        h.update(f"{name}:{data.dtype}:{tuple(data.shape)}:{getattr(t, 'requires_grad', False)}:"
                 f"{getattr(t, 'grad', None) is not None};".encode())
        update_sha256(h, data)
    for mname, m in model.named_modules():
        h.update(f"{mname}:{m.training};".encode())
    return h.hexdigest()


@dataclass
class ParamInfo:
    """Name, shape and kind of one parameter of a space (what results record)."""

    name: str
    shape: tuple[int, ...]
    module_type: str


class ParamSpace:
    """A chosen set of live parameters with a cached origin; moves them in place and restores them."""

    def __init__(self, model: nn.Module, names: Sequence[str], space: str = "latent") -> None:
        if space not in SPACES:
            raise FlatlensError(f"unknown parameter space {space!r}; choose from {', '.join(SPACES)}")
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise FlatlensError(f"parameters {missing[:3]} are not in the model")
        self.model = model
        self.space = space
        self.names = list(names)
        self.params: list[Tensor] = [params[n] for n in self.names]
        types = {}
        for mname, module in model.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                types[f"{mname}.{pname}" if mname else pname] = type(module).__name__
        self.info = [ParamInfo(n, tuple(p.shape), types.get(n, "")) for n, p in zip(self.names, self.params)]
        with torch.no_grad():
            self.origin: list[Tensor] = [p.detach().clone() for p in self.params]
        self.numel = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    # -- vectors ---------------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """One flat vector from tensors shaped like the space's parameters (in order)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like the parameters."""
        if flat.numel() != self.numel:
            raise ValueError(f"vector has {flat.numel()} entries, the space has {self.numel}")
        out, i = [], 0
        for p in self.params:
            out.append(flat[i:i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def origin_vector(self) -> Tensor:
        return self.flatten(self.origin)

    def zeros(self) -> list[Tensor]:
        return [torch.zeros_like(p) for p in self.origin]

    # -- moving ----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_offset(self, directions: Sequence[Sequence[Tensor]], coefficients: Sequence[float]) -> None:
        """params = origin + sum_k coefficients[k] * directions[k] (in place, foreach ops)."""
        terms = [(list(d), float(c)) for d, c in zip(directions, coefficients) if c != 0.0]
        if not terms:
            torch._foreach_copy_(self.params, self.origin)
            return
        # the first term writes origin + c*d straight into the parameter (one pass instead of copy + add;
        # the same arithmetic, so the same bits), every further term adds in place
        first, c0 = terms[0]
        for p, o, d in zip(self.params, self.origin, first):
            torch.add(o, d, alpha=c0, out=p)
        for d, c in terms[1:]:
            torch._foreach_add_(self.params, d, alpha=c)

    @torch.no_grad()
    def set_values(self, values: Sequence[Tensor]) -> None:
        """params = values (e.g. another checkpoint's weights)."""
        torch._foreach_copy_(self.params, list(values))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the origin back, bit for bit."""
        torch._foreach_copy_(self.params, self.origin)

    @contextmanager
    def perturbed(self, directions: Sequence[Sequence[Tensor]], coefficients: Sequence[float]) -> Iterator[None]:
        """Temporarily move to origin + sum c_k d_k."""
        self.set_offset(directions, coefficients)
        try:
            yield
        finally:
            self.restore()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Restore the origin on exit and verify the whole model is bit-identical to its entry state."""
        before = model_state_hash(self.model)
        try:
            yield
        finally:
            self.restore()
            after = model_state_hash(self.model)
            if after != before:
                raise SideEffectError("a measure left the model changed (state hash differs); please report this bug")

    def describe(self) -> dict[str, object]:
        """What results record about the perturbed parameter set."""
        return {
            "space": self.space, "param_names": self.names, "param_shapes": [list(i.shape) for i in self.info],
            "param_module_types": [i.module_type for i in self.info], "n_params": self.numel,
            "dtype": str(self.dtype).replace("torch.", ""),
        }
