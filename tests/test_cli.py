"""The command line: user errors are one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import pytest

from conftest import flatlens_cmd


class Payload:
    """A class instance: pickling it into a .pt makes a checkpoint that would import code on load."""


def _one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["train", "--set", "train.stepz=3", "--out", "x"], "unknown config key 'train.stepz'; valid keys in [train]"),
    (["train", "--set", "optim.lr=fast", "--out", "x"], "optim.lr expects float, got 'fast'"),
    (["train", "--config", "nope.toml", "--out", "x"], "config file not found: nope.toml"),
    (["train", "--set", "train.steps=2"], "--out is required"),
    (["train", "--set", "data.dataset=PACS", "data.root=/nonexistent", "--out", "OUT"],
     "PACS not found at /nonexistent/PACS"),
    (["train", "--set", "data.test_envs=9", "--out", "OUT"], "data.test_envs [9] names no domain of rotated_digits"),
    (["info", "missing.pt"], "checkpoint not found: missing.pt"),
    (["info", "missing.h5"], "analysis file not found: missing.h5"),
    (["info", "EMPTY"], "EMPTY is a folder, not a checkpoint: it holds no .pt file"),
    (["sharpness", "RUN"], "RUN is a folder, not a checkpoint: give one of its checkpoints, e.g. RUN/model.pt "
                           "(last.pt, model.pt)"),
    (["collect", "EMPTY"], "no flatlens runs"),
])
def test_user_errors(tmp_path, args, fragment):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "RUN").mkdir()
    for name in ("model.pt", "last.pt"):  # a run's folder given for its checkpoint
        (tmp_path / "RUN" / name).write_bytes(b"")
    args = [a.replace("OUT", str(tmp_path / "out")).replace("EMPTY", str(tmp_path / "EMPTY")) for a in args]
    fragment = fragment.replace("EMPTY", str(tmp_path / "EMPTY"))
    _one_line_error(flatlens_cmd(*args, cwd=tmp_path), fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())



@pytest.mark.parametrize("args", [
    ["sharpness", "m.pt", "--out", ""], ["landscape", "m.pt", "--out", " "], ["collect", ".", "--out", ""],
    ["train", "--set", "train.steps=2", "--out", ""], ["export", "m.pt", ""], ["plot", "a.h5", "--out", ""],
    ["ensemble", "a", "b", "--out", ""],
])
def test_empty_output_paths_are_refused(tmp_path, args):
    """An empty --out was the default path (sharpness, landscape) or "write nothing" (collect,
    ensemble) without a word; it is an argparse error naming the option (usage line, then the error)."""
    proc = flatlens_cmd(*args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "empty path; give a file or directory name" in last and ("--out" in last or "argument out" in last), last
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["sharpness", "landscape"])
def test_a_seed_no_result_file_could_record_is_refused_at_once(tmp_path, command):
    """--seed 10**20 ran the whole measurement and then failed inside h5py ("Object dtype ... has no
    native HDF5 equivalent")."""
    proc = flatlens_cmd(command, "m.pt", "--seed", str(10**20), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "argument --seed: 100000000000000000000 does not fit in 64 bits" in proc.stderr.strip().splitlines()[-1]


def test_bad_checkpoints(tmp_path):
    import torch

    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    _one_line_error(flatlens_cmd("info", str(tmp_path / "garbage.pt")), "not a torch checkpoint")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    _one_line_error(flatlens_cmd("info", str(tmp_path / "foreign.pt")),
                    "header); the commands read the .pt files that `flatlens train` writes; for a model trained "
                    "elsewhere, load it yourself and measure it from Python: fl.Objective(model, batches=loader)")

    torch.save({"x": Payload()}, tmp_path / "code.pt")
    _one_line_error(flatlens_cmd("info", str(tmp_path / "code.pt")), "refusing to load")


def test_run_directory_protection_and_resume_config_check(tmp_path):
    out = str(tmp_path / "run")
    tiny = ["--quiet", "--set", "model.width=4", "train.batch_size=4", "train.steps=4", "train.eval_every=2"]
    assert flatlens_cmd("train", *tiny, "--out", out).returncode == 0
    _one_line_error(flatlens_cmd("train", *tiny, "--out", out), "already holds a finished run")
    _one_line_error(flatlens_cmd("train", *tiny, "train.seed=1", "--out", out, "--resume"),
                    "--resume with a different config than the run in")
    (tmp_path / "run" / "done").unlink()
    _one_line_error(flatlens_cmd("train", *tiny, "--out", out), "holds an unfinished run; pass --resume")
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    _one_line_error(flatlens_cmd("train", *tiny, "--out", str(tmp_path / "stranger")), "is not a flatlens run directory")
    again = flatlens_cmd("train", *tiny, "--out", out, "--overwrite")
    assert again.returncode == 0 and (tmp_path / "run" / "done").exists()
    info = flatlens_cmd("info", str(tmp_path / "run" / "model.pt"))
    assert info.returncode == 0 and "kind              selected" in info.stdout


def test_show_and_help_config():
    show = flatlens_cmd("train", "--set", "quant.bits=4", "--show")
    assert show.returncode == 0 and "bits = 4" in show.stdout and "[quant]" in show.stdout
    helped = flatlens_cmd("train", "--help-config")
    assert helped.returncode == 0 and "quant.q_step" in helped.stdout and "train.selection" in helped.stdout


@pytest.mark.parametrize("command", ["train", "collect", "info", "export", "ensemble", "sharpness", "landscape", "plot"])
def test_help_names_each_default_once_and_never_none(command):
    """Every option's help states its default at most once, and never as "(default: None)" or a switch's
    "(default: True)" (argparse's ArgumentDefaultsHelpFormatter printed all three)."""
    from flatlens.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if not action.option_strings or not action.help:
            continue
        text = sub._get_formatter()._expand_help(action)
        for bad in ("(default: None)", "(default: True)", "(default: False)"):
            assert bad not in text, (action.dest, text)
        if "default" in action.help.lower():  # the help already says it: nothing appended
            assert text == action.help % {**vars(action), "prog": sub.prog}, (action.dest, text)
        else:
            assert text.count("(default:") <= 1, (action.dest, text)


def test_ranges_starting_below_zero_parse_without_an_equals_sign():
    """`flatlens landscape --range -1:1:5` parsed, but `flatlens sharpness --landscape-range -1:1:5` was
    "argument --landscape-range: expected one argument" (argparse took the value for an option)."""
    from flatlens.cli import build_parser

    def sub(command):
        parser = build_parser(command)
        return next(a for a in parser._actions if a.dest == "command").choices[command]

    a = sub("sharpness").parse_args(["c.pt", "--measures", "landscape", "--landscape-range", "-1:1:5",
                                     "--landscape-y-range", "-.5:.5:3", "--seed", "-2"])
    assert (a.landscape_range, a.landscape_y_range, a.seed) == ("-1:1:5", "-.5:.5:3", -2)
    a = sub("landscape").parse_args(["c.pt", "--range", "-1e-1:1:5", "--y-range", "-2:2:3"])
    assert (a.range, a.y_range) == ("-1e-1:1:5", "-2:2:3")
    with pytest.raises(SystemExit):  # an unknown option is still one
        sub("sharpness").parse_args(["c.pt", "--landscape-rnge", "-1:1:5"])


def test_a_closed_output_pipe_ends_quietly(tmp_path):
    """`flatlens info ... | head` printed a BrokenPipeError traceback when head left early."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    from flatlens import store

    f = tmp_path / "a.h5"
    store.ensure_file(f, {"checkpoint_sha256": "a" * 64, "config": {}})
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "flatlens", "info", str(f), "--json"], stdout=w, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
