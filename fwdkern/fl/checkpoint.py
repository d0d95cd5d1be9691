"""Run state on disk: atomic writes, checkpoints that cannot run code, and one run per folder.

A checkpoint is a safetensors file: the tensors, plus the rest of the state as JSON in the
header metadata, plus a SHA-256 over both (``fwdkern.sha256``). Loading never unpickles
anything, and any flipped, missing or extra byte gives :class:`CorruptCheckpoint`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile

import torch

FORMAT = "fwdkern-checkpoint-1"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is unreadable, truncated, tampered with or of another format."""


class RunLocked(RuntimeError):
    """Another process holds the output folder of a run."""


# ---------------------------------------------------------------------- fault injection (tests)
_FAIL_HITS: dict = {}


def failpoint(name: str):
    """Test hook: with FWDKERN_FAILPOINT="name@n" the process kills itself (SIGKILL, as a power
    cut would) at the n-th time it reaches `name`. Without the variable this is a no-op."""
    spec = os.environ.get("FWDKERN_FAILPOINT")
    if not spec:
        return
    want, _, n = spec.partition("@")
    if want != name:
        return
    _FAIL_HITS[name] = _FAIL_HITS.get(name, 0) + 1
    if _FAIL_HITS[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------- atomic writes
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
        failpoint("before-rename")
        os.replace(tmp, dest)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(dest: str, data: bytes):
    """Write `data` to `dest` atomically (fsync'd before the rename)."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            failpoint("mid-write")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------- checkpoints
def _encode(obj, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("checkpoint state: dict keys must be str")
        if "__tensor__" in obj:
            raise TypeError("checkpoint state: '__tensor__' is a reserved key")
        return {k: _encode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: {type(obj).__name__} cannot be stored (plain containers and tensors only)")


def _decode(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _digest(header: str, tensors: dict) -> str:
    h = hashlib.sha256(header.encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{str(t.dtype)}:{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str, state: dict):
    """Write `state` (nested dict/list/str/int/float/bool/None and tensors) atomically."""
    from safetensors.torch import save

    tensors: dict = {}
    header = json.dumps(_encode(state, tensors), allow_nan=True, separators=(",", ":"))
    meta = {"format": FORMAT, "fwdkern.state": header, "fwdkern.sha256": _digest(header, tensors)}
    write_atomic(path, save(tensors, metadata=meta))


def load_checkpoint(path: str) -> dict:
    """The state saved by :func:`save_checkpoint`; CorruptCheckpoint when the file is not exactly that."""
    from safetensors.torch import load

    try:
        with open(path, "rb") as f:
            data = f.read()
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("truncated header")
        meta = json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        tensors = load(data)
        for key, t in tensors.items():
            if str(t.dtype).replace("torch.", "") not in _DTYPES:
                raise ValueError(f"tensor {key}: dtype {t.dtype} not allowed")
        header = meta["fwdkern.state"]
        if _digest(header, tensors) != meta.get("fwdkern.sha256"):
            raise ValueError("SHA-256 mismatch (the file was modified or damaged)")
        return _decode(json.loads(header), tensors)
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 -- every way a file can be wrong is "corrupt" to the user
        raise CorruptCheckpoint(f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e)[:200]}); delete it to "
                                "start over, or use another --out") from None


# ---------------------------------------------------------------------- one run per folder
class RunLock:
    """An exclusive lock on a run's output folder (released when the process ends, even by kill -9)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, ".fwdkern.lock")
        self.fd = None

    def __enter__(self):
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise RunLocked(f"{self.folder} is in use by another fwdkern run (pid {holder}); wait for it to finish "
                            "or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
        return False
