"""Regenerate the generated parts of README.md: ``python -m flatlens.docs``."""

from __future__ import annotations

import re
from pathlib import Path

from flatlens.config import options_markdown


def update_readme(path: Path) -> bool:
    text = path.read_text()
    new = re.sub(r"(<!-- config-table:start -->\n).*?(<!-- config-table:end -->)",
                 lambda m: m.group(1) + options_markdown() + "\n" + m.group(2), text, flags=re.S)
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[1] / "README.md"
    print("README.md updated" if update_readme(readme) else "README.md already up to date")
