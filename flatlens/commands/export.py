"""``flatlens export CKPT OUT.npz``: integer export of a quantized checkpoint, checked on real data.

Writes the integer codes and step sizes of every quantized weight and every other tensor in float
(:func:`flatlens.quant.export_integer`; ``.npz``, no pickles), then reads the file back, loads the
dequantized weights ``codes * step_size`` into a float copy of the model and compares its forward pass
with the fake-quantized model's on a real batch of the checkpoint's own data (``--split``), printing
the max absolute difference of the logits. It is exactly 0 on CPU (same float ops); any difference
above ``--tol`` makes the command fail.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flatlens.commands import path_arg

HELP = "export a quantized checkpoint as integer codes + step sizes (.npz)"
"""One line for ``flatlens --help`` (read without building this command's parser)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=HELP,
                       description="Export integer weights and step sizes of a QAT checkpoint to an .npz file and "
                                   "check that the dequantized export reproduces the fake-quant forward pass.")
    p.add_argument("checkpoint", help="a checkpoint written by flatlens train with quant.enabled (e.g. model.pt)")
    p.add_argument("out", type=path_arg, help="output file (.npz)")
    p.add_argument("--split", default="target",
                   help="data for the check: target | source-val | train | env{i}_in | env{i}_out (default target)")
    p.add_argument("--batch-size", type=int, default=256, help="samples in the check batch (default 256)")
    p.add_argument("--tol", type=float, default=0.0, help="largest accepted max |logit difference| (default 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--data-root", type=path_arg, default=None, metavar="DIR",
                   help="folder datasets: where the dataset lives now, if not at the data.root stored in the checkpoint "
                        "(checked against the stored fingerprints)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from flatlens.atomic import atomic_write_bytes
    from flatlens.checkpoint import load_checkpoint
    from flatlens.distributed import resolve_device
    from flatlens.errors import ConfigError, FlatlensError
    from flatlens.quant import (export_integer, iter_quantizers, load_integer_export, quantized_module_names,
                                verify_export)

    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError(f"output {out} must end in .npz")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    run_ = load_checkpoint(args.checkpoint, device=resolve_device(args.device), data=True, data_root=args.data_root)
    model = run_.model
    names = quantized_module_names(model)
    if not names:
        mode = run_.config.quant.mode if run_.config.quant.enabled else "off"
        raise FlatlensError(f"{args.checkpoint} has no quantized layers (quant.enabled = "
                            f"{str(run_.config.quant.enabled).lower()}, mode {mode}); export needs a checkpoint of a "
                            "run with quant.enabled and mode qat, quantize_and_freeze or matched_noise")
    if not run_.quantized:
        print(f"note: {args.checkpoint} was taken with quantization off (step {run_.step}, q_step/mode "
              f"{run_.config.quant.q_step}/{run_.config.quant.mode}); the export holds the weights quantized with "
              "the stored step sizes, which this checkpoint's own forward pass did not use")
    export = export_integer(model)
    export["meta/source_sha256"] = np.asarray(run_.sha256)
    export["meta/step"] = np.asarray(run_.step)
    export["meta/config"] = np.asarray(json.dumps(run_.config.to_dict(), sort_keys=True))
    atomic_write_bytes(out, lambda f: np.savez(f, **export))

    # the check uses the file as written
    loaded = load_integer_export(out)
    parts = run_.split_data(args.split)
    assert run_.dataset is not None
    xs = []
    left = args.batch_size
    for env, idx in parts:
        if left <= 0:
            break
        x, _ = run_.dataset.domains[env].load(idx[:left].cpu())
        xs.append(x)
        left -= x.shape[0]
    inputs = torch.cat(xs).to(run_.device)
    diff = verify_export(model, loaded, inputs)

    n_codes = sum(v.size for k, v in loaded.items() if k.endswith("/codes"))
    bits = sorted({int(q.bits) for _, q in iter_quantizers(model, "weight")})
    code_bits = sum(int(loaded[k].size) * int(loaded[k[: -len("codes")] + "bits"]) for k in loaded if k.endswith("/codes"))
    float_n = sum(int(v.size) for k, v in loaded.items() if k.startswith("float/") and v.dtype.kind == "f")
    total_float = 32 * (n_codes + float_n)
    print(f"wrote {out}: {len(names)} quantized layer(s), {n_codes} weights as {'/'.join(map(str, bits))}-bit codes, "
          f"{float_n} other values in float; packed size {(code_bits + 32 * float_n) / total_float:.3f}x float")
    print(f"check on {inputs.shape[0]} samples of split {args.split!r}: max |fake-quant logits - dequantized-export "
          f"logits| = {diff:.3g}" + (" (bitwise equal)" if diff == 0.0 else ""))
    if not diff <= args.tol:
        print(f"flatlens export: error: the dequantized export does not reproduce the fake-quant forward "
              f"(max diff {diff:.3g} > --tol {args.tol:g})", file=sys.stderr)
        return 1
    return 0
