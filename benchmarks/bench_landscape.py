"""Cost of a flatlens loss-landscape grid point, against a plain forward pass and against a faithful
re-implementation of tomgoldstein/loss-landscape's per-point loop (the issue's acceptance benchmark).

Everything runs in one process, on the same model, the same evaluation samples and the same 2-D grid
(``-1:1:N`` on both axes, random filter-normalized directions with biases and norm parameters
ignored -- Li et al.'s ``--xnorm filter --xignore biasbn``):

* ``forward`` -- one plain pass of ``model.eval()`` under ``torch.no_grad()`` over the cached
  evaluation batches (the batches flatlens uses: ``--batch-size`` samples each, already on the
  device); nothing but ``model(x)``. The floor for any per-point evaluation.
* ``flatlens`` -- :func:`flatlens.measure.landscape.surface` on an :class:`~flatlens.measure.objective.
  Objective` over those batches, writing the grid block by block into a fresh HDF5 file. Timed is the
  *grid phase*: from the log line it prints once its warm-up is over to the log line it prints after
  the last block is written -- parameter moves (``torch._foreach`` from the cached origin), loss,
  accuracy and standard error, HDF5 block writes, all included. The whole call (directions, file
  creation, the 1 + 3 warm-up evaluations) is reported as well ("end to end"), but it is a fixed cost
  that a realistic grid (51 x 51 = 2601 points) amortises, so the goals use the grid phase.
* ``li-loop bB wW`` -- ``plot_surface.crunch`` as tomgoldstein/loss-landscape runs it
  (``dir_type=states``): the directions are written to an HDF5 direction file (``xdirection/0..n``,
  ``ydirection/0..n`` in ``state_dict()`` order: flatlens's own direction tensors for the moved
  weights, zeros for every other entry, as their ``biasbn`` policy gives), and for every
  not-yet-computed point (their ``losses <= 0`` scheduler, x fastest) it rebuilds the changes from the
  *lazily read* h5py datasets (``d0*step[0] + d1*step[1]``), deep-copies the origin state dict (kept on
  the CPU: theirs is captured before ``.cuda()``), adds the changes, loads the result with ``net.load_state_dict``,
  builds a fresh ``torch.utils.data.DataLoader`` (batch ``B``, shuffle off, ``W`` workers,
  ``pin_memory`` on CUDA, as theirs) over the *same* samples as CPU tensors, runs their
  ``evaluation.eval_loss`` (``net.eval()``, ``no_grad``, ``loss.item() * batch_size``,
  ``predicted.eq(targets).sum().item()``, accuracy in %), and rewrites and flushes the full
  ``train_loss``/``train_acc`` arrays of the surface file, as their rank 0 does after every point.
  Timed: the loop ("grid phase") and, end to end, the loop plus writing the direction and surface
  files. The goal's reference is their defaults, ``--batch_size 128 --threads 2`` (``B=128 W=2``). A
  second, generous variant (``B`` = flatlens's batch size, no workers; ``--no-generous`` skips it)
  shows how much of the difference is the per-point loop itself rather than batch size and worker
  start-up. Both are generous in one respect: the samples are tensors, whereas their CIFAR-10 loader
  decodes every image with PIL at every point.

Both surfaces are checked against each other (max |Δloss| is printed; they differ only in float
summation order and batch size).

Goals (issue): (a) flatlens grid-phase seconds per point / forward seconds <= 1.1, and (b) li-loop
seconds per point / flatlens seconds per point >= 1.3 on CPU. Each repeat times every contender once,
in an order that rotates from repeat to repeat (so that drifts of a shared machine hit them alike);
the ratios are the median over ``--repeats`` of the ratios within each repeat, the seconds are
medians too; wall clock and process CPU time (all threads of this process; DataLoader workers are
child processes, which the CPU column does not see).

Models: DomainBed's MNIST-CNN (``mnist_cnn``, 4 convs + GroupNorm) on RotatedDigits images at
1x16x16 (the embedded digits data, at the size ``make demo`` uses), and torchvision's ResNet-18
(``resnet18``, BatchNorm) on seeded random 3x32x32 CIFAR-shaped inputs with a small sample count.
Both randomly initialised (seed 0): timing does not depend on training.

    python benchmarks/bench_landscape.py                      # both models, 5 repeats, 3x3 grid
    python benchmarks/bench_landscape.py --threads 1          # the same with one intra-op thread
    python benchmarks/bench_landscape.py --quick              # smoke run (2x2 grid, 16 samples; its ratios mean nothing), < 60 s

On a shared 2-core VM the default run took 4 min with ``--threads 1`` and 11 min with torch's
default 2 threads, while another job kept the load average at 4-8: each multi-threaded op then
waits for its second OpenMP thread to be scheduled (see the "Speed" notes).
    python benchmarks/bench_landscape.py --models resnet18 --device cuda --samples 10000 --grid 11

Results and their reading: README.md, "Loss landscapes", "Speed".
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlens.config import ModelConfig  # noqa: E402
from flatlens.measure.landscape import surface  # noqa: E402
from flatlens.measure.objective import Objective  # noqa: E402
from flatlens.models import build_model  # noqa: E402

MODELS = {
    # name: (arch, input shape, classes, default samples, data)
    "mnist_cnn": ("mnist_cnn", (1, 16, 16), 10, 256, "rotated_digits"),
    "resnet18": ("resnet18", (3, 32, 32), 10, 128, "random"),
}
GOAL_FORWARD = 1.1  # flatlens seconds per point / forward seconds: at most
GOAL_SPEEDUP = 1.3  # li-loop seconds per point / flatlens seconds per point: at least


# -- data and model -------------------------------------------------------------------------------

def make_data(kind: str, shape: tuple[int, int, int], classes: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evaluation samples (CPU): RotatedDigits images (all domains, in order) or seeded noise."""
    if kind == "rotated_digits":
        from flatlens.data.digits import rotated_digits

        ds = rotated_digits(data_seed=0, image_size=shape[-1])
        xs = torch.cat([d.images for d in ds.domains])
        ys = torch.cat([d.labels for d in ds.domains])
        if n > len(ys):
            raise SystemExit(f"--samples {n}: RotatedDigits has {len(ys)} samples")
        pick = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))[:n]
        return xs[pick].contiguous(), ys[pick].contiguous()
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, *shape), generator=g), torch.randint(classes, (n,), generator=g)


