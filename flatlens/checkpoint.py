"""Self-describing checkpoints: atomic writes, safe reads, and rebuilding a run from one file.

A checkpoint is a ``torch.save`` dict of tensors and plain Python values only, so it is read with
``torch.load(..., weights_only=True)``: a checkpoint is data, never code. Keys:

=====================  ==========================================================================
``format``             ``"flatlens-checkpoint"`` (anything else is a foreign file)
``format_version``     integer schema version (:data:`FORMAT_VERSION`)
``flatlens_version``   version that wrote it
``kind``               ``init`` (step 0) | ``last`` (resumable) | ``selected`` (model.pt) | ``step``
``step``               completed updates
``config``             the resolved config as a nested dict
``model``              model ``state_dict`` (quantizer step sizes and ``enabled`` flags included)
``quantized``          whether quantization was on at this step
``metrics``            the results record of this step (``{}`` for init)
``data``               ``{"dataset": fingerprint, "splits": fingerprint}`` to verify a rebuild
``selection``          selection method, step and score (model.pt)
``train_state``        ``last`` only: algorithm (optimizer, scheduler), RNG states, records, selection
=====================  ==========================================================================

Writes go to a temporary file in the same directory, are fsynced, and renamed over the target, so a
reader (or a run killed mid-write) never sees a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlens import __version__
from flatlens.atomic import atomic_write_bytes
from flatlens.config import Config, config_from_dict
from flatlens.data.base import MultiDomainDataset
from flatlens.data.splits import Splits
from flatlens.errors import CheckpointError, ConfigError, DataError

FORMAT = "flatlens-checkpoint"
FORMAT_VERSION = 1


def to_plain(obj: Any) -> Any:
    """``obj`` with only the types ``torch.load(weights_only=True)`` accepts: tensors, dict/list/tuple,
    and plain str/int/float/bool/None (str subclasses such as ``torch.__version__`` and numpy scalars
    are converted; anything else is a programming error, caught here rather than at load time)."""
    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (str, int, float, bool):
        return obj
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj) if type(obj) in (list, tuple) else [to_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy scalar
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (weights_only=True would refuse it)")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically, adding the format header."""
    full = to_plain({"format": FORMAT, "format_version": FORMAT_VERSION, "flatlens_version": __version__, **payload})
    atomic_write_bytes(Path(path), lambda f: torch.save(full, f))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a flatlens checkpoint safely (``weights_only=True``) and check its header."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"a checkpoint path is a str or Path, not {type(path).__name__}; pass e.g. "
                              "'runs/erm/model.pt'")
    p = Path(path)
    if p.is_dir():  # a run's folder: name the checkpoints it holds
        held = sorted(c.name for c in p.glob("*.pt"))
        hint = (f"give one of its checkpoints, e.g. {p / ('model.pt' if 'model.pt' in held else held[0])}"
                f" ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''})" if held else
                "it holds no .pt file; give the path of a .pt file written by `flatlens train`")
        raise CheckpointError(f"{p} is a folder, not a checkpoint: {hint}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p} (give the path of a .pt file written by `flatlens train`)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"cannot read checkpoint {p}: not a torch checkpoint (not a torch.save zip archive); "
                              "give a .pt file written by `flatlens train`")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"refusing to load {p}: it holds Python objects other than tensors and plain values, "
                              "and checkpoints are loaded as data only (weights_only=True); it was not written by "
                              "flatlens") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {p}: truncated or corrupted ({first.split('. ')[0][:100]}); "
                              "use another checkpoint of the run (last.pt, model.pt)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a flatlens checkpoint (no '{FORMAT}' header); the commands read the .pt "
                              "files that `flatlens train` writes; for a model trained elsewhere, load it yourself "
                              "and measure it from Python: fl.Objective(model, batches=loader)")
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{p} has checkpoint format {ckpt['format_version']}, newer than this flatlens "
                              f"({__version__}, format {FORMAT_VERSION}); upgrade flatlens")
    return ckpt


