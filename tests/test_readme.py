"""The README tells the truth: its config reference table is the code's, and its Python API example runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatlens.config import options_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_table_matches_code():
    text = README.read_text()
    start, end = "<!-- config-table:start -->\n", "<!-- config-table:end -->"
    table = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == options_markdown().strip(), "regenerate with: python -m flatlens.docs"


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    assert text.index("make demo") < text.index("make test") < text.index("## Usage")


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    return text.split(heading, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def _run_readme_block(heading: str, swaps: list[tuple[str, str]]) -> dict:
    """Execute the first Python block after ``heading`` with ``swaps`` applied (each must occur)."""
    code = _python_block_after(heading)
    for old, new in swaps:
        assert old in code, old
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, f"README.md ({heading.strip('#* ')})", "exec"), scope)
    return scope


def test_the_python_api_example_runs_as_written(tiny_run, tmp_path):
    """The README's Python API block, run on a tiny checkpoint (paths and the sample count swapped, nothing
    else): a renamed attribute or argument in the example would otherwise reach a notebook user first."""
    scope = _run_readme_block("### Python API", [("runs/erm/model.pt", str(tiny_run / "model.pt")),
                                                 ("runs/erm/", f"{tmp_path}/"), ("samples=1024", "samples=64")])
    r, sp, eig = scope["r"], scope["sp"], scope["eig"]
    assert r["eigenvalues"].tolist() == eig.values.tolist() and len(r["eigenvalues"]) == 3
    assert sp.n_hvp == sum(x.n_hvp for x in (sp.eigen, sp.trace, sp.density))
    assert scope["top"].start == "gradient" and scope["obj64"].space.dtype == torch.float64
    assert scope["dg"].sum().item() == pytest.approx(scope["ex"].estimate, rel=1e-6)


def test_the_landscape_and_checkpoint_examples_run_as_written(tiny_run, tmp_path):
    """The loss-landscape "From Python" block and the load_checkpoint block, the same way (the latter's
    moved-dataset line names a PACS run that does not exist here, so it is left out)."""
    scope = _run_readme_block("**From Python**", [("runs/erm/model.pt", str(tiny_run / "model.pt")),
                                                  ("runs/erm/", f"{tmp_path}/"), ("samples=256", "samples=64"),
                                                  ('"figs/nb_2d"', f'"{tmp_path}/figs/nb_2d"')])
    assert scope["s"].loss.shape == (5, 5) and (tmp_path / "figs" / "nb_2d_contour.png").is_file()
    pacs = 'run = fl.load_checkpoint("runs/pacs/model.pt", data_root="/data")'
    scope = _run_readme_block("and the same splits", [("runs/erm/model.pt", str(tiny_run / "model.pt")), (pacs, "")])
    assert scope["run"].split_data("target")
