"""flatlens: train quantization-aware and domain-generalizing networks and measure their loss surface.

The public API a notebook uses is re-exported here lazily (importing :mod:`flatlens` does not import
torch-heavy submodules until an attribute is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_checkpoint": ("flatlens.checkpoint", "load_checkpoint"),
    "Config": ("flatlens.config", "Config"),
    "load_config": ("flatlens.config", "load_config"),
    "FlatlensError": ("flatlens.errors", "FlatlensError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'flatlens' has no attribute {name!r}")
