"""``flatlens info CKPT``: what a checkpoint holds, read safely, without rebuilding the data."""

from __future__ import annotations

import argparse
import json


HELP = "describe a checkpoint (kind, step, config, metrics)"
"""One line for ``flatlens --help`` (read without building this command's parser)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help=HELP)
    p.add_argument("checkpoint", help="a .pt file written by flatlens train (model.pt, last.pt, init.pt, ...)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
