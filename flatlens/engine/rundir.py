"""The run directory: what `flatlens train` writes and how a run is started, resumed or refused.

Layout::

    <out>/config.toml     resolved config (reload with --config to repeat the run)
    <out>/env.json        versions, git commit, device, world size, command line
    <out>/results.jsonl   one record per evaluation (rewritten atomically, never torn)
    <out>/train.log       progress lines
    <out>/init.pt         weights at step 0 (distance-from-init measures, PAC-Bayes bounds)
    <out>/last.pt         latest full training state (resume from here)
    <out>/model.pt        the selected checkpoint (train.selection)
    <out>/checkpoints/step_NNNNNN.pt   per-evaluation weights (train.keep_checkpoints)
    <out>/done            written last, when training finished

Every file is written atomically (temp file + rename), so a run killed at any moment leaves a
directory that ``--resume`` continues, never a corrupt one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from flatlens import __version__
from flatlens.atomic import atomic_write_text
from flatlens.checkpoint import config_of, read_checkpoint
from flatlens.config import Config, config_to_toml, diff_configs, load_config
from flatlens.errors import ResumeError, RunDirError

RESUME_SAFE_KEYS = {"data.num_workers", "train.device", "data.eval_batch_size", "data.root"}
"""Keys that may differ on --resume: they change where and how fast, not what is computed (a moved
``data.root`` is checked against the data fingerprints stored in ``last.pt``)."""

OWNED = ("config.toml", "env.json", "results.jsonl", "train.log", "init.pt", "last.pt", "model.pt", "done",
         "checkpoints")


class RunDir:
    """Paths and file operations of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    def started(self) -> bool:
        return (self.root / "config.toml").exists()

    def finished(self) -> bool:
        return (self.root / "done").exists()

    def decide(self, cfg: Config, resume: bool, overwrite: bool) -> str:
        """``fresh`` | ``resume`` | ``done``; raises RunDirError/ResumeError when the request conflicts."""
        if overwrite and self.root.exists():
            for name in OWNED:
                p = self.root / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        has_files = self.root.exists() and any(self.root.iterdir())
        if not resume:
            if self.finished():
                raise RunDirError(f"{self.root} already holds a finished run; choose another --out, or pass "
                                  "--overwrite to replace it")
            if has_files and self.started():
                raise RunDirError(f"{self.root} holds an unfinished run; pass --resume to continue it or "
                                  "--overwrite to start over")
            if has_files and not self.started():
                raise RunDirError(f"{self.root} exists and is not a flatlens run directory; choose an empty or new --out")
            return "fresh"
        if not self.started():
            if has_files:
                raise RunDirError(f"{self.root} is not a flatlens run directory (no config.toml); nothing to resume")
            return "fresh"
        stored = load_config(self.root / "config.toml")
        differ = [k for k in diff_configs(stored.to_dict(), cfg.to_dict()) if k not in RESUME_SAFE_KEYS]
        if differ:
            shown = ", ".join(f"{k} ({stored.get(k)!r} -> {cfg.get(k)!r})" for k in differ[:4])
            raise ResumeError(f"--resume with a different config than the run in {self.root}: {shown}; "
                              "resume with the stored config (--set may change only "
                              f"{', '.join(sorted(RESUME_SAFE_KEYS))}) or start a new --out")
        if self.finished():
            return "done"
        return "resume" if self.last.exists() else "fresh"

    def start(self, cfg: Config, env: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "env.json", json.dumps(env, indent=2, sort_keys=True) + "\n")
        atomic_write_text(self.root / "config.toml", config_to_toml(cfg))

    def update_config(self, cfg: Config) -> None:
        """Rewrite ``config.toml`` on a resume that changed a resume-safe key (nothing else may differ)."""
        if config_to_toml(cfg) != (self.root / "config.toml").read_text():
            atomic_write_text(self.root / "config.toml", config_to_toml(cfg))

    def write_records(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_text(self.root / "results.jsonl", text)

    def mark_done(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.root / "done", json.dumps(summary, sort_keys=True) + "\n")

    def resume_state(self, map_location: torch.device) -> dict[str, Any]:
        ckpt = read_checkpoint(self.last, map_location=map_location)
        if "train_state" not in ckpt:
            raise ResumeError(f"{self.last} holds no training state; it cannot be resumed")
        config_of(ckpt, self.last)
        return ckpt

    def started_environment(self) -> dict[str, Any]:
        """The ``env.json`` written when the run started (``{}`` if it is missing or unreadable)."""
        try:
            env = json.loads((self.root / "env.json").read_text())
        except (OSError, ValueError):
            return {}
        return env if isinstance(env, dict) else {}


BITWISE_KEYS = ("torch_threads", "torch", "device", "world_size")
"""Environment facts a resume must share with the run's start for bitwise-equal results."""


def resume_differences(started: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key (start -> now)`` for every :data:`BITWISE_KEYS` fact that differs (missing keys are skipped).

    CPU kernels sum in an order that depends on the thread count (and on the torch build and device),
    and training amplifies those last-bit differences: one seed trained a ResNet-18 whose top Hessian
    eigenvalue was 194 on one thread and 316 on two. A resume that differs here still trains
    correctly, but not bitwise like an uninterrupted run.
    """
    return [f"{k} ({started[k]!r} -> {now[k]!r})" for k in BITWISE_KEYS
            if k in started and k in now and started[k] != now[k]]


def git_commit() -> str:
    """The git commit of the flatlens source tree (with ``-dirty``), or '' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """Versions and machine facts recorded with every run."""
    import numpy

    info: dict[str, Any] = {
        "flatlens": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
        "numpy": str(numpy.__version__), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device), "world_size": world_size,
        "git_commit": git_commit(), "command": " ".join(sys.argv),
    }
    try:
        import torchvision

        info["torchvision"] = str(torchvision.__version__)
    except Exception:  # noqa: BLE001 - torchvision is optional for digits runs
        info["torchvision"] = None
    if device.type == "cuda":
        info["cuda"] = str(torch.version.cuda)
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
