"""The one training loop every algorithm and quantization mode runs through.

Per step: reseed the global RNG from ``(seed, step, rank)`` (dropout and anything else that draws
from it), run the hooks (quantization switching on at ``q_step`` and its ablations), draw the step's
minibatches (a pure function of the step, see :mod:`flatlens.data.stream`), ``algorithm.update``.
Every ``eval_every`` steps and at the end: evaluate every domain's in/out split, append a record,
update the selected checkpoint, write the resumable ``last.pt``, rewrite ``results.jsonl``.

Because every source of randomness is a function of the step and every piece of state (model,
optimizer, schedule, hook state, records, selection) is in ``last.pt``, a run killed at any moment
and resumed with ``--resume`` ends bitwise identical to an uninterrupted one on CPU with
``train.deterministic``.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlens import __version__
from flatlens.checkpoint import data_mismatch, save_checkpoint
from flatlens.config import Config
from flatlens.data import build_dataset, make_splits
from flatlens.data.stream import TrainBatches
from flatlens import distributed as D
from flatlens.engine.algorithms import Algorithm, build_algorithm
from flatlens.engine.evaluate import evaluate
from flatlens.engine.hooks import TrainHook, build_hooks
from flatlens.engine.rundir import RunDir, environment, resume_differences
from flatlens.engine.selection import is_candidate, score, test_accuracy
from flatlens.errors import DataError, FlatlensError
from flatlens.network import build_network
from flatlens.progress import Progress
from flatlens.seeding import seed_hash

TIMING_KEYS = ("step_time", "eval_time", "mem_gb")
"""Record fields that measure wall-clock or memory and so differ between otherwise identical runs."""


@dataclass
class TrainResult:
    """What a finished (or already finished) run produced."""

    out: Path
    records: list[dict[str, Any]]
    selected_step: int | None
    status: str  # "finished" | "already-finished"
    summary: dict[str, Any] = field(default_factory=dict)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels (bitwise-reproducible CPU runs); warn-only on CUDA where some ops lack them."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")


def run_label(cfg: Config) -> str:
    """The row name of a run in `flatlens collect` tables."""
    if cfg.train.name:
        return cfg.train.name
    label = cfg.train.algorithm
    q = cfg.quant
    if q.enabled:
        label += f"+{'qat' if q.mode == 'qat' else q.mode}{q.bits if q.mode != 'uniform_noise' else ''}"
    return label


def hparams_id(cfg: Config) -> str:
    """Hash of everything but seeds, target domains, device and labels: runs that share it are trials
    of the same hyper-parameters."""
    import hashlib
    import json

    d = cfg.to_dict()
    for section, key in (("data", "test_envs"), ("train", "seed"), ("train", "trial_seed"), ("train", "device"),
                         ("data", "num_workers"), ("data", "eval_batch_size"), ("train", "name")):
        d[section].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    key, version, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class Trainer:
    """One training run; construct, then :meth:`run`."""

    def __init__(self, cfg: Config, out: str | Path, ctx: D.DistContext, resume: bool = False,
                 overwrite: bool = False, verbose: bool = True) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.rundir = RunDir(out)
        self.verbose = verbose and ctx.is_main
        decision: Any = None
        if ctx.is_main:
            try:
                decision = self.rundir.decide(cfg, resume, overwrite)
            except FlatlensError as exc:
                decision = exc
        decision = D.broadcast_object(ctx, decision)
        if isinstance(decision, FlatlensError):
            raise decision
        self.decision: str = decision

    # -- building -----------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        configure_determinism(cfg.train.deterministic, ctx.device)
        self.dataset = build_dataset(cfg.data)
        self.splits = make_splits(self.dataset, cfg.data.test_envs, cfg.data.holdout_fraction, cfg.train.trial_seed)
        if all(hasattr(d, "to") for d in self.dataset.domains):  # in-memory domains live on the device
            self.dataset.domains = [d.to(ctx.device) for d in self.dataset.domains]  # type: ignore[attr-defined]
        torch.manual_seed(seed_hash(cfg.train.seed, "init"))
        self.model: nn.Module = build_network(cfg, self.dataset.input_shape, self.dataset.num_classes).to(ctx.device)
        self.model.train()  # applies model.freeze_bn (BN layers stay in eval mode)
        self.hooks: list[TrainHook] = build_hooks(cfg, self.model)
        self.algorithm: Algorithm = build_algorithm(self.model, cfg, ctx)
        for hook in self.hooks:
            hook.attach(self.algorithm)
        self.stream = TrainBatches(self.dataset, self.splits, cfg.train.batch_size, cfg.train.seed, ctx.rank,
                                   ctx.world_size, cfg.data.augment, cfg.data.num_workers, ctx.device)
        self.step = 0
        self.records: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"step": None, "score": None}

    def _payload(self, kind: str, record: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "kind": kind, "step": self.step, "config": self.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "quantized": self._quantized(), "metrics": record or {},
            "data": {"dataset": self.dataset.fingerprint(), "splits": self.splits.fingerprint()},
            "input_shape": list(self.dataset.input_shape), "num_classes": self.dataset.num_classes,
            "domain_names": self.dataset.domain_names,
            "selection": {"method": self.cfg.train.selection, **self.best},
            "label": run_label(self.cfg),
        }

    def _quantized(self) -> bool:
        return any(h.quantized() for h in self.hooks)

    def _resume(self) -> None:
        ckpt = self.rundir.resume_state(self.ctx.device)
        mismatch = data_mismatch(ckpt.get("data", {}), self.dataset, self.splits)
        if mismatch:
            key, now, stored = mismatch
            raise DataError(f"the {key} rebuilt for {self.rundir.root} differ from the ones this run trained on "
                            f"(fingerprint {now} != {stored}); point data.root at the same files")
        ts = ckpt["train_state"]
        self.model.load_state_dict(ckpt["model"])
        self.algorithm.load_state_dict(ts["algorithm"])
        for hook, state in zip(self.hooks, ts.get("hooks", [])):
            hook.load_state_dict(state)
        self.step = int(ckpt["step"])
        self.records = list(ts["records"])
        self.best = dict(ts["best"])
        _set_rng_state(ts["rng"], self.ctx.device)
        if self.ctx.is_main:
            self.rundir.write_records(self.records)  # drop anything written after this checkpoint
            differ = resume_differences(self.rundir.started_environment(),
                                        environment(self.ctx.device, self.ctx.world_size))
            if differ:
                warnings.warn(f"resuming {self.rundir.root} with {', '.join(differ)}: the run continues correctly but "
                              "not bitwise like an uninterrupted one; resume with the start's settings (e.g. "
                              "OMP_NUM_THREADS / torch.set_num_threads) for that", RuntimeWarning, stacklevel=2)

    # -- running ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        if self.decision == "done":
            from flatlens.engine.collect import read_records

            records = read_records(self.rundir / "results.jsonl")
            self._say(f"{self.rundir.root} already finished; nothing to do")
            return TrainResult(self.rundir.root, records, None, "already-finished")
        self._build()
        if self.decision == "resume":
            self._resume()
            if ctx.is_main:  # a --set of a resume-safe key (e.g. a moved data.root) holds for later resumes too
                self.rundir.update_config(cfg)
            self._say(f"resuming {self.rundir.root} at step {self.step}/{cfg.train.steps}")
        elif ctx.is_main:
            self.rundir.start(cfg, environment(ctx.device, ctx.world_size))
            save_checkpoint(self.rundir / "init.pt", self._payload("init", None))
        D.barrier(ctx)
        total = cfg.train.steps
        progress = Progress(total, self.step, desc="train", enabled=self.verbose,
                            log_file=self.rundir / "train.log" if ctx.is_main else None)
        if self.step == 0:
            self._say(f"training {run_label(cfg)} on {self.dataset.name} (target domains "
                      f"{[self.dataset.domain_names[t] for t in self.splits.test_envs]}) for {total} steps on "
                      f"{ctx.device} x{ctx.world_size} -> {self.rundir.root}")
        sums: dict[str, torch.Tensor] = {}
        n_since, t_since, t_start = 0, 0.0, time.perf_counter()
        eta_reported = self.step >= total
        batches = self.stream.iterate(self.step, total)
        for step in range(self.step, total):
            t0 = time.perf_counter()
            torch.manual_seed(seed_hash(cfg.train.seed, "step", step, ctx.rank))
            for hook in self.hooks:
                hook.before_step(step)
            out = self.algorithm.update(next(batches), step)
            for hook in self.hooks:
                hook.after_step(step)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))
            n_since += 1
            self.step = step + 1
            t_since += time.perf_counter() - t0
            progress.update(1)
            if not eta_reported and n_since == min(5, total - step):
                eta_reported = True
                per = (time.perf_counter() - t_start) / n_since
                self._say(f"~{per:.3f} s/step: about {per * (total - self.step) / 60:.1f} min left (plus evaluation)")
            if self.step % cfg.train.eval_every == 0 or self.step == total:
                self._checkpoint(sums, n_since, t_since, progress)
                sums, n_since, t_since = {}, 0, 0.0
        progress.close()
        summary = {"steps": total, "selected_step": self.best["step"], "selected_score": self.best["score"],
                   "selection": cfg.train.selection}
        if ctx.is_main:
            self.rundir.mark_done(summary)
            sel = f"model.pt = step {self.best['step']}" if self.best["step"] is not None else "no eligible checkpoint"
            self._say(f"done: run in {self.rundir.root} ({sel}, {cfg.train.selection}); last.pt = step {total}")
        D.barrier(ctx)
        return TrainResult(self.rundir.root, self.records, self.best["step"], "finished", summary)

    def _checkpoint(self, sums: dict[str, Any], n: int, seconds: float, progress: Progress) -> None:
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        metrics = evaluate(self.model, self.dataset, self.splits, ctx, cfg.data.eval_batch_size, cfg.data.num_workers)
        means = torch.tensor([float(v) / n for v in sums.values()], dtype=torch.float64, device=ctx.device)
        D.all_reduce_sum(ctx, means)
        train_stats = {k: float(v) / ctx.world_size for k, v in zip(sums, means.tolist())}
        min_in = min(len(self.splits.domains[i].in_idx) for i in self.splits.train_envs)
        record: dict[str, Any] = {
            "step": self.step, "epoch": self.step * cfg.train.batch_size / min_in, "lr": self.algorithm.lr,
            **train_stats, **metrics, "quantized": self._quantized(),
            "step_time": seconds / max(n, 1), "eval_time": time.perf_counter() - t0,
            "run": {"dataset": cfg.data.dataset, "algorithm": cfg.train.algorithm, "label": run_label(cfg),
                    "test_envs": list(cfg.data.test_envs), "trial_seed": cfg.train.trial_seed,
                    "seed": cfg.train.seed, "hparams_id": hparams_id(cfg), "domains": self.dataset.domain_names},
        }
        for hook in self.hooks:
            record.update(hook.record_fields())
        if ctx.device.type == "cuda":
            record["mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        if not self.records:
            record.update(config=cfg.to_dict(), versions=environment(ctx.device, ctx.world_size),
                          data_fingerprint={"dataset": self.dataset.fingerprint(), "splits": self.splits.fingerprint()},
                          flatlens_version=__version__)
        self.records.append(record)
        eligible = is_candidate(record, cfg.quant.enabled and cfg.quant.select_quantized_only)
        improved = False
        if eligible:
            method = cfg.train.selection
            s = score(record, method, self.splits.train_envs, self.splits.test_envs) if method != "last" else float(self.step)
            if self.best["score"] is None or s > self.best["score"]:
                self.best = {"step": self.step, "score": s}
                improved = True
        if ctx.is_main:
            # model.pt first, then last.pt, then results.jsonl: a kill between them is repaired by
            # --resume, which rewrites results.jsonl from last.pt and recomputes the same model.pt.
            if improved:
                save_checkpoint(self.rundir / "model.pt", self._payload("selected", record))
            payload = self._payload("last", record)
            payload["train_state"] = {
                "algorithm": self.algorithm.state_dict(), "rng": _rng_state(ctx.device), "records": self.records,
                "best": self.best, "hooks": [h.state_dict() for h in self.hooks], "world_size": ctx.world_size,
            }
            save_checkpoint(self.rundir.last, payload)
            if cfg.train.keep_checkpoints:
                save_checkpoint(self.rundir / "checkpoints" / f"step_{self.step:06d}.pt", self._payload("step", record))
            self.rundir.write_records(self.records)
        D.barrier(ctx)
        src = sum(record[f"env{i}_out_acc"] for i in self.splits.train_envs) / len(self.splits.train_envs)
        tgt = test_accuracy(record, self.splits.test_envs)
        loss = f"loss {record['loss']:.4f} | " if "loss" in record else ""
        progress.log(f"step {self.step:>6}/{cfg.train.steps} | {loss}source-val acc {src:.3f} | target acc {tgt:.3f}"
                     f" | {record['step_time']:.3f} s/step" + (" | quantized" if record["quantized"] else "")
                     + (" *" if improved else ""))

    def _say(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)


def train(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False,
          verbose: bool = True) -> TrainResult:
    """Train one run into ``out`` (see :class:`Trainer`); works under torchrun and as one process."""
    ctx = D.setup(cfg.train.device)
    finished = False
    try:
        result = Trainer(cfg, out, ctx, resume=resume, overwrite=overwrite, verbose=verbose).run()
        finished = True
        return result
    finally:
        D.teardown(ctx, finished)
