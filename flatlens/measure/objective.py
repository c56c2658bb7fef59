"""Objective: the loss of a fixed model on fixed cached batches, as a function of a ParamSpace.

This is the one object every measure asks questions of (DESIGN.md): Hessian spectra and traces,
landscapes, sharpness and bounds all need ``loss``, ``loss_and_accuracy``, ``grad`` and ``hvp`` of
the *same* function: the mean cross-entropy over a fixed set of samples, with the model in eval mode
(BatchNorm uses its running statistics, dropout is off, quantizer state is frozen), as a function of
the parameters a :class:`~flatlens.measure.params.ParamSpace` names.

The evaluation samples (a split of a checkpoint's data, optionally a seeded subset of ``samples``) are
loaded once, without augmentation, and cached as tensors on the device. Under torch.distributed each
rank holds samples ``rank::world_size`` and every quantity is all-reduced, so results equal the
one-process ones up to float summation order.

Calls have no side effects: training flags, buffers, ``.grad``, ``requires_grad`` and the global RNG
state are the same before and after (``ParamSpace.guard`` verifies the state hash).
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlens import distributed as D
from flatlens.errors import FlatlensError
from flatlens.measure.hvp import HessianVectorProduct, NoKernelError, check_kernel, make_loss_fn
from flatlens.measure.linalg import _check_int
from flatlens.measure.memory import _bytes, available_bytes, require_memory
from flatlens.measure.params import (
    ParamSpace, include_groups, inert_step_sizes, left_out_of_groups, parameter_groups, select_parameters,
    update_sha256,
)
from flatlens.measure.twice import uncompiled
from flatlens.seeding import check_seed, generator

SPLITS_HELP = "train (source in splits), source-val (source out splits), target (all of the target domains), env{i}_in/out"


def require_objective(obj: Any, measure: str, also: str = "") -> None:
    """A one-line FlatlensError unless ``obj`` is an :class:`Objective`, naming how to build one from what was
    passed: a checkpoint's Run or a bare model (the natural first calls in a notebook) have no samples, split
    or parameter space yet. ``also``: what else the measure accepts (e.g. an operator), for the message."""
    if isinstance(obj, Objective):
        return
    from flatlens.checkpoint import Run

    if isinstance(obj, Run):
        fix = "wrap the run: fl.Objective(run) (choose split=, samples=, space= there), and pass that"
    elif isinstance(obj, nn.Module):
        fix = "wrap the model with its samples: fl.Objective(model, batches=[(x, y), ...]), and pass that"
    else:
        fix = "pass fl.Objective(fl.load_checkpoint(path))"
    raise FlatlensError(f"{measure} of a {type(obj).__name__}: it needs an Objective{also}; {fix}")


def _checked_batches(batches: Any) -> list[tuple[Tensor, Tensor]]:
    """Explicit batches: pairs of tensors with as many inputs as integer labels >= 0.

    ``[(x, y), ...]``, or any iterable of such pairs, read once: a notebook's ``DataLoader`` (whose
    batches are ``[x, y]`` lists) or a generator. The Objective caches what it reads, so an iterable
    that would fill the memory (a loader over a whole training set) is refused as it goes, naming a
    subset to pass instead.
    """
    if isinstance(batches, (Tensor, str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise FlatlensError(f"batches= got a {type(batches).__name__}; pass [(x, y), ...] (a list of pairs, also for one "
                            "batch) or an iterable of (x, y) pairs such as a DataLoader")
    budget = None if isinstance(batches, (list, tuple)) else available_bytes("cpu")
    out, held = [], 0
    for i, b in enumerate(batches):
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(t, Tensor) for t in b)):
            raise FlatlensError(f"batches[{i}] is not an (inputs, labels) pair of tensors; pass batches=[(x, y), ...] "
                                "(a list of pairs, also for one batch) or an iterable of such pairs")
        held += sum(t.numel() * t.element_size() for t in b)
        if budget is not None and held > 0.8 * budget:
            raise FlatlensError(f"the first {i + 1} batches of the iterable passed as batches= already take "
                                f"{_bytes(held)} of {_bytes(budget)} available, and the Objective caches them all; "
                                "pass a subset, e.g. itertools.islice(loader, 8)")
        x, y = b
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.ndim != 1:
            raise FlatlensError(f"batches[{i}] labels are {y.dtype} of shape {tuple(y.shape)}; pass a 1-D integer "
                                "tensor of class indices (e.g. y.long())")
        if x.shape[:1] != y.shape:
            raise FlatlensError(f"batches[{i}] holds {x.shape[0] if x.ndim else 0} inputs and {y.shape[0]} labels; "
                                "pass one label per input")
        if y.numel() and int(y.min()) < 0:
            raise FlatlensError(f"batches[{i}] holds label {int(y.min())}; labels must be class indices >= 0")
        out.append((x, y.long()))  # int32/uint8 class indices: cross_entropy takes int64 (or uint8) only
    return out


DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""What ``dtype=`` (``--dtype``) takes by name; a ``torch.dtype`` may be any floating type."""


