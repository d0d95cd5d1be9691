"""The layout of a run's saved state (what ``checkpoint.safetensors`` holds) and its migrations.

The file format (safetensors + hashed JSON, :mod:`fwdkern.fl.checkpoint`) says how the state is
stored; ``LAYOUT`` says what its fields mean. A state written by an older fwdkern is migrated to
the current layout with a one-line notice; one written by a newer fwdkern, or an older run's file
this fwdkern cannot read, is refused with a one-line message naming what to do. Nothing in an
output folder is passed over silently.
"""
from __future__ import annotations

import os

LAYOUT = 4

# Settings a run saved in layout N may predate (they came with layout N + 1): the value that
# reproduces what the fwdkern that wrote it computed (not today's default), so a migrated run
# resumes with its own meaning or is refused with the difference named.
PREDATES = {1: {"head": "perturb", "head_calibration": 0.0, "pooling": "hf", "wire": "json"},
            2: {"tangent_precision": "fp32"},
            3: {"tangent_scope": "batch"}}

# Files of older fwdkern runs that this fwdkern never loads (pickles run code when loaded).
FOREIGN = ("checkpoint.pt",)


class LayoutError(ValueError):
    """A saved run this fwdkern cannot resume (the message says what to do)."""


def migrate(state: dict, where: str, log=print) -> dict:
    """`state` in the current layout: migrated (with a notice through `log`) from an older one, or
    LayoutError for a layout newer than this fwdkern reads."""
    layout = state.get("layout", 1)
    if not isinstance(layout, int) or isinstance(layout, bool) or layout < 1:
        raise LayoutError(f"{where}: run-state layout {layout!r} is not a fwdkern layout; delete the file to start "
                          "over, or use another --out")
    if layout > LAYOUT:
        raise LayoutError(f"{where} was written by a newer fwdkern (run-state layout {layout}; this one reads up to "
                          f"{LAYOUT}): upgrade fwdkern to resume it, or use another --out")
    if layout < LAYOUT:
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        filled = {k: v for n in range(layout, LAYOUT) for k, v in PREDATES[n].items() if k not in saved}
        state = {**state, "config": {**saved, **filled}, "layout": LAYOUT}
        log(f"{where}: migrated a run saved by an older fwdkern (run-state layout {layout} -> {LAYOUT})"
            + (f"; settings it predates take the values it ran with: "
               + ", ".join(f"{k}={v!r}" for k, v in filled.items()) if filled else ""))
    return state


def foreign_files(folder: str) -> list:
    """Files of older fwdkern runs in `folder` that this fwdkern does not load."""
    return [f for f in FOREIGN if os.path.exists(os.path.join(folder, f))]
