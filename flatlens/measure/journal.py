"""A journal of the Hessian-vector products of a measure in progress, so that a killed measure resumes.

Every Hessian measure is a deterministic function of its seed and of the products ``H v`` it asks for:
Lanczos, Hutch++, the Krylov trace and SLQ draw their probes from seeded generators and compute every
next input from the products before it. A journal records, for each product (a call of
:meth:`Objective.hvp` or :meth:`Objective.hvp_block`), the sha256 of its input and the output, one file
per call, written atomically. On a rerun the ``k``-th call takes its output from the journal when its
input is bitwise the recorded one; the first call whose input differs (another seed, another thread
count that rounds a Lanczos step differently) and every call after it are computed again, and the
journal is rewritten from there. A replayed product is exactly what the killed run computed for that
input, so a resumed measure returns what the uninterrupted run would have (bitwise, with the same HVP
kernel and thread count), and never a product of another input.

Which Hessian a journal belongs to is pinned by an identity (the checkpoint's and the sample subset's
sha256, the parameter set and space, the measure's settings): a journal of another identity is
discarded when opened. Under torch.distributed rank 0 reads and writes the files and broadcasts what it
replays (the other ranks need no access to them).

A measure that is not a sequence of HVPs keeps a state instead (:meth:`HvpJournal.save_state`: the exact
Gauss-Newton trace saves its partial sum every 30 s and goes on from the last saved sample).

The journal holds one parameter-sized output per HVP: ``n_hvp x n_params x 4`` bytes in float32 (an
11 M-parameter ResNet-18: 45 MB per HVP). ``flatlens sharpness`` keeps one per step beside ``--out`` and
removes it when the step's results are written (``--journal``); from Python, :meth:`Objective.journal`.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import Tensor

from flatlens import distributed as D
from flatlens.atomic import atomic_write_bytes, atomic_write_text
from flatlens.errors import FlatlensError
from flatlens.measure.params import update_sha256

__all__ = ["HvpJournal", "Recorded", "input_sha256", "recorded", "pending", "IDENTITY_LEFT_OUT"]

META = "journal.json"
IDENTITY_LEFT_OUT = ("device", "world_size", "hvp_kernel", "checkpoint")
"""Objective provenance that does not change the Hessian a journal holds products of (the device, the
world size and the kernel only round differently; the checkpoint path may move; its sha256 stays)."""


def input_sha256(t: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (what decides its product bitwise)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    update_sha256(h, t)
    return h.hexdigest()


class Recorded(NamedTuple):
    """What a killed run left in a journal: HVP entries, the kernel they were computed with, saved states."""

    entries: int
    kernel: str | None
    states: tuple[str, ...]
    columns: int = 0
    """HVPs the entries hold (a call on a block of ``b`` probes holds ``b``), read from the files' headers."""
    state_done: int = 0
    """Samples the saved partial sum covers (rank 0's own under torchrun), for the time left."""

    def __bool__(self) -> bool:  # something to resume
        return bool(self.entries or self.states)

    def describe(self) -> str:
        calls = f"{self.entries} HVP calls" + (f" ({self.columns} HVPs)" if self.columns > self.entries else "")
        done = f" ({self.state_done} samples)" if self.state_done else ""
        parts = ([calls] if self.entries else []) + [f"the partial {s.replace('_', '-')} sum{done}" for s in self.states]
        return " and ".join(parts) or "nothing"


