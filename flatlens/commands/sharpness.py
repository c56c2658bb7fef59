"""``flatlens sharpness CKPT``: measure the loss surface around a checkpoint into an HDF5 file.

Common options choose the Objective (split, samples, parameter space and selection, seed, device);
each registered measure adds its own options. For each measure the predicted cost is printed first,
progress is shown while it runs, its results are written to the analysis file as soon as it finishes
(one group per measure; other groups are untouched), and a summary table closes the run.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from flatlens.commands import HelpFormatter, accept_negative_ranges, path_arg, seed_arg


DEFAULT_MEASURES = ("hessian", "trace", "density")
"""What ``--measures`` runs when not given. Named here, not taken from the registry's first entries, whose
order is the order the measure modules happened to be imported in (a process that had imported the
landscape module first defaulted to ``landscape,hessian,trace``)."""

HELP = "Hessian spectrum/trace, sharpness, landscapes of a checkpoint -> HDF5"
"""One line for ``flatlens --help`` (read without building this command's parser)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flatlens.measure.registry import builtin_measures

    measures = builtin_measures()
    p = sub.add_parser("sharpness", help=HELP,
                       description="Measure the loss surface around a checkpoint. Measures: " + ", ".join(measures),
                       formatter_class=HelpFormatter)
    accept_negative_ranges(p)  # --landscape-range -1:1:51, as landscape's --range
    p.add_argument("checkpoint", help="a checkpoint written by flatlens train (e.g. runs/erm/model.pt)")
    p.add_argument("--measures", default=",".join(DEFAULT_MEASURES),
                   help="comma-separated measures to run: " + ", ".join(measures))
    add_objective_arguments(p)
    p.add_argument("--out", type=path_arg, help="analysis file (default: analysis.h5 beside model.pt; <stem>_analysis.h5 beside any other checkpoint)")
    p.add_argument("--progress-every", type=float, default=15.0,
                   help="seconds between progress lines when stderr is not a terminal (0: every step)")
    p.add_argument("--recompute", action="store_true",
                   help="measure again what --out already holds with the same settings (by default a rerun skips it; "
                        "a landscape resumes its missing points, and with this starts afresh, as --landscape-overwrite)")
    p.add_argument("--journal", default="auto", choices=("auto", "on", "off"),
                   help="keep every HVP of a measure in progress on disk beside --out (one parameter-sized vector "
                        "each; the gauss-newton trace: its partial sum), removed when the measure is stored, so that "
                        "rerunning a killed command resumes the measure where it stopped with the same result; auto: "
                        "for measures predicted to take a minute or more, when the journal fits in half the free "
                        "disk and costs at most 10%% of an HVP")
    p.add_argument("--replace", action="store_true",
                   help="replace a /hessian group of --out measured on another setup (other --split, --samples, --seed, "
                        "--space or selection) even where that drops measures this run does not repeat (refused "
                        "by default, before anything runs)")
    options: dict[str, list[str]] = {}
    for m in measures.values():
        group = _OptionRecorder(p.add_argument_group(f"{m.name}: {m.help}"))
        m.add_arguments(group)
        options[m.name] = group.dests
    p.set_defaults(func=run, measure_options=options)


class _OptionRecorder:
    """An argument group that remembers the ``dest`` of every option added to it: which options are a
    measure's own, for the settings fingerprint of :func:`fingerprint`."""

    def __init__(self, group: argparse._ArgumentGroup) -> None:
        self._group = group
        self.dests: list[str] = []

    def add_argument(self, *args, **kwargs):
        action = self._group.add_argument(*args, **kwargs)
        self.dests.append(action.dest)
        return action

    def __getattr__(self, name: str):
        return getattr(self._group, name)


def fingerprint(step, args: argparse.Namespace) -> str:
    """JSON of what decides a step's numbers besides the Objective: flatlens' version, the step (which measures
    share its work) and the values of its measures' own options. Stored with the results; a rerun whose
    fingerprint and Objective match skips the step."""
    import json

    from flatlens import __version__

    dests = getattr(args, "measure_options", {})  # absent from a Namespace not built by this parser
    own = {d: getattr(args, d, None) for m in step.members for d in dests.get(m, [])}
    shared = "+".join(sorted(step.members))  # the measures sharing its work; --measures' order changes nothing
    return json.dumps({"flatlens_version": __version__, "step": shared, "options": own}, sort_keys=True,
                      default=str)


def add_objective_arguments(p: argparse.ArgumentParser) -> None:
    from flatlens.measure.objective import SPLITS_HELP

    g = p.add_argument_group("what is measured")
    g.add_argument("--split", default="source-val", help=SPLITS_HELP)
    g.add_argument("--samples", type=int, default=None, help="seeded random subset of this many samples (default: all)")
    g.add_argument("--space", default="latent", choices=("latent", "dequant", "scales"),
                   help="quantized models: latent weights through the quantizers (straight-through), a float "
                        "copy of the quantized weights, or the step sizes")
    g.add_argument("--include", default="weights",
                   help="parameter groups: comma-separated of weights, biases, norm, scales, other, all")
    g.add_argument("--params", default=None, help="regular expression on parameter names (overrides --include)")
    g.add_argument("--exclude", default=None, help="regular expression of parameter names to leave out")
    g.add_argument("--seed", type=seed_arg, default=0, help="base seed of the sample subset and of every random draw")
    g.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    g.add_argument("--kernel", default="auto", choices=("auto", "graph_reuse", "double_backward", "forward_over_reverse"),
                   help="HVP kernel (auto: time each on one batch and keep the fastest)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default=None, choices=("float32", "float64"),
                   help="measure a copy of the model and the samples in this dtype (default: the checkpoint's, "
                        "float32, whose HVPs round at ~1e-5 relative: float64 certifies eigenvalues far below that "
                        "and takes about twice the time and memory)")
    g.add_argument("--data-root", type=path_arg, default=None, metavar="DIR",
                   help="folder datasets: where the dataset lives now, if not at the data.root stored in the checkpoint "
                        "(checked against the stored fingerprints)")


def build_objective(args: argparse.Namespace):
    """Load the checkpoint and build the Objective the common options describe."""
    import flatlens as fl
    from flatlens import distributed as D
    from flatlens.measure.objective import Objective

    ctx = D.current()
    device = D.resolve_device(args.device, ctx.local_rank)
    run = fl.load_checkpoint(args.checkpoint, device=device, data_root=args.data_root)
    return Objective(run, split=args.split, samples=args.samples, space=args.space, include=args.include,
                     select=args.params, exclude=args.exclude, seed=args.seed, batch_size=args.batch_size,
                     kernel=args.kernel, device=device, dtype=getattr(args, "dtype", None))


def run(args: argparse.Namespace) -> int:
    from flatlens import distributed as D
    from flatlens import store
    from flatlens.errors import FlatlensError
    from flatlens.measure import journal as J
    from flatlens.measure.registry import RunContext, builtin_measures, plan
    from flatlens.progress import Progress
    from torch import nn

    measures = builtin_measures()
    names = [m.strip() for m in args.measures.split(",") if m.strip()]
    unknown = [m for m in names if m not in measures]
    if unknown or not names:
        raise FlatlensError(f"--measures {','.join(unknown) or '(empty)'} unknown; choose from {', '.join(measures)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # each would run (and be paid for) again, the second overwriting the first
        raise FlatlensError(f"--measures names {', '.join(twice)} more than once; give each measure once")
    for n in names:  # bad option values fail here, before the checkpoint is loaded
        if measures[n].check_args is not None:
            measures[n].check_args(args, names)
    ctx = D.setup(args.device)
    finished = False
    try:
        obj = build_objective(args)
        out = Path(args.out) if args.out else store.default_path(args.checkpoint)
        if ctx.is_main:
            store.ensure_file(out, store.checkpoint_provenance(obj.run))
        say = print if ctx.is_main else (lambda *a, **k: None)
        say(f"{obj.run.path}: {obj.space.numel:,} parameters in space '{obj.space.space}' "
            f"({len(obj.space.names)} tensors), {obj.n_samples} samples of split '{obj.split}', on {obj.device}"
            + (f", in {args.dtype}" if getattr(args, "dtype", None) else "")
            + (f" x{ctx.world_size}" if ctx.distributed else "")
            + (f" (--samples {args.samples} asked; the split holds {obj.n_samples}, all are used)"
               if args.samples is not None and args.samples > obj.n_samples else ""))
        t0 = time.perf_counter()
        loss, acc, se = obj.loss_and_accuracy()
        t_forward = time.perf_counter() - t0
        if t_forward < 2.0:  # the first pass pays one-off warm-up (0.35 s of a 0.007 s pass seen); time a second
            t0 = time.perf_counter()
            obj.loss_and_accuracy()
            t_forward = time.perf_counter() - t0
        say(f"loss {loss:.6f} ± {se:.6f}, accuracy {acc:.4f}; one pass over the samples takes {t_forward:.3f} s")
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in obj.model.modules())
        say(f"differentiated: {obj.differentiated}"
            + ("; BatchNorm in eval mode (running statistics)" if has_bn else "; no BatchNorm layers"))
        if not getattr(args, "replace", False):  # before any work: a refusal after an hour's run helps no one
            why = D.broadcast_object(ctx, _conflicts(measures, names, obj, args, out) if ctx.is_main else None)
            if why:
                raise FlatlensError(f"{why}; this run would replace that group and drop them: pass --replace to do "
                                    "so, or --out another file")
        rows: list[tuple[str, str, str]] = []
        kernel_said = False
        for step in plan(names, args):
            name = step.label
            fp = fingerprint(step, args)
            stored = None
            if step.completed is not None and not getattr(args, "recompute", False):  # rank 0 reads the file, every rank skips
                stored = D.broadcast_object(ctx, step.completed(obj, args, out, fp) if ctx.is_main else None)
            if stored is not None:
                say(f"[{name}] already in {out} with these settings and data; skipped (--recompute measures it again)")
                rows += [tuple(r) for r in stored]
                continue
            est = step.estimate(obj, args)
            jdir, resumable = None, None
            if est.n_hvp or est.state_bytes:  # a killed run's journal: its kernel, before the kernels are timed
                ident = obj.journal_identity({"fingerprint": fp})  # the one obj.journal opens under
                jdir = J.journal_dir(out, "+".join(sorted(step.members)), ident)  # --measures' order changes nothing
                resumable = D.broadcast_object(ctx, J.recorded(jdir, ident) if ctx.is_main else None)
            pinned = bool(resumable and resumable.kernel and args.journal != "off" and obj.prefer_kernel(resumable.kernel))
            hvp_s = _hvp_seconds(obj, t_forward) if est.n_hvp else 0.0
            if est.n_hvp and (not kernel_said or pinned):
                say(_kernel_line(obj) + (" (the killed run's, from its journal)" if pinned else ""))
                kernel_said = True
            if est.gradient_start and obj.hvp_engine.kernel != "graph_reuse":  # the kernel is known now
                est = replace(est, n_grad=est.n_grad + 1)
            eta = est.n_hvp * hvp_s + (est.n_forward + 2 * est.n_grad) * t_forward + (est.seconds or 0.0)
            if est.n_vector or est.n_draw:  # timed only for a step with vector work (not a landscape)
                t_pass, t_draw = _vector_seconds(obj)
                eta += est.n_vector * t_pass + est.n_draw * t_draw
            if resumable and args.journal != "off":  # the replayed part costs ~nothing
                if resumable.columns and est.n_hvp:
                    eta *= max(0.0, 1.0 - resumable.columns / est.n_hvp)
                elif resumable.state_done and est.state_bytes:  # a partial sum over this rank's samples
                    eta *= max(0.0, 1.0 - resumable.state_done / max(obj.n_local, 1))
            journaled, why = (False, "")
            if est.n_hvp or est.state_bytes:
                size = J.predicted_bytes(est.n_hvp, obj.space.numel, obj.space.params[0].element_size()) + est.state_bytes
                journaled, why = J.decide(
                    args.journal, resumable=resumable, eta_seconds=eta, size=size,
                    free=J.free_bytes(jdir) if ctx.is_main else None, hvp_seconds=hvp_s if est.n_hvp else None,
                    write_time=lambda: J.write_seconds(out.parent, obj.space.numel, obj.space.params[0].dtype)
                    if ctx.is_main else 0.0)
            say(f"[{name}] predicted cost: {'at most ' if est.at_most else ''}{est.n_hvp} HVPs, {est.n_forward} "
                "forward passes" + (f", {est.n_grad} gradient{'s' if est.n_grad > 1 else ''}" if est.n_grad else "")
                + f" {'<=' if est.at_most else '≈'} {_fmt_seconds(eta)}"
                + (f" ({est.note})" if est.note else "") + (f"; {why}" if why else ""))
            journaled = bool(D.broadcast_object(ctx, journaled))  # rank 0 saw the disk
            before = dict(obj.costs())
            started = time.perf_counter()

            def progress(total: int, desc: str = name) -> Progress:
                return Progress(total, 0, desc=desc, enabled=ctx.is_main, every_seconds=args.progress_every)

            # the journal is removed when the block ends without an error: after the result is written
            with obj.journal(jdir, {"fingerprint": fp}) if journaled else nullcontext():
                with obj.space.guard():
                    result = step.run(obj, args, RunContext(out=out, is_main=ctx.is_main, progress=progress, log=say,
                                                            fingerprint=fp))
                costs = {k: obj.costs()[k] - before[k] for k in before}
                costs["seconds"] = time.perf_counter() - started
                if ctx.is_main and not result.written:
                    attrs = {"measure": name, **obj.describe(), **result.attrs,
                             **{f"cost_{k}": v for k, v in costs.items()}}
                    store.write_group(out, result.group, result.datasets, attrs)
            if journaled and ctx.is_main:
                _remove_if_empty(jdir.parent)
            replayed = f", {costs['n_hvp_replayed']} more replayed from the journal" if costs["n_hvp_replayed"] else ""
            say(f"[{name}] done in {_fmt_seconds(costs['seconds'])} ({costs['n_hvp']} HVPs{replayed}) -> "
                f"{out}:/{result.group}")
            rows += [tuple(r) if len(r) == 3 else (name, *r) for r in result.summary]
        if ctx.is_main:
            _print_summary(rows)
        obj.release()
        finished = True
    finally:
        D.teardown(ctx, finished)
    return 0


def _remove_if_empty(folder: Path) -> None:
    """Remove the ``<out>.journal`` folder once the last step's journal in it is gone."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _conflicts(measures: dict, names: list[str], obj, args: argparse.Namespace, out: Path) -> str:
    """The distinct reasons the requested measures give why this run would drop stored results, joined."""
    reasons = [measures[n].conflicts(obj, args, out, names) for n in names if measures[n].conflicts is not None]
    return "; ".join(dict.fromkeys(r for r in reasons if r))


def _kernel_line(obj) -> str:
    """Which HVP kernel runs, and why (the timings of ``auto``, and any kernel it left out)."""
    eng = obj.hvp_engine
    sel = getattr(eng, "selection", None)
    if sel is None or not sel.seconds:
        return f"HVP kernel: {eng.kernel} (--kernel)"
    timed = ", ".join(f"{k} {sel.ratio[k]:.2f}x" for k in sorted(sel.seconds, key=sel.seconds.get))
    left = "; ".join(f"{k} left out: {why}" for k, why in sel.errors.items())
    return f"HVP kernel: {eng.kernel} (auto; per probe, in gradients of one batch: {timed})" + (f"; {left}" if left else "")


def _hvp_seconds(obj, t_forward: float) -> float:
    """Seconds per HVP: measured by the kernel selection when it ran, else ~2.5 forward+backward passes."""
    eng = obj.hvp_engine
    sel = getattr(eng, "selection", None)
    if sel is not None and sel.seconds:
        per_batch = sel.seconds[eng.kernel]
        return per_batch * len(obj.batches)
    return 3.0 * 2.5 * t_forward


def _vector_seconds(obj) -> tuple[float, float]:
    """Seconds of one pass over a parameter-sized vector (a dot or an axpy against a block of the basis) and of
    one Rademacher draw of that size (drawn on CPU, then moved), timed once per Objective on the space's size,
    dtype and device, and kept on the Objective."""
    cached = getattr(obj, "_vector_seconds", None)
    if cached is not None:
        return cached
    import torch

    from flatlens.measure import linalg as L
    from flatlens.measure.hvp import sync_device

    n = obj.space.numel
    dtype = obj.space.params[0].dtype
    try:
        Q = torch.randn(8, n, dtype=dtype, device=obj.device)
        w = torch.randn(n, dtype=dtype, device=obj.device)
    except RuntimeError:  # no room for a timing block: leave the vector work out of the estimate
        obj._vector_seconds = (0.0, 0.0)
        return obj._vector_seconds

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(2):  # the first pays the pages' first touch
            t0 = time.perf_counter()
            fn()
            sync_device(obj.device)
            best = min(best, time.perf_counter() - t0)
        return best

    per_pass = timed(lambda: L._orthogonalize_(w, Q, 1)) / 16  # 8 dots and 8 axpys
    per_draw = timed(lambda: L.rademacher(n, 1, torch.Generator(), dtype, obj.device))
    obj._vector_seconds = (per_pass, per_draw)
    return obj._vector_seconds


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _print_summary(rows: list[tuple[str, str, str]]) -> None:
    if not rows:
        return
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    print("\nsummary")
    for m, label, value in rows:
        print(f"  {m:<{w1}}  {label:<{w2}}  {value}")
