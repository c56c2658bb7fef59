"""Attach LSQ quantizers to a model by module-name policy, switch them on and off, guard the optimizer.

Order that matters (the released QT-DoG code got it wrong and silently stopped training its
quantized convolutions): **attach quantizers first, build the optimizer second, enable quantization
later** (e.g. at ``q_step``)::

    names = attach_quantizers(model, quantize=["*"], keep_float=["classifier"], bits=7)
    q_names = set(quantizer_parameter_names(model))
    opt = torch.optim.Adam([
        {"params": [p for n, p in model.named_parameters() if n not in q_names]},
        {"params": [p for n, p in model.named_parameters() if n in q_names], "weight_decay": 0.0},
    ], lr=5e-5)
    assert_all_trainable_in_optimizer(model, opt)
    ...
    if step == q_step:
        set_quantization_enabled(model, True, reinit=True)   # LSQ init from the current weights

Replacement keeps the float weight/bias ``nn.Parameter`` objects (same names, same optimizer
entries); the only new parameters are ``<module>.weight_quantizer.step_size`` and, with
activations, ``<module>.act_quantizer.step_size``. While quantization is disabled the step sizes get
no gradient (``grad is None``, so optimizers skip them; under DDP use ``find_unused_parameters=True``
or attach with ``enabled=True``).
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from .lsq import GradScaleN, LSQQuantizer
from .modules import QUANT_MODULE_TYPES, QuantConv2d, QuantLinear

_TYPE_KEYS: dict[str, type[nn.Module]] = {"conv": nn.Conv2d, "linear": nn.Linear}
_QUANT_OF: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}

QuantRole = Literal["weight", "activation"]


def _as_list(patterns: str | Iterable[str], what: str) -> list[str]:
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    if not all(isinstance(p, str) for p in out):
        raise ValueError(f"{what} must be a list of module-name patterns (strings), got {out!r}")
    return out


def eligible_module_names(model: nn.Module, module_types: Sequence[str] = ("conv", "linear")) -> list[str]:
    """Fully-qualified names of the float modules ``attach_quantizers`` could replace.

    Only the exact types ``nn.Conv2d`` / ``nn.Linear`` qualify (a subclass may override ``forward``,
    which a replacement would silently drop); already-quantized modules and the root are excluded.
    """
    unknown = [t for t in module_types if t not in _TYPE_KEYS]
    if unknown or not module_types:
        raise ValueError(f"module_types must be a non-empty subset of {sorted(_TYPE_KEYS)}, got {list(module_types)}")
    types = tuple(_TYPE_KEYS[t] for t in module_types)
    return [name for name, m in model.named_modules() if name and type(m) in types]


def attach_quantizers(
    model: nn.Module,
    *,
    quantize: str | Sequence[str] = ("*",),
    keep_float: str | Sequence[str] = (),
    bits: int = 7,
    per_channel: bool = True,
    signed: bool = True,
    narrow: bool = False,
    grad_scale_n: GradScaleN = "tensor",
    activations: bool = False,
    act_bits: int = 8,
    act_signed: bool = False,
    module_types: Sequence[str] = ("conv", "linear"),
    enabled: bool = False,
) -> list[str]:
    """Replace matching ``nn.Conv2d`` / ``nn.Linear`` submodules of ``model`` in place by quantized ones.

    A module is quantized when its fully-qualified name (as in ``model.named_modules()``) matches a
    ``quantize`` pattern and no ``keep_float`` pattern (``fnmatch.fnmatchcase``; ``*`` also matches
    dots, so ``"layer1.*"`` covers everything under ``layer1``). Every pattern must match at least one
    eligible module, otherwise ``ValueError`` lists the eligible names -- a typo never silently
    quantizes (or keeps float) nothing. Weight quantizers are LSQ-initialized from the current
    weights; activation quantizers (``activations=True``: input activations, ``act_bits``, unsigned
    unless ``act_signed``, per tensor) initialize from the first training batch after enabling.

    Call this BEFORE building the optimizer (the step sizes are new Parameters). Quantizers start
    disabled unless ``enabled=True``; see :func:`set_quantization_enabled`. Returns the names of the
    quantized modules in module order.
    """
    quantize_l = _as_list(quantize, "quantize")
    keep_l = _as_list(keep_float, "keep_float")
    eligible = eligible_module_names(model, module_types)
    shown = ", ".join(eligible) if eligible else "(none)"
    for what, pats in (("quantize", quantize_l), ("keep_float", keep_l)):
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n in eligible):
                raise ValueError(f"{what} pattern {pat!r} matches no eligible module; eligible: {shown}")
    selected = [n for n in eligible
                if any(fnmatch.fnmatchcase(n, p) for p in quantize_l)
                and not any(fnmatch.fnmatchcase(n, p) for p in keep_l)]

    # a module object reachable under two names would be replaced under one name only
    modules = dict(model.named_modules())
    names_of: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(name)
    for name in selected:
        aliases = names_of[id(modules[name])]
        if len(aliases) > 1:
            raise ValueError(f"module {name!r} is shared under several names {aliases}; quantize it by hand")

    w_kwargs = {"bits": bits, "signed": signed, "narrow": narrow, "per_channel": per_channel,
                "grad_scale_n": grad_scale_n, "enabled": enabled}
    a_kwargs = ({"bits": act_bits, "signed": act_signed, "narrow": False, "per_channel": False,
                 "grad_scale_n": grad_scale_n, "enabled": enabled} if activations else None)
    # validate the quantizer arguments once, before touching the model
    LSQQuantizer(bits, signed=signed, narrow=narrow, per_channel=False, grad_scale_n=grad_scale_n)
    if activations:
        LSQQuantizer(act_bits, signed=act_signed, grad_scale_n=grad_scale_n)

    for name in selected:
        old = modules[name]
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        new = _QUANT_OF[type(old)].from_float(old, w_kwargs, a_kwargs)
        setattr(parent, child, new)
    return selected


def iter_quantizers(model: nn.Module, role: QuantRole | None = None) -> Iterator[tuple[str, LSQQuantizer]]:
    """Yield ``(name, quantizer)`` for every LSQ quantizer, e.g. ``("layer1.0.conv1.weight_quantizer", q)``.

    ``role="weight"`` / ``"activation"`` restricts to weight or input-activation quantizers of the
    quantized modules (a bare ``LSQQuantizer`` elsewhere in the model only appears with ``role=None``).
    """
    if role not in (None, "weight", "activation"):
        raise ValueError(f"role must be None, 'weight' or 'activation', got {role!r}")
    for name, m in model.named_modules():
        if not isinstance(m, LSQQuantizer):
            continue
        leaf = name.rpartition(".")[2]
        if role == "weight" and leaf != "weight_quantizer":
            continue
        if role == "activation" and leaf != "act_quantizer":
            continue
        yield name, m


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of the ``QuantConv2d`` / ``QuantLinear`` modules, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANT_MODULE_TYPES)]


def quantizer_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of all quantizer parameters, i.e. the step sizes.

    The engine gives them their own optimizer group (no weight decay); measures exclude them from
    perturbation directions unless asked.
    """
    ids = {id(p) for _, q in iter_quantizers(model) for p in q.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def set_quantization_enabled(
    model: nn.Module, flag: bool, *, reinit: bool = False, role: QuantRole | None = None
) -> int:
    """Switch every quantizer (or those of one ``role``) on or off; return how many were switched.

    ``reinit=True`` (use it when QAT starts at ``q_step``, not on resume) re-runs the LSQ init of each
    weight quantizer from its module's current weight and marks activation quantizers uninitialized,
    so they initialize from the next training batch. Step sizes are updated in place (optimizer
    entries stay valid).
    """
    modules = dict(model.named_modules())
    count = 0
    for name, q in iter_quantizers(model, role):
        if reinit:
            parent_name, _, leaf = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            if leaf == "weight_quantizer" and isinstance(parent, QUANT_MODULE_TYPES):
                q.init_from(parent.weight)
            else:
                q.reset_initialization()
        q.set_enabled(flag)
        count += 1
    return count


def quantization_state(model: nn.Module) -> Literal["none", "off", "on", "mixed"]:
    """``"none"`` without quantizers, else ``"on"`` / ``"off"`` when all agree, ``"mixed"`` otherwise."""
    flags = {q.is_enabled() for _, q in iter_quantizers(model)}
    if not flags:
        return "none"
    if len(flags) == 2:
        return "mixed"
    return "on" if flags.pop() else "off"


def is_quantization_enabled(model: nn.Module) -> bool:
    """True when at least one quantizer is enabled (see :func:`quantization_state` for the detail)."""
    return any(q.is_enabled() for _, q in iter_quantizers(model))


def assert_all_trainable_in_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, allow_extra: bool = False
) -> None:
    """Raise ``RuntimeError`` unless every ``requires_grad`` parameter of ``model`` appears exactly once
    in the param groups of ``optimizer``, and (unless ``allow_extra``) the optimizer holds no tensor that is not
    a parameter of ``model`` (stale objects left behind by a module swap, QT-DoG's bug).
    """
    counts: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            counts[id(p)] = counts.get(id(p), 0) + 1
    named = list(model.named_parameters())
    missing = [n for n, p in named if p.requires_grad and id(p) not in counts]
    dup = [n for n, p in named if counts.get(id(p), 0) > 1]
    model_ids = {id(p) for _, p in named}
    extra = 0 if allow_extra else sum(1 for i in counts if i not in model_ids)
    problems = []
    if missing:
        problems.append(f"{len(missing)} trainable parameter(s) missing from the optimizer "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    if dup:
        problems.append(f"{len(dup)} parameter(s) listed more than once in the optimizer ({', '.join(dup[:5])})")
    if extra:
        problems.append(f"{extra} optimizer tensor(s) that are not parameters of the model (stale after a module swap?)")
    if problems:
        raise RuntimeError("; ".join(problems) + " -- attach quantizers before building the optimizer")
