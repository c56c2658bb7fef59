"""EoQ: ensembles of (quantized) checkpoints, evaluated on every domain split.

QT-DoG's EoQ (arXiv 2410.06020, Eq. 6) averages the *logits* of E independently seeded quantized
models, ``y_hat = argmax softmax((1/E) sum_i f(x; w_q^i))``; EoA-style ensembles average the softmax
*probabilities* instead. Both are offered (``combine = "logits" | "probs"``; default ``logits``).

Members must share the data they were trained and selected on: the dataset fingerprint, the split
fingerprint (same trial seed, holdout fraction and target domains) and the label space, all stored in
every checkpoint. The dataset is rebuilt once, from the first member, and checked against its stored
fingerprint; the others' stored fingerprints must equal it.

Size (QT-DoG Table 1's "size" column, e.g. 5 x 7/32 ~ 1.1x): a member's size in bits counts every
parameter of its model -- each weight whose quantizer is on at its bit width, everything else
(biases, float layers, normalisation, step sizes) at 32 bits -- and the ensemble's relative size is the
sum over members divided by the size of one float model of the same architecture (its parameters
without step sizes, at 32 bits; the mean over members when architectures differ).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flatlens.checkpoint import Run, load_checkpoint
from flatlens.engine.collect import text_table
from flatlens.errors import CheckpointError, ConfigError, DataError

COMBINE_MODES = ("logits", "probs")


@dataclass
class ModelSize:
    """Parameter counts and storage of one model (bits)."""

    n_params: int  # all parameters, step sizes included
    n_quantized: int  # weights stored at ``bits`` (their quantizer is on)
    bits: list[int]  # distinct weight bit widths in use
    size_bits: int  # quantized weights at their bits, every other parameter at 32
    float_bits: int  # the same architecture in float: parameters without step sizes, at 32


def model_size(model: nn.Module) -> ModelSize:
    """:class:`ModelSize` of a model (see the module docstring for what counts)."""
    from flatlens.quant import QUANT_MODULE_TYPES, quantizer_parameter_names

    q_bits: dict[int, int] = {}
    for _, m in model.named_modules():
        if isinstance(m, QUANT_MODULE_TYPES) and m.weight_quantizer.is_enabled():
            q_bits[id(m.weight)] = m.weight_quantizer.bits
    scale_names = set(quantizer_parameter_names(model))
    n = nq = size = fsize = 0
    for name, p in model.named_parameters():
        k = p.numel()
        n += k
        if id(p) in q_bits:
            nq += k
            size += k * q_bits[id(p)]
        else:
            size += 32 * k
        if name not in scale_names:
            fsize += 32 * k
    return ModelSize(n_params=n, n_quantized=nq, bits=sorted(set(q_bits.values())), size_bits=size, float_bits=fsize)


@dataclass
class Member:
    """One ensemble member as loaded."""

    path: str
    label: str
    step: int
    kind: str
    quantized: bool
    size: ModelSize
    selection: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnsembleResult:
    """Per-split accuracies of every member and of the ensemble (fractions in [0, 1])."""

    combine: str
    members: list[Member]
    dataset: str
    domains: list[str]
    test_envs: list[int]
    train_envs: list[int]
    splits: list[str]
    n_samples: dict[str, int]
    member_acc: dict[str, list[float]]  # split -> one accuracy per member
    member_loss: dict[str, list[float]]
    ensemble_acc: dict[str, float]
    ensemble_loss: dict[str, float]
    relative_size: float  # sum of member sizes / one float model

    def summary(self, which: str) -> tuple[list[float], float]:
        """(member accuracies, ensemble accuracy) averaged over the ``target`` domains' ``in`` splits
        (DomainBed's reported number) or the training domains' ``out`` splits (``source-val``)."""
        keys = ([f"env{t}_in" for t in self.test_envs] if which == "target"
                else [f"env{t}_out" for t in self.train_envs])
        per_member = [sum(self.member_acc[k][i] for k in keys) / len(keys) for i in range(len(self.members))]
        return per_member, sum(self.ensemble_acc[k] for k in keys) / len(keys)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for which in ("target", "source-val"):
            m, e = self.summary(which)
            d[f"{which.replace('-', '_')}_acc"] = {"members": m, "member_mean": sum(m) / len(m), "ensemble": e}
        return d


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        if not (p / "model.pt").is_file():
            raise CheckpointError(f"{p} is a directory without model.pt; give checkpoint files or run directories")
        return p / "model.pt"
    return p


def load_members(paths: Sequence[str | Path], device: str | torch.device = "cpu",
                 data_root: str | Path | None = None) -> list[Run]:
    """Load every checkpoint (the first with its data) and check that they share data, splits and labels."""
    if not paths:
        raise ConfigError("an ensemble needs at least one checkpoint")
    files = [_resolve(p) for p in paths]
    runs = [load_checkpoint(files[0], device=device, data=True, data_root=data_root)]
    first = runs[0]
    assert first.dataset is not None and first.splits is not None
    ref = {"dataset": first.dataset.fingerprint(), "splits": first.splits.fingerprint()}
    ref_classes = first.dataset.num_classes
    for f in files[1:]:
        run = load_checkpoint(f, device=device, data=False)
        stored = run.checkpoint.get("data", {})
        if stored.get("dataset") != ref["dataset"]:
            raise DataError(f"{f} was trained on other data than {files[0]} (dataset {run.config.data.dataset} "
                            f"fingerprint {stored.get('dataset')} != {ref['dataset']}); ensemble members must share "
                            "the dataset")
        if stored.get("splits") != ref["splits"]:
            raise DataError(f"{f} uses other in/out splits than {files[0]} (trial_seed {run.config.train.trial_seed} vs "
                            f"{first.config.train.trial_seed}, test_envs {run.config.data.test_envs} vs "
                            f"{first.config.data.test_envs}); ensemble members must share splits and target domains")
        n_classes = int(run.checkpoint.get("num_classes", -1))
        names = run.checkpoint.get("domain_names")
        if n_classes != ref_classes or (names is not None and list(names) != first.dataset.domain_names):
            raise DataError(f"{f} has another label space than {files[0]} ({n_classes} classes, domains {names} vs "
                            f"{ref_classes} classes, domains {first.dataset.domain_names})")
        runs.append(run)
    return runs


@torch.no_grad()
def evaluate_ensemble(runs: Sequence[Run], combine: str = "logits", batch_size: int = 256,
                      num_workers: int = 0) -> EnsembleResult:
    """Accuracy and loss of every member and of their ensemble on every ``env{i}_{in,out}`` split."""
    from flatlens.data.stream import iter_eval_batches

    if combine not in COMBINE_MODES:
        raise ConfigError(f"--combine {combine!r} is not one of: {', '.join(COMBINE_MODES)}")
    first = runs[0]
    dataset, splits = first.dataset, first.splits
    if dataset is None or splits is None:
        raise DataError("the first ensemble member must be loaded with data=True")
    device = first.device
    models = [r.model.eval() for r in runs]
    e = len(models)
    keys = splits.names()
    member_acc: dict[str, list[float]] = {}
    member_loss: dict[str, list[float]] = {}
    ens_acc: dict[str, float] = {}
    ens_loss: dict[str, float] = {}
    counts: dict[str, int] = {}
    for key in keys:
        env, idx = splits.indices(key)
        correct = torch.zeros(e + 1, dtype=torch.float64, device=device)
        loss = torch.zeros(e + 1, dtype=torch.float64, device=device)
        n = 0
        for x, y in iter_eval_batches(dataset.domains[env], idx, batch_size, num_workers, device):
            logits = torch.stack([m(x).float() for m in models])  # (E, B, C)
            logp = F.log_softmax(logits, dim=-1)
            for i in range(e):
                correct[i] += (logits[i].argmax(-1) == y).sum()
                loss[i] += F.nll_loss(logp[i], y, reduction="sum").double()
            if combine == "logits":
                comb = logits.mean(0)
                comb_logp = F.log_softmax(comb, dim=-1)
            else:
                comb_logp = torch.logsumexp(logp, dim=0) - math.log(e)  # log of the mean probability
                comb = comb_logp
            correct[e] += (comb.argmax(-1) == y).sum()
            loss[e] += F.nll_loss(comb_logp, y, reduction="sum").double()
            n += y.numel()
        c, l_ = (correct / max(n, 1)).tolist(), (loss / max(n, 1)).tolist()
        member_acc[key], member_loss[key] = c[:e], l_[:e]
        ens_acc[key], ens_loss[key] = c[e], l_[e]
        counts[key] = n
    members = []
    for r in runs:
        members.append(Member(path=str(r.path), label=str(r.checkpoint.get("label", "")), step=r.step, kind=r.kind,
                              quantized=r.quantized, size=model_size(r.model),
                              selection=dict(r.checkpoint.get("selection", {}) or {})))
    float_ref = sum(m.size.float_bits for m in members) / e
    rel = sum(m.size.size_bits for m in members) / float_ref
    return EnsembleResult(combine=combine, members=members, dataset=first.config.data.dataset,
                          domains=dataset.domain_names, test_envs=list(splits.test_envs),
                          train_envs=list(splits.train_envs), splits=keys, n_samples=counts,
                          member_acc=member_acc, member_loss=member_loss, ensemble_acc=ens_acc,
                          ensemble_loss=ens_loss, relative_size=rel)


def format_result(res: EnsembleResult) -> str:
    """A plain-text report: members, per-split accuracy table (percent), summaries and size."""
    e = len(res.members)
    lines = [f"ensemble of {e} checkpoint(s) on {res.dataset}, combine = {res.combine} "
             f"({'mean of logits, QT-DoG Eq. 6' if res.combine == 'logits' else 'mean of softmax probabilities'}); "
             f"target domain(s): {', '.join(res.domains[t] for t in res.test_envs)}"]
    rows = [["member", "checkpoint", "label", "step", "quantized", "weight bits", "size vs float"]]
    for i, m in enumerate(res.members):
        bits = "/".join(map(str, m.size.bits)) if m.size.bits else "32"
        rows.append([f"m{i + 1}", m.path, m.label, str(m.step), "yes" if m.quantized else "no", bits,
                     f"{m.size.size_bits / m.size.float_bits:.3f}x"])
    lines += ["", text_table(rows[0], rows[1:]), ""]
    header = ["split", "domain", "role", "n", *(f"m{i + 1}" for i in range(e)), "mean", "ensemble"]
    rows = [header]
    for key in res.splits:
        env = int(key[3:].split("_")[0])
        role = "target" if env in res.test_envs else ("train" if key.endswith("_in") else "source-val")
        accs = res.member_acc[key]
        rows.append([key, res.domains[env], role, str(res.n_samples[key]), *(f"{100 * a:.1f}" for a in accs),
                     f"{100 * sum(accs) / e:.1f}", f"{100 * res.ensemble_acc[key]:.1f}"])
    lines += [text_table(rows[0], rows[1:]), ""]
    for which, what in (("target", "target accuracy (in splits)"), ("source-val", "source-val accuracy")):
        m, ens = res.summary(which)
        lines.append(f"{what:<28} members {' '.join(f'{100 * a:.1f}' for a in m)} (mean {100 * sum(m) / e:.1f})"
                     f" -> ensemble {100 * ens:.1f}")
    quant = sum(mm.size.n_quantized for mm in res.members) / max(1, sum(mm.size.n_params for mm in res.members))
    lines.append(f"size: {e} model(s) = {res.relative_size:.3f}x one float model "
                 f"({100 * quant:.1f}% of the parameters stored quantized)")
    return "\n".join(lines) + "\n"