def _check_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype=`` as a torch floating dtype (None: the model's own)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype={dtype!r}; pass {', '.join(DTYPES)} (or a floating torch.dtype), or leave it out for the "
                     "model's own")


def _finite(out: Tensor) -> Tensor:
    """An HVP that is not finite makes every measure meaningless: say so instead of letting Lanczos fail."""
    if not bool(torch.isfinite(out).all()):
        raise FlatlensError("a Hessian-vector product is not finite (nan/inf): the loss is not finite or "
                            "overflows at these parameters; check the inputs and the checkpoint's weights")
    return out


def _live_parameters(model: nn.Module, names: list[str], space: str) -> list[str]:
    """``names`` without the step sizes of disabled quantizers (see :func:`inert_step_sizes`); a selection
    of nothing but those, or of anything but step sizes in ``scales`` space (whose results say they are
    step sizes), is a one-line error that says why and what to select instead."""
    if space == "scales":
        steps = set(parameter_groups(model)["scales"])
        other = [n for n in names if n not in steps]
        if other:
            raise FlatlensError(f"space 'scales' moves quantizer step sizes only, and the selection holds {other[0]!r}"
                                + (f" and {len(other) - 1} more" if len(other) > 1 else "")
                                + "; use space 'latent' (with include 'all' for weights and step sizes together)")
    inert = inert_step_sizes(model)
    live = [n for n in names if n not in inert]
    if not live:
        why = ("space 'dequant' turns the weight quantizers off" if space == "dequant"
               else "the quantizers of this model are off (a checkpoint from before quantization started?)")
        raise FlatlensError(f"the selected parameters are all step sizes of disabled quantizers: {why}, so they do "
                            "not enter the loss; for step-size curvature use space 'scales' on a model whose "
                            "quantizers are on, or select other parameters")
    return live


