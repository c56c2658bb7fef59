"""The README tells the truth about the config: its reference table is the code's."""

from __future__ import annotations

from pathlib import Path

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