def make_model(arch: str, shape: tuple[int, int, int], classes: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch), shape, classes).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU seconds between ``start()`` and ``stop()``."""

    def start(self) -> "Clock":
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.w0, time.process_time() - self.c0


# -- the three contenders -------------------------------------------------------------------------

def time_forward(model: nn.Module, batches, device: torch.device, passes: int) -> tuple[float, float]:
    """Mean (wall, cpu) seconds of one plain eval/no_grad forward pass over ``batches``."""
    model.eval()
    with torch.no_grad():
        for x, _ in batches:  # untimed pass
            model(x)
        sync(device)
        clock = Clock().start()
        for _ in range(passes):
            for x, _ in batches:
                model(x)
        sync(device)
        wall, cpu = clock.stop()
    return wall / passes, cpu / passes


def run_flatlens(model: nn.Module, batches, device: torch.device, grid: str, out: Path) -> dict:
    """One flatlens surface into ``out``; grid-phase and end-to-end seconds, and the loss array."""
    marks: list[tuple[float, float]] = []

    def log(_msg: str) -> None:
        sync(device)
        marks.append((time.perf_counter(), time.process_time()))

    obj = Objective(model, batches=batches, device=device, shard=False)
    clock = Clock().start()
    surf = surface(obj, 2, grid, norm="filter", ignore="biasbn", seed=0, out=out, name="bench", overwrite=True,
                   log=log)
    total = clock.stop()
    if len(marks) != 2:
        raise RuntimeError(f"flatlens printed {len(marks)} log lines, the benchmark expects 2 (start, end of grid)")
    points = int(surf.attrs["last_session_points"])
    (w0, c0), (w1, c1) = marks
    return {"points": points, "wall": (w1 - w0) / points, "cpu": (c1 - c0) / points,
            "e2e_wall": total[0] / points, "e2e_cpu": total[1] / points, "loss": np.asarray(surf.loss)}


def li_eval_loss(net: nn.Module, criterion, loader, use_cuda: bool, device: torch.device) -> tuple[float, float]:
    """tomgoldstein/loss-landscape ``evaluation.eval_loss`` (CrossEntropyLoss branch)."""
    correct = 0
    total_loss = 0
    total = 0
    net.eval()
    with torch.no_grad():
        for batch_idx, (inputs, targets) in enumerate(loader):
            batch_size = inputs.size(0)
            total += batch_size
            if use_cuda:
                inputs, targets = inputs.to(device), targets.to(device)
            outputs = net(inputs)
            loss = criterion(outputs, targets)
            total_loss += loss.item() * batch_size
            _, predicted = torch.max(outputs.data, 1)
            correct += predicted.eq(targets).sum().item()
    return total_loss / total, 100. * correct / total


def li_set_states(net: nn.Module, states: dict, directions, step) -> None:
    """tomgoldstein/loss-landscape ``net_plotter.set_states`` (with directions)."""
    if len(directions) == 2:
        dx = directions[0]
        dy = directions[1]
        changes = [d0 * step[0] + d1 * step[1] for (d0, d1) in zip(dx, dy)]
    else:
        changes = [d * step for d in directions[0]]
    new_states = copy.deepcopy(states)
    assert len(new_states) == len(changes)
    for (k, v), d in zip(new_states.items(), changes):
        d = torch.tensor(d)
        v.add_(d.type(v.type()))
    net.load_state_dict(new_states)


def run_li(model: nn.Module, x_cpu: torch.Tensor, y_cpu: torch.Tensor, device: torch.device, grid_values: np.ndarray,
           directions: dict[str, dict[str, torch.Tensor]], workdir: Path, batch_size: int, workers: int) -> dict:
    """tomgoldstein/loss-landscape's setup (direction + surface files) and ``crunch`` loop (one rank)."""
    use_cuda = device.type == "cuda"
    clock = Clock().start()
    # their get_weights / state capture happen on the CPU model, before .cuda()
    s = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # setup_direction: xdirection/ydirection as lists in state_dict() order (biasbn -> zeros)
    dir_file = workdir / "li_directions.h5"
    with h5py.File(dir_file, "w") as f:
        for axis in ("x", "y"):
            grp = f.create_group(f"{axis}direction")
            for i, (k, v) in enumerate(s.items()):
                d = directions[axis].get(k)
                grp.create_dataset(str(i), data=(d.cpu().numpy() if d is not None else np.zeros(v.shape, v.numpy().dtype)))
    # setup_surface_file
    surf_file = workdir / "li_surface.h5"
    with h5py.File(surf_file, "w") as f:
        f["dir_file"] = str(dir_file)
        f["xcoordinates"] = grid_values
        f["ycoordinates"] = grid_values
    # crunch
    fdir = h5py.File(dir_file, "r")
    d = [[fdir["xdirection"][str(i)] for i in range(len(fdir["xdirection"]))],
         [fdir["ydirection"][str(i)] for i in range(len(fdir["ydirection"]))]]  # lazily read h5py datasets
    f = h5py.File(surf_file, "r+")
    xcoordinates = f["xcoordinates"][:]
    ycoordinates = f["ycoordinates"][:]
    shape = (len(xcoordinates), len(ycoordinates))
    losses = -np.ones(shape=shape)
    accuracies = -np.ones(shape=shape)
    f["train_loss"] = losses
    f["train_acc"] = accuracies
    inds = np.array(range(losses.size))
    inds = inds[losses.ravel() <= 0]
    xcoord_mesh, ycoord_mesh = np.meshgrid(xcoordinates, ycoordinates)
    s1, s2 = xcoord_mesh.ravel()[inds], ycoord_mesh.ravel()[inds]
    coords = np.c_[s1, s2]
    criterion = nn.CrossEntropyLoss()
    dataset = torch.utils.data.TensorDataset(x_cpu, y_cpu)
    sync(device)
    loop = Clock().start()
    for count, ind in enumerate(inds):
        coord = coords[count]
        li_set_states(model, s, d, coord)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             pin_memory=use_cuda)
        loss, acc = li_eval_loss(model, criterion, loader, use_cuda, device)
        losses.ravel()[ind] = loss
        accuracies.ravel()[ind] = acc
        f["train_loss"][:] = losses
        f["train_acc"][:] = accuracies
        f.flush()
    sync(device)
    loop_s = loop.stop()
    f.close()
    fdir.close()
    total = clock.stop()
    model.load_state_dict(s)  # their tool leaves the last point in place; we put the origin back
    n = len(inds)
    # their arrays are declared (nx, ny) and filled x-fastest: for a square grid [j, i] = f(x_i, y_j)
    return {"points": n, "wall": loop_s[0] / n, "cpu": loop_s[1] / n, "e2e_wall": total[0] / n,
            "e2e_cpu": total[1] / n, "loss": losses.copy()}


