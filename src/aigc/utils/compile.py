"""Whether torch.compile can run here."""

from __future__ import annotations

import os
import shutil


def can_compile() -> bool:
    """torch.compile on CPU builds C++ kernels: it needs a C++ compiler on PATH."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))