def _normalized(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` as its JSON reads back (how it is stored in, and compared with, a journal's meta)."""
    return json.loads(json.dumps(dict(identity), sort_keys=True, default=str))


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def recorded(directory: str | Path, identity: Mapping[str, Any]) -> Recorded | None:
    """What the journal in ``directory`` holds when it was recorded under ``identity``, else None.
    Reads only; :class:`HvpJournal` is what opens (and clears) one."""
    directory = Path(directory)
    meta = _read_meta(directory)
    if meta is None or meta.get("identity") != _normalized(identity):
        return None
    return _contents(directory, meta)


def _contents(directory: Path, meta: Mapping[str, Any]) -> Recorded:
    """The entries a replay can reach (consecutive from 0), their HVPs, and the saved states of a journal."""
    k = columns = 0
    while _entry(directory, k).exists():
        try:  # memory-mapped: the header gives the shape without reading the output
            out = torch.load(_entry(directory, k), map_location="cpu", weights_only=True, mmap=True)["output"]
            columns += int(out.shape[1]) if out.ndim == 2 else 1
        except Exception:  # noqa: BLE001 - an unreadable entry is where the replay will stop
            break
        k += 1
    return Recorded(k, meta.get("kernel"), _states(directory), columns, _state_done(directory))


def _state_done(directory: Path) -> int:
    """``done`` of the first saved state (single process, or rank 0's), memory-mapped; 0 when none."""
    for path in sorted(directory.glob("state_*.pt")):
        if "@" in path.stem and not path.stem.split("@")[1].startswith("0of"):
            continue
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("done", 0))
        except Exception:  # noqa: BLE001 - unreadable: the measure starts that part afresh
            return 0
    return 0


def _states(directory: Path) -> tuple[str, ...]:
    """Names of the states saved in a journal (one name for the per-rank files of a state)."""
    return tuple(sorted({p.stem[len("state_"):].split("@")[0] for p in directory.glob("state_*.pt")}))


def _entry(directory: Path, k: int) -> Path:
    return directory / f"hvp_{k:06d}.pt"


class HvpJournal:
    """The recorded products of one measure (``directory``), replayed in order while their inputs match.

    ``identity``: JSON-able description of the Hessian and the measure; a journal recorded under another
    is discarded. ``kernel``: the HVP kernel of this run, recorded so a resumed run can use the same one
    (:attr:`recorded_kernel` is the killed run's). Counters: :attr:`found` (entries present when opened),
    :attr:`replayed`, :attr:`recorded`.
    """

    def __init__(self, directory: str | Path, identity: Mapping[str, Any], *, ctx: D.DistContext | None = None) -> None:
        self.directory = Path(directory)
        self.ctx = ctx if ctx is not None else D.current()
        self.identity = _normalized(identity)
        self.found = 0
        self.replayed = 0
        self.recorded = 0
        self.recorded_kernel: str | None = None
        self.kernel: str | None = None  # this run's, set at its first product
        self._next = 0
        self._replaying = True
        self._writing = self.ctx.is_main
        self._rank_writing = True  # per-rank states (save_state(per_rank=True)), on every rank
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._error: OSError | None = None
        state = None
        if self.ctx.is_main:
            try:
                state = self._open()
            except OSError as exc:  # rank 0 says so; the others get the same refusal below
                state = f"cannot use {self.directory} as an HVP journal ({exc.strerror or exc}); pass a writable folder"
            except _NotAJournal as exc:
                state = str(exc)
        state = D.broadcast_object(self.ctx, state)
        if isinstance(state, str):
            raise FlatlensError(state)
        self.found, self.recorded_kernel = state or (0, None)

    # -- opening ---------------------------------------------------------------------------------
    def _open(self) -> tuple[int, str | None]:
        found = recorded(self.directory, self.identity)
        if found is None:
            self._clear()
            return 0, None
        for stale in self.directory.glob("hvp_*.pt"):  # entries after a gap cannot be reached
            if int(stale.stem.split("_")[1]) >= found.entries:
                stale.unlink(missing_ok=True)
        return found.entries, found.kernel

    def _clear(self) -> None:
        """Start an empty journal: delete a journal of another identity, never a folder that is not a journal."""
        if self.directory.is_dir() and not (self.directory / META).is_file() and any(self.directory.iterdir()):
            raise _NotAJournal(f"{self.directory} exists and is not an HVP journal (no {META}); pass a new folder")
        _delete_journal_files(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / META, json.dumps({"identity": self.identity}, sort_keys=True))

    def set_kernel(self, kernel: str) -> None:
        """Record the HVP kernel the products are computed with (rank 0; once, at the first product)."""
        self.kernel = kernel
        if self._writing:
            meta = {"identity": self.identity, "kernel": kernel}
            try:
                atomic_write_text(self.directory / META, json.dumps(meta, sort_keys=True))
            except OSError as exc:
                self._stop_writing(exc)

    # -- use ---------------------------------------------------------------------------------------
    def apply(self, V: Tensor, compute: Callable[[Tensor], Tensor]) -> tuple[Tensor, bool]:
        """``compute(V)``, or the recorded output of this call when its input matches; and whether replayed."""
        k = self._next
        self._next += 1
        out = None
        if self._replaying and k < self.found:
            out = self._lookup(k, V) if self.ctx.is_main else None
            hit = bool(D.broadcast_object(self.ctx, out is not None))
            if hit:
                if self.ctx.distributed:
                    out = D.broadcast_object(self.ctx, out)
                self.replayed += 1
                return out.to(device=V.device), True
            self._replaying = False
            if self.ctx.is_main:  # the run diverged here: what follows was recorded for other inputs
                for j in range(k, self.found):
                    _entry(self.directory, j).unlink(missing_ok=True)
        else:
            self._replaying = False
        out = compute(V)
        if self._writing:
            self._record(k, V, out)
        return out, False

    def _lookup(self, k: int, V: Tensor) -> Tensor | None:
        try:
            rec = torch.load(_entry(self.directory, k), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a missing or unreadable entry is a miss, never an error
            return None
        if not isinstance(rec, dict) or rec.get("input_sha256") != input_sha256(V):
            return None
        out = rec.get("output")
        if not isinstance(out, Tensor) or out.shape != V.shape:
            return None
        return out

    def _record(self, k: int, V: Tensor, out: Tensor) -> None:
        """Queue the entry for the writer thread (copies: the caller may reuse both tensors in place)."""
        self._check_writer()
        if not self._writing:
            return
        if self._writer is None:  # hashing and writing overlap the next HVP (an entry of 45 MB took 0.3 s in line)
            self._queue = queue.Queue(maxsize=2)
            self._writer = threading.Thread(target=self._write_loop, name="hvp-journal", daemon=True)
            self._writer.start()
        # one copy to host memory whatever the device (``.cpu().clone()`` copied a GPU tensor twice)
        self._queue.put((k, V.detach().to("cpu", copy=True), out.detach().to("cpu", copy=True)))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    k, V, out = item
                    rec = {"input_sha256": input_sha256(V), "output": out}
                    try:  # no fsync: a lookup validates every entry, and a kill cannot leave a partial one
                        atomic_write_bytes(_entry(self.directory, k), lambda f: torch.save(rec, f), fsync=False)
                        self.recorded += 1
                    except OSError as exc:  # a full disk stops the journal, not the measure
                        self._error = exc
            finally:
                self._queue.task_done()

    def _check_writer(self) -> None:
        if self._error is not None and self._writing:
            self._stop_writing(self._error)

    def _stop_writing(self, exc: OSError) -> None:
        self._writing = False
        warnings.warn(f"the HVP journal in {self.directory} stopped recording ({exc.strerror or exc}); the measure "
                      "goes on, but a kill from here on loses the products since", RuntimeWarning, stacklevel=4)

    def flush(self) -> None:
        """Wait until every queued entry is on disk (called when the journal closes, also after an error)."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        self._check_writer()

    # -- the state of a measure that is not a sequence of HVPs (the Gauss-Newton diagonal's partial sum) ---------
    def _state_path(self, name: str, per_rank: bool) -> Path:
        suffix = f"@{self.ctx.rank}of{self.ctx.world_size}" if per_rank else ""
        return self.directory / f"state_{name}{suffix}.pt"

    def load_state(self, name: str, *, per_rank: bool = False) -> dict[str, Any] | None:
        """The state :meth:`save_state` last stored under ``name`` (None if none). ``per_rank``: this rank's own
        (each rank reads its file; with a folder every rank can reach, e.g. on a shared file system);
        otherwise rank 0's (None on the other ranks)."""
        if not (per_rank or self.ctx.is_main):
            return None
        try:
            state = torch.load(self._state_path(name, per_rank), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - missing or unreadable: start afresh
            return None
        return state if isinstance(state, dict) else None

    def save_state(self, name: str, state: dict[str, Any], *, per_rank: bool = False) -> None:
        """Store a measure's resumable state (atomic rename); a full disk stops the journal, not the measure.
        ``per_rank``: every rank stores its own (a rank that cannot reach the folder on a rerun, e.g. on
        another node's local disk, just starts its part afresh); otherwise rank 0 alone."""
        if not (self._writing if not per_rank else self._rank_writing):
            return
        try:
            atomic_write_bytes(self._state_path(name, per_rank), lambda f: torch.save(state, f), fsync=False)
        except OSError as exc:
            if per_rank:
                self._rank_writing = False
                warnings.warn(f"the journal in {self.directory} stopped saving rank {self.ctx.rank}'s state "
                              f"({exc.strerror or exc}); the measure goes on", RuntimeWarning, stacklevel=2)
            else:
                self._stop_writing(exc)

    def remove(self) -> None:
        """Delete the journal (its measure finished; rank 0): its files, then its folder when nothing else is in it."""
        self.flush()
        if self.ctx.is_main:
            _delete_journal_files(self.directory)
            try:
                self.directory.rmdir()
            except OSError:
                pass


class _NotAJournal(Exception):
    """A folder given for a journal holds other files: it is never cleared."""


_JOURNAL_FILES = ("hvp_*.pt", "state_*.pt", META, ".hvp_*.tmp", ".state_*.tmp", f".{META}.*.tmp")
"""What a journal writes (entries, states, its meta, and the temporary names of atomic writes a kill left)."""


def _delete_journal_files(directory: Path) -> None:
    for pattern in _JOURNAL_FILES:
        for f in directory.glob(pattern):
            f.unlink(missing_ok=True)


JOURNAL_MODES = ("auto", "on", "off")
AUTO_MIN_SECONDS = 60.0
"""``--journal auto`` keeps a journal for a step predicted to take at least this long (a shorter one is
cheaper to run again than to write to disk)."""


def journal_dir(out: str | Path, step: str, identity: Mapping[str, Any]) -> Path:
    """Where ``flatlens sharpness`` keeps the journal of ``step`` on the setup ``identity`` for the analysis file
    ``out``: ``<out>.journal/<step>-<12 hex digits of the identity>``. One folder per setup, so a run on
    another setup (e.g. a quick ``--samples 64`` check into the same file) never clears the journal a killed
    long run left."""
    out = Path(out)
    digest = hashlib.sha256(json.dumps(_normalized(identity), sort_keys=True).encode()).hexdigest()[:12]
    return out.with_name(out.name + ".journal") / f"{step}-{digest}"


def pending(out: str | Path) -> dict[str, dict[str, int]]:
    """The journals a killed ``flatlens sharpness`` left beside the analysis file ``out``: per step, the HVP
    calls recorded, the saved states (a partial Gauss-Newton sum) and their bytes on disk (for ``flatlens info``)."""
    folder = Path(out).with_name(Path(out).name + ".journal")
    found: dict[str, dict[str, int]] = {}
    for step in sorted(p for p in folder.glob("*") if (p / META).is_file()):
        held = _contents(step, _read_meta(step) or {})  # what a rerun would resume, as sharpness reads it
        files = list(step.glob("hvp_*.pt")) + list(step.glob("state_*.pt"))
        found[step.name] = {"hvp_calls": held.entries, "states": list(held.states),
                            "bytes": sum(f.stat().st_size for f in files)}
    return found


def predicted_bytes(n_hvp: int, n_params: int, itemsize: int) -> int:
    """Disk a journal of ``n_hvp`` products of ``n_params`` entries takes (the outputs; inputs are hashed)."""
    return n_hvp * n_params * itemsize


def free_bytes(path: Path) -> int | None:
    """Free disk space where ``path`` is (or would be created), or None when unknown."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


AUTO_MAX_OVERHEAD = 0.1
"""``--journal auto`` keeps a journal only when recording an entry costs at most this fraction of an HVP: the
writer thread overlaps the HVPs, but on a machine whose cores the HVPs already use it competes for them
(ResNet-18 on 16 samples, 0.65 s per HVP on 2 cores, ran 1.36x slower with a journal of 45 MB entries)."""


def write_seconds(directory: Path, n_params: int, dtype: torch.dtype) -> float:
    """Seconds to record one entry of ``n_params`` values of ``dtype`` where the journal would be: the copies,
    the input's hash and the write (timed once, with a throw-away file)."""
    probe = torch.zeros(n_params, dtype=dtype)
    t0 = time.perf_counter()
    path = directory / f".write-test-{n_params}.pt"
    try:
        rec = {"input_sha256": input_sha256(probe.clone()), "output": probe.clone()}
        atomic_write_bytes(path, lambda f: torch.save(rec, f), fsync=False)
    except OSError:
        return math.inf
    finally:
        path.unlink(missing_ok=True)
    return time.perf_counter() - t0


def decide(mode: str, *, resumable: Recorded | None, eta_seconds: float, size: int, free: int | None,
           hvp_seconds: float | None, write_time: Callable[[], float]) -> tuple[bool, str]:
    """Whether a step keeps a journal, and why (for the predicted-cost line).

    ``resumable``: what a journal recorded for this step and setup holds (None: none there). ``off`` never
    journals; a journal to resume is always used otherwise; ``on`` always journals; ``auto`` journals a step
    predicted to take at least :data:`AUTO_MIN_SECONDS` when its journal fits in half the free disk and recording
    one entry (``write_time()``, timed only then) costs at most :data:`AUTO_MAX_OVERHEAD` of an HVP
    (``hvp_seconds``; None for a step that spends no HVPs and saves a small state now and then instead).
    """
    from flatlens.measure.gauss_newton import SAVE_EVERY
    from flatlens.measure.memory import _bytes

    if mode == "off":
        return False, (f"--journal off leaves the journal of a killed run ({resumable.describe()}) unused" if resumable
                       else "")
    if resumable:
        return True, (f"resumes the journal of a killed run ({resumable.describe()} recorded; "
                      + ("replayed where their inputs match, so the time above is what is left)" if resumable.entries
                         else "goes on from there)"))
    on = (f"journal of its HVPs on disk, <= {_bytes(size)}" if hvp_seconds is not None else
          f"journal of its partial sum on disk ({_bytes(size)}, saved every {SAVE_EVERY:g} s)") + \
        ", removed when done (a killed run resumes)"
    if mode == "on":
        return True, on
    if eta_seconds < AUTO_MIN_SECONDS:
        return False, ""
    if free is not None and size > free // 2:
        return False, f"no journal: its <= {_bytes(size)} do not fit in half the free disk ({_bytes(free)}); --journal on"
    w = write_time() if hvp_seconds is not None else 0.0
    if hvp_seconds is not None and w > AUTO_MAX_OVERHEAD * hvp_seconds:
        return False, (f"no journal: recording a product ({w:.2f} s) would add over {AUTO_MAX_OVERHEAD:.0%} to computing "
                       f"it ({hvp_seconds:.2f} s); --journal on")
    return True, on
