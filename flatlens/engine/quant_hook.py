"""Quantization during training: QAT from ``q_step`` and the QT-DoG ablation modes (``quant.mode``).

Every mode does nothing before ``q_step`` (``phase = "before_q"``) and switches at the start of update
``q_step`` (``phase = "after_q"`` from then on); ``q_step = -1`` means 40% of ``train.steps`` (QT-DoG:
2000 of 5000). Quantizers, when the mode needs them, were attached by :func:`flatlens.network.build_network`
before the optimizer was built, so every parameter (float weights and step sizes) is in the optimizer
from step 0 and nothing is ever swapped in mid-run.

``qat`` (true QAT)
    At ``q_step`` every quantizer is switched on with ``reinit=True``: the LSQ step sizes are
    re-initialised from the *current* weights (``s0 = 2 mean|w| / sqrt(Q_P)``; activation quantizers
    from the next training batch). From then on float weights and step sizes all train.

``quantize_and_freeze`` (what the released QT-DoG code effectively does)
    Switch on exactly as ``qat``, then freeze every parameter of the quantized modules -- the latent
    weights, their biases and the step sizes -- at their values at the switch (the LSQ-initialised
    step; an activation quantizer's step at its first-batch init). Only the float layers (the
    classifier by default) and the BN/GroupNorm affine parameters keep training. This is a clean
    freeze: QT-DoG's code on torch 1.10 additionally let decaying Adam momentum drift the shared
    storage of the old conv weights; that artefact is not reproduced.

``freeze_without_quant``
    No quantizers. At ``q_step`` the parameters (weight and bias) of the modules that the
    ``quantize`` / ``keep_float`` patterns select are frozen at their current float values; the rest
    keeps training. Separates "freezing the backbone" from "quantizing it".

``uniform_noise`` (QT-DoG Table 15)
    No quantizers. From ``q_step`` on, each update runs at ``w + n`` for the weights of the selected
    modules (biases excluded, like quantization), with ``n ~ U(-a, a)``, ``a = quant.noise_a``, a fresh
    draw per step. The noise is not accumulated: before the update the clean weights ``w`` are saved,
    ``w + n`` is written into the parameters, the algorithm computes its gradient(s) there and steps the
    optimizer (new value ``w + n + Δ``), and then the clean weights plus the optimizer's step are put
    back, ``w <- w + ((w + n + Δ) - (w + n))`` -- the update computed at the noisy point applied to the
    clean weights (up to float rounding of Δ in the ulp grid of ``w + n``, the same order as the
    update's own rounding). Evaluation and checkpoints always see clean weights.

``matched_noise``
    Quantizers are attached but never switched on. At ``q_step`` their step sizes get the LSQ init
    from the current weights (as in ``qat``); from then on each update runs at ``w + n`` with
    ``n ~ U(-s/2, s/2)`` per output channel (the model's own step sizes ``s``, which receive no gradient
    and therefore stay at that init), with the same save/restore as ``uniform_noise``. It matches the
    noise magnitude of quantization without its structure (QGen's ``sigma_q = s/sqrt(12)``).

Noise draws come from ``flatlens.seeding.generator(train.seed, "quant-noise", step)`` (CPU), so they
are a pure function of the step (not of the rank: DDP replicas stay identical) and a resumed run
draws exactly what the uninterrupted one did.

Freezing keeps the parameters in the optimizer (``requires_grad`` unchanged, so the optimizer groups,
the DDP reducer and :func:`flatlens.quant.assert_all_trainable_in_optimizer` see the same picture in
every mode): after each optimizer step the hook copies the frozen values back
(``torch._foreach_copy_``), so they are bit-identical from ``q_step`` on whatever the optimizer or the
algorithm (SAM-family, weight decay, momentum) did. Their optimizer state keeps accumulating but is
never applied. On resume the frozen values are taken from the loaded model, which holds exactly them
(checkpoints are written after the restore).

Records: ``quantized`` (the loop) is True when the forward pass uses quantized weights (``qat`` and
``quantize_and_freeze`` after ``q_step``; never in the other modes); this hook adds ``quant_mode``,
``q_step`` and ``phase``. Model selection with ``quant.select_quantized_only`` (default) considers the
``after_q`` checkpoints only, which for ``qat`` / ``quantize_and_freeze`` are exactly the quantized
ones and for the other modes the ones taken under the ablation's treatment.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from flatlens.config import Config
from flatlens.engine.hooks import TrainHook, resolved_q_step
from flatlens.errors import ConfigError
from flatlens.seeding import generator

QUANTIZER_MODES = ("qat", "quantize_and_freeze", "matched_noise")
"""Modes whose model carries LSQ quantizers (see :func:`flatlens.network.build_network`)."""
FREEZE_MODES = ("quantize_and_freeze", "freeze_without_quant")
NOISE_MODES = ("uniform_noise", "matched_noise")


def select_module_names(model: nn.Module, quantize: list[str], keep_float: list[str]) -> list[str]:
    """Names of the Conv2d/Linear modules the ``quantize`` / ``keep_float`` patterns select.

    The same rule as :func:`flatlens.quant.attach_quantizers` (exact ``nn.Conv2d`` / ``nn.Linear``
    types, ``fnmatch`` on the full module name, every pattern must match an eligible module), for the
    modes that build no quantizers. Raises a one-line :class:`ConfigError` otherwise.
    """
    from flatlens.quant import eligible_module_names

    eligible = eligible_module_names(model)
    shown = ", ".join(eligible) if eligible else "(none)"
    for what, pats in (("quantize", quantize), ("keep_float", keep_float)):
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n in eligible):
                raise ConfigError(f"quant: {what} pattern {pat!r} matches no eligible module; eligible: {shown}")
    return [n for n in eligible if any(fnmatch.fnmatchcase(n, p) for p in quantize)
            and not any(fnmatch.fnmatchcase(n, p) for p in keep_float)]


class QuantHook(TrainHook):
    """Implements ``quant.mode`` (see the module docstring) around every update of the loop."""

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        from flatlens.quant import quantized_module_names

        self.cfg = cfg
        self.model = model
        self.mode = cfg.quant.mode
        self.q_step = resolved_q_step(cfg)
        if self.q_step >= cfg.train.steps:
            raise ConfigError(f"quant.q_step = {self.q_step} is not below train.steps = {cfg.train.steps}: the "
                              f"{self.mode} treatment would never start; lower quant.q_step (or -1 for 40% of the run)")
        if cfg.quant.activations and self.mode not in ("qat", "quantize_and_freeze"):
            raise ConfigError(f"quant.activations = true needs quant.mode = qat or quantize_and_freeze "
                              f"(mode {self.mode} perturbs weights only)")
        modules = dict(model.named_modules())
        if self.mode in QUANTIZER_MODES:
            names = quantized_module_names(model)
            if not names:
                raise ConfigError(f"quant.mode = {self.mode} needs quantizers, but the model has none")
        else:
            names = select_module_names(model, list(cfg.quant.quantize), list(cfg.quant.keep_float))
        self.module_names = names
        self.modules = [modules[n] for n in names]
        self.switched = False
        self.frozen: list[nn.Parameter] = []
        self._frozen_values: list[torch.Tensor] | None = None
        self._capture_hooks: dict[int, Any] = {}
        self._noisy: list[nn.Parameter] = []
        self._clean: list[torch.Tensor] = []
        self._perturbed: list[torch.Tensor] = []

    # -- parameter sets -----------------------------------------------------------------------
    def frozen_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of everything the freeze modes hold fixed after ``q_step``."""
        if self.mode not in FREEZE_MODES:
            return []
        out = []
        seen: set[int] = set()
        for name, m in zip(self.module_names, self.modules):
            for pname, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{name}.{pname}", p))
        return out

    def noisy_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, weight)`` of the weights the noise modes perturb (the quantizable weights)."""
        if self.mode not in NOISE_MODES:
            return []
        return [(f"{n}.weight", m.weight) for n, m in zip(self.module_names, self.modules)]

    # -- the switch ---------------------------------------------------------------------------
    def _switch(self, reinit: bool) -> None:
        """Apply the mode's treatment; ``reinit`` (a fresh switch at ``q_step``, never on resume) runs
        the LSQ init from the current weights."""
        from flatlens.quant import set_quantization_enabled

        if self.mode in ("qat", "quantize_and_freeze") and reinit:
            set_quantization_enabled(self.model, True, reinit=True)
        elif self.mode == "matched_noise" and reinit:
            set_quantization_enabled(self.model, False, reinit=True)
        if self.mode in FREEZE_MODES:
            self.frozen = [p for _, p in self.frozen_parameters()]
            self._frozen_values = [p.detach().clone() for p in self.frozen]
            if reinit:
                self._capture_lazy_inits()
        self.switched = True

    def _capture_lazy_inits(self) -> None:
        """An activation quantizer initialises its step size from the first batch after the switch:
        freeze it at that value (captured right after the forward that ran the init)."""
        from flatlens.quant import iter_quantizers

        index = {id(p): i for i, p in enumerate(self.frozen)}
        for _, q in iter_quantizers(self.model, "activation"):
            if id(q.step_size) not in index or q.is_initialized():
                continue
            i = index[id(q.step_size)]

            def capture(module: nn.Module, _inputs: Any, _output: Any, i: int = i) -> None:
                if self._frozen_values is not None:
                    self._frozen_values[i] = module.step_size.detach().clone()
                self._capture_hooks.pop(i).remove()  # once: later forwards use the frozen value

            self._capture_hooks[i] = q.register_forward_hook(capture)

    # -- TrainHook API ------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        if not self.switched and step >= self.q_step:
            # a fresh switch at q_step re-initialises the step sizes; a run resumed past q_step without
            # hook state (older checkpoints) keeps the loaded ones
            self._switch(reinit=step == self.q_step)
        if self.switched and self.mode in NOISE_MODES:
            self._add_noise(step)

    def after_step(self, step: int) -> None:
        if self._noisy:
            self._remove_noise()
        if self.frozen and self._frozen_values is not None:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.frozen], self._frozen_values)

    def quantized(self) -> bool:
        from flatlens.quant import is_quantization_enabled

        return self.mode in ("qat", "quantize_and_freeze") and bool(is_quantization_enabled(self.model))

    def record_fields(self) -> dict[str, Any]:
        return {"q_step": self.q_step, "quant_mode": self.mode, "phase": "after_q" if self.switched else "before_q"}

    def state_dict(self) -> dict[str, Any]:
        return {"switched": self.switched, "mode": self.mode, "q_step": self.q_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the loop loads the model before the hooks: frozen values are the loaded parameters
        if state.get("switched") and not self.switched:
            self._switch(reinit=False)

    # -- noise --------------------------------------------------------------------------------
    @torch.no_grad()
    def _add_noise(self, step: int) -> None:
        from flatlens.quant import sample_matched_noise, sample_uniform_noise

        gen = generator(self.cfg.train.seed, "quant-noise", step)
        params = self.noisy_parameters()
        if self.mode == "uniform_noise":
            noise = [sample_uniform_noise(p.shape, self.cfg.quant.noise_a, gen, dtype=p.dtype, device=p.device)
                     for _, p in params]
        else:
            by_name = sample_matched_noise(self.model, gen)
            noise = [by_name[name] for name, _ in params]
        self._noisy = [p for _, p in params]
        self._clean = [p.detach().clone() for p in self._noisy]
        torch._foreach_add_([p.data for p in self._noisy], noise)
        self._perturbed = [p.detach().clone() for p in self._noisy]

    @torch.no_grad()
    def _remove_noise(self) -> None:
        data = [p.data for p in self._noisy]
        delta = torch._foreach_sub(data, self._perturbed)  # the optimizer's step, taken at w + n
        torch._foreach_add_(delta, self._clean)
        torch._foreach_copy_(data, delta)
        self._noisy, self._clean, self._perturbed = [], [], []
