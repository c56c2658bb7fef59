"""Progress reporting: a tqdm bar on an interactive terminal (rank 0 only), plain log lines otherwise.

Log lines also go to an optional log file, so a run directory keeps its own history.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class Progress:
    """A step counter that renders as tqdm on a TTY and as occasional lines in logs and CI."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 log_file: Path | None = None, every_seconds: float = 30.0) -> None:
        self.enabled = enabled
        self.log_file = log_file
        self.total = total
        self.n = initial
        self.desc = desc
        self.every = every_seconds
        self._last_line = time.monotonic()
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        elif self.enabled and time.monotonic() - self._last_line >= self.every:
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            self.log(f"{self.desc} {self.n}/{self.total} {extra}".strip())

    def log(self, message: str) -> None:
        """Print a line (above the bar on a TTY) when enabled; always append it to the log file."""
        self._last_line = time.monotonic()
        if self.enabled:
            if self._bar is not None:
                self._bar.write(message)
            else:
                print(message, flush=True)
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(message + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
