"""``flatlens info FILE``: what a checkpoint or an analysis file holds, read safely, without rebuilding
the data or the model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flatlens.commands import path_arg

HELP = "describe a checkpoint (kind, step, config, metrics) or an analysis file (its measures)"
"""One line for ``flatlens --help`` (read without building this command's parser)."""

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help=HELP)
    p.add_argument("checkpoint", type=path_arg, metavar="FILE",
                   help="a .pt file written by flatlens train (model.pt, last.pt, init.pt, ...) or an analysis "
                        ".h5 file written by flatlens sharpness / landscape")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    if path.suffix in (".h5", ".hdf5") and not path.exists():
        from flatlens.errors import StoreError

        raise StoreError(f"analysis file not found: {path} (give a .h5 file written by flatlens sharpness or "
                         "landscape, or a .pt checkpoint)")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(8) == HDF5_SIGNATURE:
                return _analysis(path, args.json)
    return _checkpoint(args)


def _checkpoint(args: argparse.Namespace) -> int:
    from flatlens.checkpoint import config_of, file_sha256, read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    cfg = config_of(ckpt, args.checkpoint)
    metrics = ckpt.get("metrics", {})
    info = {
        "path": str(args.checkpoint), "sha256": file_sha256(args.checkpoint), "kind": ckpt.get("kind"),
        "step": ckpt.get("step"), "label": ckpt.get("label"), "quantized": ckpt.get("quantized"),
        "flatlens_version": ckpt.get("flatlens_version"), "format_version": ckpt.get("format_version"),
        "dataset": cfg.data.dataset, "domains": ckpt.get("domain_names"), "test_envs": cfg.data.test_envs,
        "arch": cfg.model.arch, "selection": ckpt.get("selection"), "resumable": "train_state" in ckpt,
        "n_parameters": int(sum(v.numel() for k, v in ckpt["model"].items() if v.is_floating_point())),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))},
        "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    for key in ("path", "sha256", "kind", "step", "label", "quantized", "resumable", "dataset", "domains",
                "test_envs", "arch", "n_parameters", "selection", "flatlens_version"):
        print(f"{key:<17} {info[key]}")
    accs = {k: v for k, v in info["metrics"].items() if k.endswith("_acc")}
    if accs:
        print("metrics          " + "  ".join(f"{k}={v:.3f}" for k, v in sorted(accs.items())))
    return 0


def _analysis(path: Path, as_json: bool) -> int:
    """The root provenance and one line (or a few) per measured group, reading attributes and only the
    small datasets a summary shows (a landscape's directions, as large as the model, stay on disk;
    ``flatlens.store.read`` gives everything)."""
    import numpy as np

    from flatlens import store

    store.check_file(path)
    measured = store.groups(path)
    from flatlens.measure.journal import Recorded, pending
    from flatlens.measure.memory import _bytes

    with store.open_h5(path, "r") as f:
        root = {k: store._decode(v) for k, v in f.attrs.items() if k != "config"}
        groups = {name: _group_summary(f[name]) for name in measured}
    journals = pending(path)
    if as_json:
        print(json.dumps({"path": str(path), "attrs": root, "groups": groups, "journals": journals}, indent=2,
                         sort_keys=True, default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v)))
        return 0
    print(f"{'path':<17} {path}")
    print(f"{'format':<17} {root.get('format')} schema {root.get('schema_version')}, written by flatlens "
          f"{root.get('flatlens_version')}, created {root.get('created')}")
    if root.get("checkpoint") or root.get("checkpoint_sha256"):
        print(f"{'checkpoint':<17} {root.get('checkpoint') or '(unnamed)'} (step {root.get('checkpoint_step', '?')}, "
              f"sha256 {str(root.get('checkpoint_sha256', ''))[:12]}...)")
    else:
        print(f"{'checkpoint':<17} none: measured from Python on a model of your own (fl.Objective(model, batches=...))")
    if not groups:
        print(f"{'groups':<17} none yet")
    for name, summary in groups.items():
        print(f"/{name}")
        for key, value in summary.items():
            lines = str(value).split("\n")
            print(f"  {key:<15} {lines[0]}")
            for line in lines[1:]:
                print(f"  {'':<15} {line}")
    for step, j in journals.items():  # a measure killed part-way (flatlens sharpness --journal)
        held = Recorded(j["hvp_calls"], None, tuple(j["states"])).describe()
        print(f"{'unfinished':<17} {step.rpartition('-')[0] or step}: {held} ({_bytes(j['bytes'])}) in the journal of "
              f"a killed run, {path.name}.journal/{step}; rerun the same flatlens sharpness command to resume it, or "
              "delete it")
    return 0