def _check_per_sample(model: nn.Module) -> None:
    """Refuse a model whose eval-mode output for a sample depends on the rest of its batch.

    A batch norm without running statistics (``track_running_stats=False``) normalises with each batch's
    own statistics even in eval mode. The loss is then no sum over samples: its value, gradient and
    Hessian change with ``--batch-size``, the ragged last batch and the number of processes (and a batch
    of one sample fails inside torch), so none of the measures has the meaning they claim.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (not m.track_running_stats or m.running_mean is None):
            raise FlatlensError(
                f"module {name or '<model>'!r} ({type(m).__name__}) normalises with each batch's statistics even in "
                "eval mode (track_running_stats=False), so the loss is no sum over samples and its Hessian would "
                "change with the batch size; give it running statistics (track_running_stats=True, then a "
                "train-mode pass over training data) or use GroupNorm/LayerNorm")


def _has_quantizers(model: nn.Module) -> bool:
    from flatlens.quant import iter_quantizers

    return any(True for _ in iter_quantizers(model))


def _quantization_on(model: nn.Module) -> bool:
    from flatlens.quant import is_quantization_enabled

    return bool(is_quantization_enabled(model))


_MISSING_DERIVATIVE = re.compile(r"derivative for .* is not implemented")
_NO_SECOND_DERIVATIVE = ("the model uses an op PyTorch cannot differentiate twice ({}); replace that op in the "
                         "model, or leave the parameters it depends on out of the selection (--exclude / --params)")


class Objective:
    """Model + cached evaluation batches + cross-entropy + parameter space.

    Args:
        source: a :class:`flatlens.checkpoint.Run` (from ``flatlens.load_checkpoint``) or an
            ``nn.Module`` together with ``batches``.
        split: which samples (``train``, ``source-val``, ``target`` or ``env{i}_{in,out}``).
        samples: use a seeded random subset of this many samples (all when None).
        space: ``latent`` | ``dequant`` | ``scales`` (see :mod:`flatlens.measure.params`).
        include / select / exclude: the parameter selection (default: the layers' weight matrices, see
            :mod:`flatlens.measure.params`; ``scales`` space defaults to the quantizers' step sizes).
            Trainable tensors of group ``other`` that a group selection leaves out are listed in
            ``left_out``, with a warning.
        seed: seeds the sample subset (and is recorded; measures take their own seeds).
        batch_size: evaluation batch size (changes float summation order only).
        batches: explicit ``[(x, y), ...]`` when ``source`` is a module.
        kernel: HVP kernel (``auto`` measures and picks; see :mod:`flatlens.measure.hvp`).
        device: where the model and batches live (default: the model's device).
        shard: share the samples out over torch.distributed ranks (see ``__init__``).
        dtype: measure in this floating dtype (``torch.float64`` or ``"float64"``, ``"float32"``): a copy of
            the model and the cached inputs are cast to it (the given model is not touched). A float32
            model's HVPs round at ~1e-5 relative, so no eigenvalue is certified below that; in float64 the
            same weights are measured to ~1e-13 (default: the model's own dtype).
    """

    def __init__(self, source: Any, split: str = "source-val", samples: int | None = None, space: str = "latent",
                 include: Sequence[str] = ("weights",), select: str | None = None, exclude: str | None = None,
                 seed: int = 0, batch_size: int = 256, batches: Sequence[tuple[Tensor, Tensor]] | None = None,
                 kernel: str = "auto", device: str | torch.device | None = None, shard: bool = True,
                 dtype: torch.dtype | str | None = None) -> None:
        from flatlens.checkpoint import Run

        # shard=True: under torch.distributed each rank holds samples rank::world and results are
        # all-reduced. shard=False: every rank holds all samples and computes alone (for measures that
        # share out other work over ranks, such as the points of a landscape grid).
        self.ctx = D.current() if shard else D.DistContext()
        try:
            batch_size = _check_int("--batch-size", batch_size, 1, "pass how many samples to evaluate at once")
            if samples is not None:
                samples = _check_int("--samples", samples, 1, "pass how many samples to draw (leave it out for all)")
            check_kernel(kernel)  # here, not at the first HVP
            seed_value = check_seed(seed)  # the subset's stream: np.int64(3) must draw what 3 draws
            if not isinstance(split, str):
                raise ValueError(f"split={split!r} is not a split name; pass e.g. 'source-val', 'target' or 'env0_out'")
            dtype = _check_dtype(dtype)
        except ValueError as exc:
            raise FlatlensError(str(exc)) from None
        self.run = source if isinstance(source, Run) else None
        model = source.model if self.run is not None else source
        if not isinstance(model, nn.Module):
            raise FlatlensError("Objective needs a flatlens Run (fl.load_checkpoint) or an nn.Module with batches=")
        try:  # a torch.compile'd model is measured through its original module (see flatlens.measure.twice)
            model = uncompiled(model)
        except ValueError as exc:
            raise FlatlensError(str(exc)) from None
        if isinstance(device, str):  # the names --device takes ("auto", "cuda" = this rank's GPU), checked
            device = D.resolve_device(device, self.ctx.local_rank)
        first = next(model.parameters(), None)  # a model without parameters fails at the selection, in one line
        device = torch.device(device) if device is not None else first.device if first is not None else torch.device("cpu")
        self.device = device
        quantized_model = _has_quantizers(model)
        if space in ("dequant", "scales") and not quantized_model:
            raise FlatlensError(f"space {space!r} needs a quantized model, and this one has no quantizers; use space=latent")
        if space == "dequant":
            from flatlens.quant import dequantized_copy, iter_quantizers

            weights_rounded = any(q.is_enabled() for _, q in iter_quantizers(model, "weight"))
            model = dequantized_copy(model)
            acts_on = any(q.is_enabled() for _, q in iter_quantizers(model, "activation"))
        if dtype is not None and any(t.dtype != dtype for t in (*model.parameters(), *model.buffers())
                                     if t.is_floating_point()):
            # a copy: the caller's model keeps its dtype (dequant space already measures a copy of its own)
            model = (model if space == "dequant" else copy.deepcopy(model)).to(dtype)
        _check_per_sample(model)
        self.model = model.to(device)
        include = include_groups(include)
        if space == "scales" and include == ("weights",) and select is None:
            include = ("scales",)
        self.space = ParamSpace(self.model, _live_parameters(self.model, select_parameters(self.model, include, select,
                                                                                         exclude), space), space)
        self.selection = {"include": list(include), "select": select or "", "exclude": exclude or ""}
        self.left_out = [] if select or space == "scales" or "other" in include or "all" in include else \
            left_out_of_groups(self.model, self.space.names)
        if self.left_out and self.ctx.rank == 0:
            warnings.warn(f"{len(self.left_out)} trainable tensor(s) belong to no layer group and are not measured: "
                          + ", ".join(self.left_out[:4]) + (" ..." if len(self.left_out) > 4 else "")
                          + "; include them with include='" + ",".join((*include, "other"))
                          + "' (--include), or name them with select= (--params)", stacklevel=2)
        self.split = split
        self.seed = seed_value
        self.batch_size = batch_size
        self.sample_ids: Tensor | None = None  # (n, 2): domain index, sample index
        if batches is not None:
            self.batches = [(x.to(device), y.to(device)) for x, y in _checked_batches(batches)]
            self.split = split if split != "source-val" or self.run is not None else "custom"
        elif self.run is not None:
            self.batches = self._load_batches(samples)
        else:
            raise FlatlensError("Objective(model) needs batches=[(x, y), ...]; or pass a Run from fl.load_checkpoint")
        if dtype is not None:  # the inputs in the dtype the model now computes in
            self.batches = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in self.batches]
        self.n_local = sum(int(y.shape[0]) for _, y in self.batches)
        self.n_samples = int(self._reduce(torch.tensor([float(self.n_local)], dtype=torch.float64))[0])
        if self.n_samples == 0:
            raise FlatlensError(f"split {self.split!r} holds no samples")
        if space == "latent" and quantized_model and _quantization_on(self.model):
            steps = set(parameter_groups(self.model)["scales"]) & set(self.space.names)
            self.differentiated = ("straight-through surrogate of the quantized model (latent weights"
                                   + (" and step sizes, LSQ gradient scale off)" if steps else ")"))
        elif space == "dequant" and not weights_rounded and not acts_on:
            self.differentiated = ("float model (its weight quantizers are off in this checkpoint, so the dequant "
                                   "copy holds the float weights)")
        elif space == "dequant":
            self.differentiated = ("float copy holding the quantized weights w_q (weight quantizers off; activation "
                                   "quantizers on, straight-through)" if acts_on else
                                   "float copy holding the quantized weights w_q (quantizers off)")
        elif space == "scales":
            self.differentiated = "quantizer step sizes (straight-through surrogate, LSQ gradient scale off)"
        else:
            self.differentiated = "float model"
        self.kernel_name = kernel
        self._hvp: HessianVectorProduct | None = None
        self.n_forward = 0  # passes over the cached samples for loss values
        self.n_grad = 0
        self.n_hvp = 0  # HVPs computed (a product replayed from a journal is not one)
        self.n_hvp_replayed = 0
        self._journal = None
        self.seconds = 0.0
        if batches is not None:
            self._check_labels()

    def __repr__(self) -> str:
        return (f"Objective({self.space.numel:,} parameters in space {self.space.space!r} ({len(self.space.names)} "
                f"tensors, {str(self.space.dtype).replace('torch.', '')}), {self.n_samples:,} samples of split "
                f"{self.split!r}, on {self.device}, kernel "
                f"{self._hvp.kernel if self._hvp is not None else self.kernel_name})")

    # -- data ------------------------------------------------------------------------------------
    def _load_batches(self, samples: int | None) -> list[tuple[Tensor, Tensor]]:
        run = self.run
        parts = run.split_data(self.split)
        ids = torch.cat([torch.stack([torch.full_like(idx, env), idx], 1) for env, idx in parts])
        if samples is not None:
            if samples < len(ids):
                pick = torch.randperm(len(ids), generator=generator(self.seed, "objective-samples", self.split))[:samples]
                ids = ids[pick.sort().values]
        self.sample_ids = ids
        mine = ids[self.ctx.rank::self.ctx.world_size]
        try:  # the samples are cached as tensors: a whole DomainNet split at 224x224 is ~90 GB
            require_memory((len(mine), *run.dataset.input_shape), torch.float32, self.device,
                           f"caching {len(mine):,} samples of split {self.split!r}",
                           "pass --samples N (a seeded subset), or shard them over more processes (torchrun)")
        except ValueError as exc:
            raise FlatlensError(str(exc)) from None
        batches = []
        for chunk in torch.split(mine, self.batch_size):
            xs, ys = [], []
            for env in chunk[:, 0].unique(sorted=True).tolist():
                sel = chunk[chunk[:, 0] == env, 1]
                x, y = run.dataset.domains[env].load(sel)
                xs.append(x)
                ys.append(y)
            batches.append((torch.cat(xs).to(self.device), torch.cat(ys).to(self.device)))
        return batches

    def subset_sha256(self) -> str:
        if self.sample_ids is None:
            h = hashlib.sha256()
            for x, y in self.batches:
                for t in (x, y):  # the raw bytes (numpy has no bfloat16); the same bytes numpy() gives
                    update_sha256(h, t)
            return h.hexdigest()
        return hashlib.sha256(self.sample_ids.numpy().astype("int64").tobytes()).hexdigest()

    # -- helpers ---------------------------------------------------------------------------------
    def _reduce(self, t: Tensor) -> Tensor:
        t = t.to(self.device)
        D.all_reduce_sum(self.ctx, t)
        return t.cpu()

    @contextmanager
    def _second_order(self) -> Iterator[None]:
        """Eval mode (:meth:`_eval`), and PyTorch's refusal of a derivative it lacks (``the derivative for
        '_embedding_bag_backward' is not implemented``, raised as NotImplementedError from deep inside
        autograd by every kernel) as one line that names the way out."""
        with self._eval():
            try:
                yield
            except (NotImplementedError, RuntimeError) as exc:  # RuntimeError: "derivative for aten::X is not ..."
                if not isinstance(exc, NotImplementedError) and not _MISSING_DERIVATIVE.search(str(exc)):
                    raise
                raise FlatlensError(_NO_SECOND_DERIVATIVE.format(str(exc).splitlines()[0])) from None
            except NoKernelError as exc:  # select_kernel: every kernel failed, each for its reason
                raise FlatlensError(str(exc).splitlines()[0]) from None

    @contextmanager
    def _eval(self) -> Iterator[None]:
        """Eval mode for the duration of a call; the caller's training flags come back afterwards.

        (LSQ's step-size gradient scale is off in every differentiated forward: see
        :func:`flatlens.measure.hvp.make_forward_fn`, which all of them go through.)
        """
        flags = {m: m.training for m in self.model.modules()}
        self.model.eval()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            for m, f in flags.items():
                m.training = f
            self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def _check_labels(self) -> None:
        """Labels of explicit batches index the model's outputs: one forward of one sample gives the class
        count (cross-entropy would otherwise fail deep inside with 'Target 5 is out of bounds')."""
        x0 = next((x for x, y in self.batches if y.numel()), None)
        if x0 is None:  # this rank holds no samples (the others check theirs)
            return
        with self._eval():
            out = self.model(x0[:1])
        if not isinstance(out, Tensor) or out.dim() != 2:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
            raise FlatlensError(f"the model returns {got}; the measures need logits of shape (batch, classes): wrap "
                                "it in a module whose forward returns them (e.g. model(x)[0] or model(x)['logits'])")
        classes = int(out.shape[-1])
        top = max(int(y.max()) for _, y in self.batches if y.numel())
        if top >= classes:
            raise FlatlensError(f"batches hold label {top}, and the model has {classes} outputs; labels must be "
                                f"class indices in [0, {classes})")

    # -- values ----------------------------------------------------------------------------------
    @torch.no_grad()
    def loss_and_accuracy(self) -> tuple[float, float, float]:
        """(mean loss, accuracy, standard error of the mean loss) at the current parameters.

        The standard error is the sample standard deviation of the per-sample losses over sqrt(n): the
        sampling error of this loss as an estimate of the loss on the population the samples come from.
        """
        with self._eval():
            s = torch.zeros(4, dtype=torch.float64, device=self.device)
            for x, y in self.batches:
                logits = self.model(x)
                per = F.cross_entropy(logits.double() if logits.dtype != torch.float64 else logits, y, reduction="none")
                s[0] += per.sum()
                s[1] += (per * per).sum()
                s[2] += (logits.argmax(1) == y).sum()
                s[3] += y.numel()
            total = self._reduce(s)
        self.n_forward += 1
        n = float(total[3])
        mean = float(total[0]) / n
        var = max(float(total[1]) / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
        return mean, float(total[2]) / n, math.sqrt(var / n)

    def loss(self) -> float:
        return self.loss_and_accuracy()[0]

    # -- derivatives -----------------------------------------------------------------------------
    @property
    def hvp_engine(self) -> HessianVectorProduct:
        """The HVP kernel over this rank's batches (built, and its kernel chosen, on first use).

        With ``kernel="auto"`` the kernels are timed on the first batch; under torch.distributed rank
        0's choice is broadcast so every rank runs the same kernel.
        """
        if self._hvp is None:
            with self._second_order():
                params = dict(zip(self.space.names, self.space.params))
                loss_fn = make_loss_fn(self.model)
                self._check_batch_memory(loss_fn, params)
                kernel, selection = self.kernel_name, None
                if kernel == "auto":
                    from flatlens.measure.hvp import select_kernel

                    selection = select_kernel(loss_fn, params, self.batches[0], n_batches=len(self.batches))
                    kernel = str(D.broadcast_object(self.ctx, selection.kernel))
                self._hvp = HessianVectorProduct(loss_fn, params, self.batches, kernel=kernel)
                self._hvp.selection = selection
        return self._hvp

    def _check_batch_memory(self, loss_fn: Any, params: dict[str, Tensor]) -> None:
        """Every kernel holds the double-backward graph of one batch; at 224x224 a ResNet-50 batch of 256
        keeps tens of GB and the run was OOM-killed (CPU) or failed every kernel (CUDA). The graphs of one
        and of two samples are counted (a constant part plus a part per sample: eval mode makes the
        samples independent) and scaled to the largest batch."""
        from flatlens.measure.hvp import graph_bytes
        from flatlens.measure.memory import _bytes, available_bytes

        avail = available_bytes(self.device)
        if avail is None:
            return
        x, y = self.batches[0]
        one = graph_bytes(loss_fn, params, (x[:1], y[:1]))
        per_sample = max(graph_bytes(loss_fn, params, (x[:2], y[:2])) - one, 0) if y.shape[0] > 1 else one
        fixed = max(one - per_sample, 0)
        largest = max(int(b[1].shape[0]) for b in self.batches)
        if fixed + per_sample * largest > 0.8 * avail:
            fit = max(1, int((0.8 * avail - fixed) / max(per_sample, 1)))
            raise FlatlensError(f"one batch of {largest} samples keeps ~{_bytes(fixed + per_sample * largest)} for its "
                                f"Hessian-vector products and {self.device.type} has {_bytes(avail)} available; pass "
                                f"--batch-size {min(fit, largest - 1) if largest > 1 else 1} or less")
        kept = fixed * len(self.batches) + per_sample * self.n_local
        if self.kernel_name == "graph_reuse" and kept > 0.8 * avail:  # asked for by name (auto weighs it itself)
            raise FlatlensError(f"--kernel graph_reuse keeps the graphs of all {len(self.batches)} batches (~{_bytes(kept)}) "
                                f"and {self.device.type} has {_bytes(avail)} available; use --kernel auto or "
                                "double_backward, or fewer --samples")

    def grad(self) -> Tensor:
        """Flat gradient of the mean loss w.r.t. the space's parameters (one forward+backward pass)."""
        return self.loss_and_grad()[1]

    def loss_and_grad(self) -> tuple[float, Tensor]:
        """Mean loss and its flat gradient, through detached aliases (no ``.grad`` is touched)."""
        with self._eval():
            loss_fn = make_loss_fn(self.model)
            leaves = [p.detach().requires_grad_(True) for p in self.space.params]
            params = dict(zip(self.space.names, leaves))
            acc = [torch.zeros_like(p) for p in leaves]
            total = torch.zeros(1, dtype=torch.float64, device=self.device)
            with torch.enable_grad():
                for batch in self.batches:
                    s, _ = loss_fn(params, batch)
                    for a, g in zip(acc, torch.autograd.grad(s, leaves, allow_unused=True)):
                        if g is not None:
                            a.add_(g)
                    total += s.detach().double()
            flat = self.space.flatten(acc)
            D.all_reduce_sum(self.ctx, flat)
            D.all_reduce_sum(self.ctx, total)
        self.n_grad += 1
        return float(total) / self.n_samples, flat / self.n_samples

    def hvp_gradient(self) -> tuple[Tensor, bool]:
        """Flat gradient of the mean loss through the HVP engine, and whether a pass was spent on it.

        Under the ``graph_reuse`` kernel the gradient comes with the retained graphs the HVPs are
        built on, so it costs nothing extra (``False``); other kernels spend one forward+backward
        (``True``, counted in ``n_grad``). Used to start Lanczos from the gradient direction.
        """
        with self._second_order():
            eng = self.hvp_engine
            spent = eng.kernel != "graph_reuse"
            out = self._global(eng.gradient())
        self.n_grad += int(spent)
        return out, spent

    def hvp(self, v: Tensor) -> Tensor:
        """Flat ``H v`` (H = Hessian of the mean loss w.r.t. the space's parameters)."""
        return self._journaled(v, lambda u: self.hvp_engine.hvp(u), 1)

    def hvp_block(self, V: Tensor) -> Tensor:
        """``H V`` for an ``n x b`` block (one pass over the data for all columns)."""
        return self._journaled(V, lambda U: self.hvp_engine.hvp_batched(U), V.shape[1])

    def _journaled(self, V: Tensor, product: Any, count: int) -> Tensor:
        """``product(V)`` as the global mean, or its recorded output when a journal is open and replays it."""
        def compute(U: Tensor) -> Tensor:
            with self._second_order():
                return _finite(self._global(product(U)))

        if self._journal is None:
            out, replayed = compute(V), False
        else:
            if self._journal.kernel is None:  # not at open: a measure without HVPs builds no engine
                self._journal.set_kernel(self.hvp_engine.kernel)
            out, replayed = self._journal.apply(V, compute)
        if replayed:
            self.n_hvp_replayed += count
        else:
            self.n_hvp += count
        return out

    def journal_identity(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """What pins the Hessian a journal of this Objective holds products of (see :mod:`~flatlens.measure.journal`),
        with ``extra`` (e.g. the measure's settings) added: the identity :meth:`journal` opens a journal under."""
        from flatlens.measure.journal import IDENTITY_LEFT_OUT
        from flatlens.measure.params import model_state_hash

        info = {k: v for k, v in self.describe().items() if k not in IDENTITY_LEFT_OUT}
        # the weights themselves: a notebook's model has no checkpoint sha256, and one trained further between
        # two runs of a cell has the same names, data and seeded first probe as before
        info["model_state_sha256"] = model_state_hash(self.model)
        info["param_names"] = list(self.space.names)
        info["n_params"] = self.space.numel
        info["dtype"] = str(self.space.dtype)
        return {**info, **(extra or {})}

    def prefer_kernel(self, kernel: str) -> bool:
        """Use ``kernel`` instead of timing the kernels, if this Objective's kernel is ``"auto"`` and not yet
        chosen (a resumed measure takes the kernel of the run it resumes); whether it was taken."""
        if self._hvp is None and self.kernel_name == "auto":
            self.kernel_name = check_kernel(kernel)
            return True
        return False

    @contextmanager
    def journal(self, directory: Any, identity: dict[str, Any] | None = None) -> Iterator[Any]:
        """Record every HVP inside the block in ``directory``, replaying what a killed earlier run recorded there.

        ``with obj.journal("trace.journal"): tr = fl.hessian.trace(obj)``: when the cell is interrupted (or
        the process killed), running it again replays the recorded products whose inputs match bitwise and
        computes the rest, so the result is the uninterrupted run's. The folder is deleted when the block
        finishes without an error and kept otherwise. ``identity`` adds to what pins the Hessian (e.g. the
        measure and its settings); a journal of another Objective or identity is discarded. The HVP kernel
        of the killed run is used when this Objective's kernel is ``"auto"`` and not yet chosen. Needs one
        parameter-sized output per HVP on disk (:mod:`flatlens.measure.journal`). The Gauss-Newton trace,
        which spends no HVPs, saves its partial sum there instead (:func:`~flatlens.measure.gauss_newton.hessian_diagonal`).
        """
        from flatlens.measure.journal import HvpJournal

        if self._journal is not None:
            raise FlatlensError("an HVP journal is already open on this Objective; open one at a time")
        jr = HvpJournal(directory, self.journal_identity(identity), ctx=self.ctx)
        if jr.recorded_kernel:
            self.prefer_kernel(jr.recorded_kernel)  # the kernel itself is recorded at the first product
        self._journal = jr
        try:
            yield jr
        finally:
            self._journal = None
            jr.flush()  # what was computed before an interruption is on disk for the rerun
        jr.remove()

    def _global(self, local_mean: Tensor) -> Tensor:
        """Turn this rank's sample-mean quantity into the mean over all ranks' samples."""
        if not self.ctx.distributed:
            return local_mean
        t = local_mean * (self.n_local / self.n_samples)
        D.all_reduce_sum(self.ctx, t)
        return t

    def operator(self):
        """The Hessian as a :class:`flatlens.measure.linalg.SymmetricOperator` (flat vectors)."""
        from flatlens.measure.linalg import SymmetricOperator

        return SymmetricOperator(self.hvp, self.space.numel, dtype=self.space.dtype, device=self.device,
                                 matmat=self.hvp_block, name="hessian")

    def as_operator(self):
        """:meth:`operator` under the name :func:`flatlens.measure.linalg.as_operator` looks for, so that the solvers
        of :mod:`~flatlens.measure.linalg` and :mod:`~flatlens.measure.trace_estimators` (which the README names
        for direct use) take an Objective as they take an HVP engine."""
        return self.operator()

    def release(self) -> None:
        """Free the HVP engine's retained graphs."""
        if self._hvp is not None:
            self._hvp.release()

    # -- provenance ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Everything a stored result needs to say about what was measured."""
        info: dict[str, Any] = {
            "split": self.split, "n_samples": self.n_samples, "subset_seed": self.seed,
            "subset_sha256": self.subset_sha256(), "bn_mode": "eval", "differentiated": self.differentiated,
            "world_size": self.ctx.world_size, "device": str(self.device),
            **{f"select_{k}": v for k, v in self.selection.items()}, **self.space.describe(),
        }
        if self._hvp is not None:
            info["hvp_kernel"] = self._hvp.kernel
        if self.run is not None:
            info.update(checkpoint=str(self.run.path), checkpoint_sha256=self.run.sha256, checkpoint_step=self.run.step,
                        checkpoint_kind=self.run.kind, quantized=self.run.quantized)
        return info

    def costs(self) -> dict[str, float]:
        return {"n_forward": self.n_forward, "n_grad": self.n_grad, "n_hvp": self.n_hvp,
                "n_hvp_replayed": self.n_hvp_replayed, "seconds": self.seconds}