# -- one model ------------------------------------------------------------------------------------

def bench_model(name: str, args, device: torch.device, workdir: Path) -> dict:
    arch, shape, classes, default_n, data_kind = MODELS[name]
    n = args.samples or (16 if args.quick else default_n)
    x, y = make_data(data_kind, shape, classes, n)
    model = make_model(arch, shape, classes).to(device)
    batches = [(xb.to(device), yb.to(device)) for xb, yb in zip(torch.split(x, args.batch_size),
                                                                  torch.split(y, args.batch_size))]
    grid = f"-1:1:{args.grid}"
    grid_values = np.linspace(-1.0, 1.0, args.grid)
    # the directions both contenders use: flatlens's seeded filter-normalized ones
    from flatlens.measure.directions import landscape_parameters, random_directions

    names = landscape_parameters(model, "biasbn", "random")
    params = dict(model.named_parameters())
    dirs = random_directions(names, [params[k].detach().cpu() for k in names], 2, "filter", seed=0)
    directions = {axis: dict(zip(names, tensors)) for axis, tensors in zip(("x", "y"), dirs.axes)}

    # li-loop variants: (label, batch size, workers); the first is theirs and the goal's reference
    variants = [(f"li-loop b{args.li_batch_size} w{args.li_workers}", args.li_batch_size, args.li_workers)]
    if args.generous and not args.quick:
        variants.append((f"li-loop b{args.batch_size} w0", args.batch_size, 0))
    li_names = [v[0] for v in variants]
    results: dict[str, list[dict]] = {"forward": [], "flatlens": [], **{k: [] for k in li_names}}
    contenders = list(results)
    time_forward(model, batches, device, 2)  # warm the allocator and the conv kernels' caches first
    for r in range(args.repeats):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            if c == "forward":
                wall, cpu = time_forward(model, batches, device, args.forward_passes)
                results[c].append({"wall": wall, "cpu": cpu})
            elif c == "flatlens":
                results[c].append(run_flatlens(model, batches, device, grid, workdir / f"flatlens_{name}_{r}.h5"))
            else:
                _, bs, workers = variants[li_names.index(c)]
                results[c].append(run_li(model, x, y, device, grid_values, directions, workdir, bs, workers))
    keys = ("wall", "cpu", "e2e_wall", "e2e_cpu")
    med = {c: {k: statistics.median(res[k] for res in results[c]) for k in keys if k in results[c][0]}
           for c in contenders}
    # ratios of measurements taken in the same repeat (minutes apart at most), then their median:
    # less sensitive to a shared machine's load drifting than a ratio of medians
    ratios = {"a_wall": [f["wall"] / w["wall"] for f, w in zip(results["flatlens"], results["forward"])],
              "a_cpu": [f["cpu"] / w["cpu"] for f, w in zip(results["flatlens"], results["forward"])],
              "a_e2e": [f["e2e_wall"] / w["wall"] for f, w in zip(results["flatlens"], results["forward"])]}
    for c in li_names:
        ratios[f"{c}_wall"] = [li["wall"] / f["wall"] for li, f in zip(results[c], results["flatlens"])]
        ratios[f"{c}_cpu"] = [li["cpu"] / f["cpu"] for li, f in zip(results[c], results["flatlens"])]
        ratios[f"{c}_e2e"] = [li["e2e_wall"] / f["e2e_wall"] for li, f in zip(results[c], results["flatlens"])]
    fl_loss = results["flatlens"][-1]["loss"]
    diff = max(float(np.max(np.abs(fl_loss - results[c][-1]["loss"]))) for c in li_names)
    return {"samples": n, "shape": shape, "points": results["flatlens"][0]["points"],
            "n_params_moved": sum(params[k].numel() for k in names), "li_names": li_names,
            "max_abs_loss_diff": diff, "median": med, "ratios": ratios,
            "median_ratios": {k: statistics.median(v) for k, v in ratios.items()},
            "repeats": {c: [{k: v for k, v in res.items() if k in keys} for res in results[c]] for c in contenders}}