def _fmt(values: Any, n: int = 6) -> str:
    import numpy as np

    a = np.atleast_1d(np.asarray(values, dtype=float))
    text = ", ".join(f"{v:.6g}" for v in a[:n])
    return f"[{text}{', ...' if a.size > n else ''}]" if a.size > 1 else text


def _rows(stored: str) -> list[tuple[str, str, str]]:
    """The summary rows a measure stored (JSON ``[[measure, label, value], ...]``); none when unreadable."""
    try:
        rows = json.loads(stored)
    except ValueError:
        return []
    return [tuple(str(v) for v in r) for r in rows if isinstance(r, list) and len(r) == 3]


def _group_summary(g: Any) -> dict[str, str]:
    """What a reader wants first from a measured group (an open h5py group): what, on which data, the
    headline numbers, cost."""
    import numpy as np

    from flatlens import store

    a = {k: store._decode(v) for k, v in g.attrs.items()}
    measures = a.get("measures", a.get("measure", "?"))
    out = {"measure": ", ".join(measures) if isinstance(measures, list) else str(measures)}
    if "split" in a:
        out["data"] = (f"split {a['split']}, {a.get('n_samples')} samples, space {a.get('space')}, "
                       f"{a.get('n_params', '?')} parameters")
    if "differentiated" in a:
        out["differentiated"] = str(a["differentiated"])
    if "eigenvalues" in g:
        out["eigenvalues"] = _fmt(g["eigenvalues"][()])
    if "bottom_eigenvalues" in g:
        out["bottom"] = _fmt(g["bottom_eigenvalues"][()])
    if "trace" in g:
        ci = g["trace_ci"][()] if "trace_ci" in g else None
        out["trace"] = _fmt(g["trace"][()]) + (f" (95% CI {_fmt(ci[0])} .. {_fmt(ci[1])})" if ci is not None else "")
    if "density" in g and "density_spectrum_min" in a:
        out["density"] = f"spectrum [{_fmt(a['density_spectrum_min'])}, {_fmt(a['density_spectrum_max'])}]"
    if "done" in g:
        done = np.asarray(g["done"][()])
        shape = "x".join(str(s) for s in done.shape[::-1])
        out["grid"] = (f"{a.get('kind', '?')} {a.get('dims', done.ndim)}-D, {shape} points, {int(done.sum())}/"
                       f"{done.size} done")
        if "origin_loss" in a:
            out["origin loss"] = _fmt(a["origin_loss"])
        if done.any() and "loss" in g:
            loss = g["loss"][()]
            out["loss range"] = f"{_fmt(np.nanmin(loss))} .. {_fmt(np.nanmax(loss))}"
    first = ("eigenvalue_summary", "trace_summary", "density_summary")  # in the order sharpness prints them
    keys = sorted((k for k in a if k.endswith("_summary") and isinstance(a[k], str)),
                  key=lambda k: (first.index(k) if k in first else len(first), k))
    rows = [row for key in keys for row in _rows(a[key])]
    if rows:  # what flatlens sharpness printed for each measure (stored with it)
        w1, w2 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        out["summary"] = "\n".join(f"{m:<{w1}}  {label:<{w2}}  {value}" for m, label, value in rows)
    if "n_hvp" in a or "seconds" in a or "cost_seconds" in a:
        hvps = f"{a['n_hvp']} HVPs, " if "n_hvp" in a else ""
        out["cost"] = f"{hvps}{float(a.get('seconds', a.get('cost_seconds', 0.0))):.1f} s"
    return out
