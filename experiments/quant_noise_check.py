"""Does the loss increase under quantization noise match QGen's second-order term sum_c s_c^2/24 tr(H_cc)?

A theory check written against flatlens' public Python API only, as a notebook would do it::

    python experiments/quant_noise_check.py runs/demo/qat/model.pt --samples 256 --scales 1,0.5,0.25

For rounding noise ``delta_i ~ U(-s_c/2, s_c/2)`` (independent, ``s_c`` the LSQ step of the output channel
holding weight ``i``), a second-order Taylor expansion around the quantized weights ``w_q`` gives

    E[L(w_q + delta)] - L(w_q) = E[g^T delta] + E[delta^T H delta] / 2 + O(s^4) = sum_c s_c^2 / 24 tr(H_cc) + O(s^4),

QGen's noise term, which ``fl.hessian.layer_traces`` estimates per quantized layer (``.layers.quant``). This
script measures the left side by Monte Carlo in ``dequant`` space (the float function of ``w_q``): each draw
perturbs every quantized weight by fresh uniform noise of ``scale`` times its step, both ways (antithetic
pairs: ``dL = (L(w_q + delta) + L(w_q - delta)) / 2 - L(w_q)`` has no first-order term, so the gradient adds no
variance), and compares the mean and its 95 % interval with the prediction ``scale^2 * sum_c s_c^2/24 tr(H_cc)``
and its interval. Each draw also costs one HVP for its quadratic form ``q = delta^T H delta / 2``: the mean of
``q`` checks the noise term itself (``E[q]`` is what it estimates), and the mean of ``dL - q`` is the part of
the loss increase the quadratic model misses, with a far smaller interval than ``dL`` alone (the two move
together draw by draw).

For a smooth network the missed part falls off as ``scale^4``. For ReLU / max-pool networks it need not:
noise of any size moves some pre-activations across zero, and each crossing adds a term of the order of
``|Delta z|^2`` that autograd's Hessian leaves out (ReLU's second derivative is a Dirac delta), so the missed
part can stay of the order of ``scale^2`` until the noise is smaller than the smallest ``|z|``; the
``missed`` column shows how much it is (README, "Checking the theory from Python").

Every draw comes from a seeded ``torch.Generator`` (``--seed``); the model is bit-identical afterwards
(``obj.space.guard()``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flatlens as fl  # noqa: E402
from flatlens.quant import iter_quantizers  # noqa: E402


def noise_steps(obj: fl.Objective, weights: list[str]) -> list[torch.Tensor]:
    """Per parameter of ``obj``'s space: the step sizes of its weight quantizer, shaped to broadcast over
    the weight (output channels first), or zeros where the parameter is not one of ``weights``."""
    steps = {name.rpartition(".")[0]: q for name, q in iter_quantizers(obj.model, "weight")}
    out = []
    for name, p in zip(obj.space.names, obj.space.params):
        layer = name.rpartition(".")[0]
        if name not in weights:
            out.append(torch.zeros(()))
            continue
        q = steps[layer]
        s = q.step_size.detach().clamp_min(q.eps).double().cpu()  # as the noise term uses them
        out.append(s.reshape(-1, *[1] * (p.dim() - 1)) if s.numel() > 1 else s.reshape(()))
    return out


def _mean(name: str, t: torch.Tensor) -> dict[str, float]:
    """``{name: mean, name_ci: 95 % half-width}`` of i.i.d. draws ``t`` (normal quantile)."""
    return {name: float(t.mean()), f"{name}_ci": 1.96 * float(t.std(unbiased=True)) / math.sqrt(len(t))}


def check(obj: fl.Objective, scales: list[float], draws: int = 64, seed: int = 0, layer_rtol: float = 0.05,
          max_hvp: int = 400) -> dict[str, Any]:
    """The predicted noise term (with its 95 % CI) and the Monte-Carlo loss increase at each ``scale``."""
    tr = fl.hessian.layer_traces(obj, layer_rtol=layer_rtol, max_hvp=max_hvp, seed=seed)
    q = tr.layers.quant
    if q is None or not q.names:
        raise SystemExit("this model has no initialised weight quantizers: pass a QAT checkpoint")
    steps = noise_steps(obj, q.weights)
    gen = torch.Generator().manual_seed(seed)
    base = obj.loss()
    rows = []
    with obj.space.guard():
        for scale in scales:
            incr, quad = [], []
            for _ in range(draws):
                delta = [((torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5) * s * scale).to(p)
                         for p, s in zip(obj.space.params, steps)]
                with obj.space.perturbed([delta], [1.0]):
                    up = obj.loss()
                with obj.space.perturbed([delta], [-1.0]):
                    down = obj.loss()
                incr.append(0.5 * (up + down) - base)
                flat = obj.space.flatten(delta)
                quad.append(0.5 * float(flat.double() @ obj.hvp(flat).double()))
            dl, qf = torch.tensor(incr, dtype=torch.float64), torch.tensor(quad, dtype=torch.float64)
            predicted = scale**2 * q.total
            rows.append({"scale": scale, "predicted": predicted,
                         "predicted_ci": (scale**2 * float(q.ci_low.sum()), scale**2 * float(q.ci_high.sum())),
                         **_mean("measured", dl), **_mean("quadratic", qf), **_mean("missed", dl - qf),
                         "ratio": float(dl.mean()) / predicted if predicted else math.nan})
    return {"loss": base, "layers": q.names, "noise_terms": q.noise_terms.tolist(), "trace_n_hvp": tr.n_hvp,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a QAT checkpoint (e.g. runs/demo/qat/model.pt)")
    p.add_argument("--split", default="source-val")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--scales", default="1,0.5,0.25", help="noise amplitudes, in units of the step sizes")
    p.add_argument("--draws", type=int, default=64, help="antithetic noise pairs per scale")
    p.add_argument("--layer-rtol", type=float, default=0.05, help="per-layer CI target of the traces")
    p.add_argument("--max-hvp", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        run = fl.load_checkpoint(args.checkpoint)
        obj = fl.Objective(run, split=args.split, samples=args.samples, space="dequant", seed=args.seed)
        res = check(obj, [float(s) for s in args.scales.split(",")], args.draws, args.seed, args.layer_rtol,
                    args.max_hvp)
    except fl.FlatlensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: {obj.n_samples} samples of {obj.split}, dequant space, loss {res['loss']:.6f}; "
          f"noise terms from {res['trace_n_hvp']} HVPs")
    for name, term in zip(res["layers"], res["noise_terms"]):
        print(f"  {name:<24} sum_c s_c^2/24 tr(H_cc) = {term:.4g}")
    print("scale: noise in steps; predicted: scale^2 sum_c s_c^2/24 tr(H_cc) (sum of the layers' 95% CIs);")
    print("E[dL]: measured loss increase; E[q]: mean quadratic form delta^T H delta / 2; missed: E[dL - q] (95% CIs)")
    print(f"{'scale':>6}  {'predicted':>30}  {'E[dL]':>20}  {'E[q]':>20}  {'missed':>20}  E[dL]/pred")
    for r in res["rows"]:
        lo, hi = r["predicted_ci"]
        cells = "  ".join(f"{r[k]:>9.3g} ± {r[k + '_ci']:<8.2g}" for k in ("measured", "quadratic", "missed"))
        print(f"{r['scale']:>6g}  {r['predicted']:>9.3g} [{lo:.3g}, {hi:.3g}]  {cells}  {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
