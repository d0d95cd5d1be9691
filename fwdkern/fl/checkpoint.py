"""Run state on disk: atomic writes and checkpoints."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch


@contextlib.contextmanager
def atomic_path(dest: str, directory: bool = False):
    """Yield a temporary path next to `dest`; on success it replaces `dest` in one rename,
    so a reader (or a resumed run after a crash) sees the old or the new content, never half."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(dest)
    if directory:
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.tmp-")
    else:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{base}.tmp-")
        os.close(fd)
    try:
        yield tmp
        if directory and os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: str, state: dict):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str) -> dict:
    return torch.load(path, weights_only=False)