def report(name: str, res: dict, args) -> None:
    med, rat = res["median"], res["median_ratios"]
    fwd, fl = med["forward"], med["flatlens"]
    print(f"\n{name}: input {res['shape']}, {res['samples']} samples, {res['points']} grid points "
          f"({args.grid}x{args.grid}), {res['n_params_moved']:,} weights moved; medians of {args.repeats} repeats")
    print(f"  {'seconds':<32}{'wall':>9}{'cpu':>9}{'wall e2e':>10}")
    print(f"  {'forward pass':<32}{fwd['wall']:>9.4f}{fwd['cpu']:>9.4f}")
    for label, m in [("flatlens per point", fl)] + [(f"{c} per point", med[c]) for c in res["li_names"]]:
        print(f"  {label:<32}{m['wall']:>9.4f}{m['cpu']:>9.4f}{m['e2e_wall']:>10.4f}")
    print(f"  max |loss flatlens - loss li-loop| over the grid: {res['max_abs_loss_diff']:.2e}")
    print("  ratios (median over repeats of the ratio within each repeat):")
    a = rat["a_wall"]
    print(f"  (a) flatlens / forward        {a:6.3f} wall  {rat['a_cpu']:6.3f} cpu  {rat['a_e2e']:6.3f} e2e   "
          f"goal <= {GOAL_FORWARD}: {'PASS' if a <= GOAL_FORWARD else 'MISS'}")
    for k, c in enumerate(res["li_names"]):
        b = rat[f"{c}_wall"]
        verdict = (f"goal >= {GOAL_SPEEDUP}: {'PASS' if b >= GOAL_SPEEDUP else 'MISS'}" if k == 0 else
                   f"(for reference: {'>=' if b >= GOAL_SPEEDUP else '<'} {GOAL_SPEEDUP})")
        if args.device_type != "cpu" and k == 0:
            verdict += " (the goal is stated for CPU)"
        print(f"  (b) {c + ' / flatlens':<25} {b:6.3f} wall  {rat[f'{c}_cpu']:6.3f} cpu  {rat[f'{c}_e2e']:6.3f} e2e   "
              + verdict)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mnist_cnn,resnet18", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--grid", type=int, default=0, help="points per axis of the -1:1 x -1:1 grid (default 3; quick 2)")
    p.add_argument("--samples", type=int, default=0,
                   help="evaluation samples (default: mnist_cnn 256, resnet18 128; quick 16)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per contender, medians reported (default 5; quick 1)")
    p.add_argument("--batch-size", type=int, default=256, help="flatlens (and forward) evaluation batch size")
    p.add_argument("--li-batch-size", type=int, default=128, help="li-loop DataLoader batch size (theirs: 128)")
    p.add_argument("--li-workers", type=int, default=2, help="li-loop DataLoader workers (theirs: --threads 2)")
    p.add_argument("--no-generous", dest="generous", action="store_false",
                   help="skip the second li-loop variant (flatlens's batch size, no DataLoader workers)")
    p.add_argument("--forward-passes", type=int, default=0, help="forward passes per timing (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 samples, 2x2 grid, 1 repeat, no generous variant (< 60 s)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.grid = args.grid or (2 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.forward_passes = args.forward_passes or (2 if args.quick else 3)
    if args.li_workers < 0 or args.li_batch_size < 1 or args.batch_size < 1:
        p.error("--li-workers must be >= 0 and the batch sizes >= 1")
    if args.grid < 2:
        p.error("--grid must be >= 2")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    args.device_type = device.type
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, {device} ({dev_name}), {torch.get_num_threads()} threads; grid "
          f"{args.grid}x{args.grid} on [-1,1]^2 (filter-normalized, biasbn ignored); flatlens batch "
          f"{args.batch_size}, li-loop batch {args.li_batch_size} with {args.li_workers} workers; "
          f"median of {args.repeats} repeats")
    results = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_landscape_") as tmp:
        for name in names:
            res = bench_model(name, args, device, Path(tmp))
            results[name] = res
            report(name, res, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
