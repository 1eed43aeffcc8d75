"""The process-wide OpenVINO `Core`, at the bottom of the import graph.

Both the model-folder checks (`artifacts`) and the runtime read IRs; keeping the one `Core` here
lets `artifacts` check an IR without importing the runtime (which itself reads model folders).
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def core():
    """One `ov.Core` per process: it caches plugin state and is safe to share between threads."""
    import openvino as ov

    return ov.Core()