def config_of(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    try:
        return config_from_dict(ckpt["config"], source=f"{path} config")
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{path} holds no usable config ({exc}); was it written by a newer flatlens?") from None


@dataclass
class Run:
    """Everything a checkpoint rebuilds: model, config, data, splits, and what was stored with them."""

    path: Path
    config: Config
    model: nn.Module
    dataset: MultiDomainDataset | None
    splits: Splits | None
    step: int
    kind: str
    quantized: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    flatlens_version: str = ""
    checkpoint: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def split_data(self, split: str) -> list[tuple[int, torch.Tensor]]:
        """(domain index, sample indices) pairs of a named evaluation split.

        ``train`` = in splits of the training domains; ``source-val`` = their out splits;
        ``target`` = in + out of the test domains; or any record key such as ``env2_out``.
        """
        if self.dataset is None or self.splits is None:
            raise DataError("this Run was loaded with data=False; reload it with data=True")
        s = self.splits
        if split == "train":
            return [(i, s.domains[i].in_idx) for i in s.train_envs]
        if split in ("source-val", "source_val"):
            return [(i, s.domains[i].out_idx) for i in s.train_envs]
        if split == "target":
            return [(i, torch.cat([s.domains[i].in_idx, s.domains[i].out_idx]).sort().values) for i in s.test_envs]
        try:
            return [s.indices(split)]
        except DataError:
            raise DataError(f"unknown split {split!r}; use train, source-val, target or one of "
                            f"{', '.join(s.names())}") from None


def data_mismatch(stored: dict[str, Any], dataset: MultiDomainDataset, splits: Splits) -> tuple[str, str, str] | None:
    """``(key, rebuilt, stored)`` of the first of ``dataset``/``splits`` whose fingerprint differs from
    the one a checkpoint stored (``ckpt["data"]``), or None; a missing stored fingerprint is not checked."""
    for key, now in (("dataset", dataset.fingerprint()), ("splits", splits.fingerprint())):
        if stored.get(key) and stored[key] != now:
            return key, now, stored[key]
    return None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", data: bool = True,
                    data_root: str | Path | None = None) -> Run:
    """Rebuild model (quantizers included), config, dataset and the same splits from one checkpoint.

    The model is returned in eval mode on ``device``. With ``data=True`` the dataset is rebuilt from
    the stored config and checked against the fingerprints stored in the checkpoint, so the splits
    are provably the ones the run trained and validated on. ``data_root`` replaces the stored
    ``data.root`` (a folder dataset read on another machine, or moved since training); the
    fingerprints still prove the files are the same, and the returned config records the new root.
    """
    import dataclasses

    from flatlens.data import build_dataset, make_splits
    from flatlens.network import build_network

    ckpt = read_checkpoint(path)  # checks that path is a path
    p = Path(path)
    cfg = config_of(ckpt, p)
    if data_root is not None:
        if not isinstance(data_root, (str, os.PathLike)) or not str(data_root).strip():
            raise DataError(f"data_root={data_root!r} is not a folder; pass the directory that holds the dataset "
                            "(--data-root DIR)")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
    dataset = splits = None
    if data:
        try:
            dataset = build_dataset(cfg.data)
        except DataError as exc:
            if data_root is not None or not cfg.data.root:
                raise
            raise DataError(f"{exc} (the root stored in {p.name}; if the data moved since training, pass "
                            "--data-root DIR, or data_root= in Python)") from None
        splits = make_splits(dataset, cfg.data.test_envs, cfg.data.holdout_fraction, cfg.train.trial_seed)
        mismatch = data_mismatch(ckpt.get("data", {}), dataset, splits)
        if mismatch and mismatch[0] == "dataset":
            raise DataError(f"the data rebuilt for {p} differ from the data it was trained on "
                            f"(dataset fingerprint {mismatch[1]} != {mismatch[2]}); "
                            "point data.root (--data-root) at the same files")
        if mismatch:
            raise DataError(f"the splits rebuilt for {p} differ from the stored ones; was it written by another flatlens version?")
        shape, n_classes = dataset.input_shape, dataset.num_classes
    else:
        shape, n_classes = tuple(ckpt["input_shape"]), int(ckpt["num_classes"])
    model = build_network(cfg, shape, n_classes)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{p}: stored weights do not fit the model its config builds ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    return Run(path=p, config=cfg, model=model, dataset=dataset, splits=splits, step=int(ckpt.get("step", 0)),
               kind=str(ckpt.get("kind", "")), quantized=bool(ckpt.get("quantized", False)),
               metrics=dict(ckpt.get("metrics", {})), sha256=file_sha256(p),
               flatlens_version=str(ckpt.get("flatlens_version", "")), checkpoint=ckpt)
