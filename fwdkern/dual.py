"""Dual tensors: a primal plus K stacked tangents, propagated through unmodified PyTorch code.

A :class:`Dual` is a ``torch.Tensor`` subclass whose data *is* the primal (so shape,
dtype and isinstance checks in model code behave as usual) and which carries
``tangent``: ``[K, *primal.shape]``. Every torch function that receives a Dual goes
through :meth:`Dual.__torch_function__`:

* hot ops (linear, matmul, elementwise arithmetic, norms, activations, softmax,
  shape ops, scaled_dot_product_attention, ...) have explicit rules that work on the
  stacked tangent directly;
* any other op falls back to an exact generic rule, ``vmap`` over the K tangents of
  ``torch.func.jvp(op)`` (the primal is unbatched inside vmap, so it is computed once);
* an op without a forward-mode formula raises :class:`NoTangentRule` naming the op and
  the module that was executing (see :func:`track_modules`), never a silent wrong answer.

Why our own dual instead of PyTorch forward AD: tangents are plain stacked tensors, so
none of forward AD's pitfalls apply (no fwd rule for flash/mem-efficient SDPA, custom ops
without JVP registration, autograd.Function jvp dropped under compile, vmap over
autograd.Function) and our fused kernels receive ``[K, ...]`` tangents directly.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["Dual", "NoTangentRule", "make_dual", "primal", "tangent", "track_modules", "tangent_matmuls",
           "tangent_matmul_dtype", "tangent_linear", "RULES"]

_TANGENT_MM = threading.local()


@contextlib.contextmanager
def tangent_matmuls(dtype: Optional[torch.dtype]):
    """Inside, the tangents' products with a frozen (primal) weight -- ``F.linear`` and ``addmm`` of a
    tangent input -- run in `dtype` (torch.bfloat16; accumulation in fp32 inside the GEMM) and come
    back in the tangent's dtype; None keeps them in the tangent's dtype. Primals are never touched.

    A forward gradient is a random estimate whose spread dwarfs bf16 rounding: the directional
    derivatives move by about 1e-3 relative, while the GEMMs that carry K tangents through every
    layer run at the bf16 matrix units' rate (AMX on recent Xeons, tensor cores on GPUs)."""
    if dtype not in (None, torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"tangent_matmuls: dtype must be None, torch.bfloat16, torch.float16 or torch.float32, "
                         f"got {dtype!r}")
    prev = getattr(_TANGENT_MM, "dtype", None), getattr(_TANGENT_MM, "last_cast", None)
    _TANGENT_MM.dtype, _TANGENT_MM.last_cast = dtype, None
    try:
        yield
    finally:
        _TANGENT_MM.dtype, _TANGENT_MM.last_cast = prev


def tangent_matmul_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype :func:`tangent_matmuls` asks for the products of tangent `t`, or None (its own)."""
    dt = getattr(_TANGENT_MM, "dtype", None)
    return None if dt is None or dt == t.dtype or not t.is_floating_point() else dt


def tangent_linear(xt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``xt @ wᵀ`` for a stacked tangent and a primal weight, in :func:`tangent_matmuls`'s dtype
    (a tangent already in that dtype takes the weight in it too and stays in it)."""
    dt = tangent_matmul_dtype(xt)
    if dt is None:
        return _plain(F.linear, xt, w.to(xt.dtype))
    return _plain(F.linear, _cast_once(xt, dt), w.to(dt)).to(xt.dtype)


def _cast_once(xt: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """`xt` in `dt`, reusing the last cast while the same unmodified tensor comes back (the q, k and
    v projections of one input)."""
    last = getattr(_TANGENT_MM, "last_cast", None)
    if last is not None and last[0] is xt and last[1] == xt._version and last[2].dtype == dt:
        return last[2]
    xb = xt.to(dt)
    _TANGENT_MM.last_cast = (xt, xt._version, xb)
    return xb


class NoTangentRule(RuntimeError):
    """An op received a dual input but has no tangent rule (no forward-mode AD formula)."""


_state = threading.local()


def _module_stack() -> list:
    s = getattr(_state, "modules", None)
    if s is None:
        s = _state.modules = []
    return s


def current_module() -> str:
    s = _module_stack()
    return s[-1] if s else "<outside any tracked module>"


def _pop(stack, depth):
    if len(stack) > depth:
        stack.pop()
    # returns None: a forward hook's return value would replace the module output


@contextlib.contextmanager
def track_modules(model: torch.nn.Module):
    """Maintain the name of the innermost executing submodule of `model` (for error messages)."""
    stack = _module_stack()
    depth = len(stack)
    handles = []
    for name, mod in model.named_modules():
        label = f"{name or '<root>'} ({type(mod).__name__})"
        handles.append(mod.register_forward_pre_hook(lambda m, a, _l=label: stack.append(_l)))
        handles.append(mod.register_forward_hook(lambda m, a, o: _pop(stack, depth)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        del stack[depth:]


def _op_name(func) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".", 1)[1]
    mod = getattr(func, "__module__", None)
    if mod and mod not in ("torch._C", "torch._C._TensorBase") and not name.startswith("Tensor."):
        return f"{mod}.{name}"
    return name if "." in name else f"torch.{name}"


class Dual(torch.Tensor):
    """Primal (the tensor itself) + ``tangent`` [K, *shape] (same dtype/device)."""

    tangent: torch.Tensor
    _primal: torch.Tensor

    @staticmethod
    def __new__(cls, primal: torch.Tensor, tangent: torch.Tensor):
        d = torch.Tensor._make_subclass(cls, primal, False)
        d._primal = primal
        d.tangent = tangent
        return d

    def __init__(self, primal, tangent):  # attributes set in __new__
        pass

    def __repr__(self):
        return f"Dual(primal={self._primal!r}, K={self.tangent.shape[0]})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", "")
        if fname == "__get__":  # a Tensor property: .T/.mT/... are ops, .shape/.dtype/.data/... metadata
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            if attr in _TENSOR_PROPERTIES:
                return _dispatch(_PROPERTY_FUNCS[attr], args[:1], {})
            return func(*tree_map(primal, args), **tree_map(primal, kwargs))
        if func in _PASSTHROUGH or fname in _PASSTHROUGH_NAMES or func in _FACTORIES:
            # Metadata, and factories (*_like, new_*): their values do not depend on the input's value.
            return func(*tree_map(primal, args), **tree_map(primal, kwargs))
        rule = RULES.get(func)
        if rule is not None:
            out = rule(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return _dispatch(func, args, kwargs)


def make_dual(p: torch.Tensor, t: Optional[torch.Tensor]):
    """Dual(p, t), or p itself when t is None (zero tangent)."""
    if t is None:
        return p
    if isinstance(p, Dual):
        p = p._primal
    if t.shape[1:] != p.shape:
        raise AssertionError(f"tangent shape {tuple(t.shape)} does not match primal {tuple(p.shape)}")
    return Dual(p, t)


def primal(x):
    return x._primal if isinstance(x, Dual) else x


def tangent(x):
    return x.tangent if isinstance(x, Dual) else None


# ----------------------------------------------------------------------------- dispatch

_PASSTHROUGH_NAMES = {"__repr__", "__format__", "__str__", "__len__", "__bool__", "__hash__"}
_PASSTHROUGH = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride, torch.Tensor.is_contiguous,
    torch.Tensor.data_ptr, torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.__len__,
    torch.Tensor.is_complex, torch.Tensor.storage_offset, torch.Tensor.untyped_storage, torch.Tensor.item,
    torch.Tensor.tolist, torch.Tensor.get_device, torch.Tensor.nelement, torch.Tensor.ndimension,
    torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.is_floating_point, torch.is_tensor, torch.numel,
}


_TENSOR_PROPERTIES = ("T", "mT", "H", "mH", "real", "imag")
_PROPERTY_FUNCS = {a: (lambda x, _a=a: getattr(x, _a)) for a in _TENSOR_PROPERTIES}
for _a, _f in _PROPERTY_FUNCS.items():
    _f.__name__ = _f.__qualname__ = f"Tensor.{_a}"
_FACTORIES = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty,
    torch.Tensor.new_full, torch.Tensor.new_tensor,
}


def _inplace_base(func):
    """The out-of-place twin of an in-place Tensor method (``add_`` -> ``add``, ``__iadd__`` -> ``__add__``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__") and name not in ("__init__", "__index__", "__int__",
                                                                       "__invert__", "__iter__"):
        return getattr(torch.Tensor, "__" + name[3:], None)
    if name.endswith("_") and not name.endswith("__") and getattr(torch.Tensor, name, None) is func:
        return getattr(torch.Tensor, name[:-1], None)
    return None


def _dispatch(func, args, kwargs):
    flat, spec = tree_flatten((args, kwargs))
    duals = [i for i, a in enumerate(flat) if isinstance(a, Dual)]
    if not duals:
        return func(*args, **kwargs)
    if "out" in kwargs and kwargs["out"] is not None:
        raise NoTangentRule(f"{_op_name(func)}(out=...) with a dual input is not supported (in module "
                            f"{current_module()}); use the out-of-place form")
    base = _inplace_base(func)
    if base is not None:
        return _inplace(func, base, args, kwargs)
    if func is torch.Tensor.__setitem__:
        return _setitem(*args)
    return _generic(func, flat, spec, duals)


def _inplace(func, base, args, kwargs):
    self = args[0]
    if not isinstance(self, Dual):
        raise NoTangentRule(f"in-place {_op_name(func)} writes a dual value into a plain tensor (in module "
                            f"{current_module()}): its tangent would be lost")
    if self._primal._is_view():
        raise NoTangentRule(f"in-place {_op_name(func)} on a view of a dual tensor (in module {current_module()}) "
                            "is not supported: the base's tangent would not see the write")
    res = Dual.__torch_function__(base, (torch.Tensor,), args, kwargs)
    rp, rt = primal(res), tangent(res)
    with torch._C.DisableTorchFunctionSubclass():
        self._primal.copy_(rp)
    self.tangent = rt.to(self._primal.dtype).expand(rt.shape[0], *self.shape).clone() if rt is not None else \
        torch.zeros_like(self.tangent)
    return self


def _setitem(self, idx, value):
    if not isinstance(self, Dual):
        raise NoTangentRule(f"torch.Tensor.__setitem__ writes a dual value into a plain tensor (in module "
                            f"{current_module()}): its tangent would be lost")
    if isinstance(idx, Dual) or (isinstance(idx, tuple) and any(isinstance(i, Dual) for i in idx)):
        raise NoTangentRule(f"torch.Tensor.__setitem__ with a dual index (in module {current_module()})")
    if self._primal._is_view():
        raise NoTangentRule(f"torch.Tensor.__setitem__ on a view of a dual tensor (in module {current_module()}) "
                            "is not supported: the base's tangent would not see the write")
    with torch._C.DisableTorchFunctionSubclass():
        self._primal[idx] = primal(value)
    # Tangents may be broadcast views shared with other Duals: write into a private copy.
    self.tangent = self.tangent.clone(memory_format=torch.contiguous_format)
    tidx = (slice(None),) + (idx if isinstance(idx, tuple) else (idx,))
    vt = tangent(value)
    self.tangent[tidx] = 0 if vt is None else vt
    return None


def _zeros_tangent(x: torch.Tensor, K: int) -> torch.Tensor:
    return torch.zeros((1,) + tuple(x.shape), dtype=x.dtype, device=x.device).expand(K, *x.shape)


def _generic(func, flat, spec, duals):
    """Exact fallback: vmap over K of torch.func.jvp(func) w.r.t. the dual inputs."""
    prim = [primal(a) for a in flat]
    K = flat[duals[0]].tangent.shape[0]

    def f(*xs):
        vals = list(prim)
        for i, x in zip(duals, xs):
            vals[i] = x
        a, kw = tree_unflatten(vals, spec)
        return func(*a, **kw)

    primals = tuple(prim[i] for i in duals)
    tans = tuple(flat[i].tangent for i in duals)
    with torch._C.DisableTorchFunctionSubclass():
        # Non-float outputs (indices, masks) carry no tangent: compute the primal alone then.
        out_p = None
        try:
            po, to = torch.func.vmap(lambda *t: torch.func.jvp(f, primals, t), in_dims=0, out_dims=0)(*tans)
        except Exception as e:  # noqa: BLE001 - re-raised with context below
            msg = str(e)
            no_rule = ("forward AD" in msg or "forward-mode" in msg or "jvp" in msg.lower()
                       or "not implemented" in msg.lower() or isinstance(e, NotImplementedError))
            try:
                out_p = f(*primals)
            except Exception:
                out_p = None
            outs = tree_flatten(out_p)[0] if out_p is not None else []
            if out_p is not None and not any(isinstance(o, torch.Tensor) and o.is_floating_point() for o in outs):
                return out_p
            if no_rule:
                raise NoTangentRule(f"op {_op_name(func)} has no tangent rule (no forward-mode AD formula) and "
                                    f"received a dual input in module {current_module()}: {msg.splitlines()[0]}"
                                    ) from e
            raise NoTangentRule(f"op {_op_name(func)} failed under the generic tangent rule in module "
                                f"{current_module()}: {msg.splitlines()[0]}") from e

    def wrap(p, t):
        if not isinstance(p, torch.Tensor):
            return p
        p0 = p[0]
        if not p0.is_floating_point() and not p0.is_complex():
            return p0
        return Dual(p0, t)

    po_flat, pspec = tree_flatten(po)
    to_flat = tree_flatten(to)[0]
    if len(to_flat) != len(po_flat):  # tangents of non-tensors are dropped by pytree
        return tree_unflatten([p[0] if isinstance(p, torch.Tensor) else p for p in po_flat], pspec)
    return tree_unflatten([wrap(p, t) for p, t in zip(po_flat, to_flat)], pspec)


# ----------------------------------------------------------------------------- explicit rules

RULES: dict[Callable, Callable] = {}


def _register(*funcs):
    def deco(rule):
        for fn in funcs:
            RULES[fn] = rule
        return rule
    return deco


def _align(t: Optional[torch.Tensor], ndim: int) -> Optional[torch.Tensor]:
    """[K, *s] -> [K, 1.., *s] with ndim dims after K (for broadcasting against an ndim result)."""
    if t is None:
        return None
    extra = ndim - (t.dim() - 1)
    if extra > 0:
        t = t.reshape(t.shape[0], *([1] * extra), *t.shape[1:])
    return t


def _fix(out_p: torch.Tensor, t: Optional[torch.Tensor]):
    """Broadcast/cast a tangent to [K, *out.shape] and wrap."""
    if t is None:
        return out_p
    t = _align(t, out_p.dim())
    if tuple(t.shape[1:]) != tuple(out_p.shape):
        t = t.expand(t.shape[0], *out_p.shape)
    if t.dtype != out_p.dtype:
        t = t.to(out_p.dtype)
    return Dual(out_p, t)


def _shift_dim(d: int) -> int:
    return d + 1 if d >= 0 else d


def _plain(func, *args, **kwargs):
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


# --- arithmetic


def _binary_parts(a, b):
    return primal(a), primal(b), tangent(a), tangent(b)


def _add_sub(op, sign, a, b, alpha, out):
    """a + sign * alpha * b: tangent ȧ + sign * alpha * ḃ."""
    if out is not None:
        return NotImplemented
    ap, bp, at, bt = _binary_parts(a, b)
    y = _plain(op, ap, bp, alpha=alpha) if alpha != 1 else _plain(op, ap, bp)
    n = y.dim()
    if bt is not None and sign * alpha != 1:
        bt = bt * (sign * alpha)
    t = _align(at, n) if bt is None else (_align(bt, n) if at is None else _align(at, n) + _align(bt, n))
    return _fix(y, t)


@_register(torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
def _add(a, b, *, alpha=1, out=None):
    return _add_sub(torch.add, 1, a, b, alpha, out)


@_register(torch.sub, torch.Tensor.sub, torch.Tensor.__sub__)
def _sub(a, b, *, alpha=1, out=None):
    return _add_sub(torch.sub, -1, a, b, alpha, out)


@_register(torch.Tensor.__rsub__)
def _rsub(a, b):
    return _sub(b, a)


@_register(torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
def _mul(a, b, *, out=None):
    if out is not None:
        return NotImplemented
    ap, bp, at, bt = _binary_parts(a, b)
    y = _plain(torch.mul, ap, bp)
    n = y.dim()
    t = None
    if at is not None:
        t = _align(at, n) * bp
    if bt is not None:
        tb = ap * _align(bt, n)
        t = tb if t is None else t + tb
    return _fix(y, t)


@_register(torch.div, torch.Tensor.div, torch.Tensor.__truediv__)
def _div(a, b, *, rounding_mode=None, out=None):
    if out is not None or rounding_mode is not None:
        return NotImplemented
    ap, bp, at, bt = _binary_parts(a, b)
    y = _plain(torch.div, ap, bp)
    n = y.dim()
    t = None
    if at is not None:
        t = _align(at, n) / bp
    if bt is not None:
        tb = -(y / bp) * _align(bt, n)
        t = tb if t is None else t + tb
    return _fix(y, t)


@_register(torch.neg, torch.Tensor.neg, torch.Tensor.__neg__)
def _neg(a):
    return Dual(-a._primal, -a.tangent)


@_register(torch.pow, torch.Tensor.pow, torch.Tensor.__pow__)
def _pow(a, e):
    if isinstance(e, torch.Tensor) or not isinstance(a, Dual):
        return NotImplemented
    x = a._primal
    y = _plain(torch.pow, x, e)
    if e == 2:
        d = 2 * x
    elif e == 1:
        d = torch.ones_like(x)
    else:
        d = e * _plain(torch.pow, x, e - 1)
    return Dual(y, a.tangent * d)


@_register(torch.rsqrt, torch.Tensor.rsqrt)
def _rsqrt(a):
    y = _plain(torch.rsqrt, a._primal)
    return Dual(y, a.tangent * (-0.5 * y * y * y))


@_register(torch.sqrt, torch.Tensor.sqrt)
def _sqrt(a):
    y = _plain(torch.sqrt, a._primal)
    return Dual(y, a.tangent * (0.5 / y))


@_register(torch.tanh, torch.Tensor.tanh, F.tanh)
def _tanh(a):
    y = _plain(torch.tanh, a._primal)
    return Dual(y, a.tangent * (1 - y * y))


@_register(torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid)
def _sigmoid(a):
    y = _plain(torch.sigmoid, a._primal)
    return Dual(y, a.tangent * (y * (1 - y)))


@_register(torch.exp, torch.Tensor.exp)
def _exp(a):
    y = _plain(torch.exp, a._primal)
    return Dual(y, a.tangent * y)


def _make_reduce(func):
    def rule(a, dim=None, keepdim=False, *, dtype=None):
        if not isinstance(a, Dual) or dim is None:
            return NotImplemented
        return _reduce_impl(func, a, dim, keepdim, dtype)
    return rule


def _reduce_impl(func, a, dim, keepdim, dtype):
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    y = _plain(func, a._primal, dim=dims, keepdim=keepdim, dtype=dtype)
    t = _plain(func, a.tangent, dim=tuple(_shift_dim(d) for d in dims), keepdim=keepdim, dtype=dtype)
    return Dual(y, t)


for _f in (torch.mean, torch.Tensor.mean):
    RULES[_f] = _make_reduce(torch.mean)
for _f in (torch.sum, torch.Tensor.sum):
    RULES[_f] = _make_reduce(torch.sum)


# --- linear algebra


@_register(F.linear)
def _linear(x, weight, bias=None):
    xp, wp, bp = primal(x), primal(weight), primal(bias)
    xt, wt, bt = tangent(x), tangent(weight), tangent(bias)
    y = _plain(F.linear, xp, wp, bp)
    t = None
    if xt is not None:
        t = tangent_linear(xt, wp)
    if wt is not None:  # [K, out, in]: x @ wt_kᵀ
        x2 = xp.reshape(-1, xp.shape[-1])
        tw = torch.matmul(x2, wt.transpose(1, 2)).reshape(wt.shape[0], *y.shape)
        t = tw if t is None else t + tw
    if bt is not None:
        tb = _align(bt, y.dim())
        t = tb if t is None else t + tb
    return _fix(y, t)


@_register(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)
def _matmul(a, b):
    ap, bp, at, bt = _binary_parts(a, b)
    if ap.dim() < 2 or bp.dim() < 2:
        return NotImplemented
    y = _plain(torch.matmul, ap, bp)
    n = max(ap.dim(), bp.dim())  # K must not broadcast against the other operand's batch dims
    t = None
    if at is not None:
        t = torch.matmul(_align(at, n), bp)
    if bt is not None:
        tb = torch.matmul(ap, _align(bt, n))
        t = tb if t is None else t + tb
    return _fix(y, t)


@_register(torch.addmm, torch.Tensor.addmm)
def _addmm(inp, m1, m2, *, beta=1, alpha=1):
    """beta·inp + alpha·m1 @ m2 (HF Conv1D)."""
    ip, ap, bp = primal(inp), primal(m1), primal(m2)
    it, at, bt = tangent(inp), tangent(m1), tangent(m2)
    y = _plain(torch.addmm, ip, ap, bp, beta=beta, alpha=alpha)
    t = None
    if at is not None:
        t = tangent_linear(at, bp.t())
    if bt is not None:
        tb = torch.matmul(ap, bt)
        t = tb if t is None else t + tb
    if t is not None and alpha != 1:
        t = t * alpha
    if it is not None:
        ti = _align(it, 2) * beta
        t = ti if t is None else t + ti
    return _fix(y, t)


# --- activations, softmax, norms


@_register(F.softmax, torch.softmax, torch.Tensor.softmax)
def _softmax(x, dim=None, _stacklevel=3, dtype=None):
    if dim is None or not isinstance(x, Dual):
        return NotImplemented
    xp = x._primal if dtype is None else x._primal.to(dtype)
    xt = x.tangent if dtype is None else x.tangent.to(dtype)
    y = _plain(torch.softmax, xp, dim)
    d = _shift_dim(dim)
    return Dual(y, y * (xt - (y * xt).sum(d, keepdim=True)))


@_register(F.silu)
def _silu(x, inplace=False):
    xp = x._primal
    s = torch.sigmoid(xp)
    return Dual(xp * s, x.tangent * (s * (1 + xp * (1 - s))))


@_register(F.relu, torch.relu, torch.Tensor.relu)
def _relu(x, inplace=False):
    xp = x._primal
    return Dual(_plain(torch.relu, xp), x.tangent * (xp > 0).to(xp.dtype))


@_register(F.gelu)
def _gelu(x, approximate="none"):
    xp = x._primal
    y = _plain(F.gelu, xp, approximate=approximate)
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        u = c * (xp + 0.044715 * xp ** 3)
        th = torch.tanh(u)
        d = 0.5 * (1 + th) + 0.5 * xp * (1 - th * th) * c * (1 + 3 * 0.044715 * xp * xp)
    else:
        d = 0.5 * (1 + torch.erf(xp * (1 / math.sqrt(2)))) + xp * torch.exp(-0.5 * xp * xp) / math.sqrt(2 * math.pi)
    return Dual(y, x.tangent * d)


@_register(F.layer_norm)
def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if not isinstance(x, Dual) or isinstance(weight, Dual) or isinstance(bias, Dual):
        return NotImplemented
    xp, xt = x._primal, x.tangent
    dims = tuple(range(-len(normalized_shape), 0))
    low = xp.dtype in (torch.float16, torch.bfloat16)  # statistics in fp32 for low precision
    xf = xp.float() if low else xp
    mu = xf.mean(dims, keepdim=True)
    var = xf.var(dims, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mu) * rstd
    y = _plain(F.layer_norm, xp, normalized_shape, weight, bias, eps)
    tf = xt.float() if low else xt
    tc = tf - tf.mean(dims, keepdim=True)
    t = (tc - xhat * (tc * xhat).mean(dims, keepdim=True)) * rstd
    if weight is not None:
        t = t * weight
    return Dual(y, t.to(xp.dtype))


def _dropout(x, p=0.5, training=True, inplace=False):
    if training and p > 0:
        raise NoTangentRule(f"dropout in training mode (p={p}) with a dual input in module {current_module()}: "
                            "call model.eval() (fwdkern.jvp does)")
    return x


RULES[F.dropout] = _dropout
RULES[torch.dropout] = lambda x, p, train: _dropout(x, p, train)


# --- shape ops (linear: the tangent goes through the same op with K prepended)


def _same_order(method):
    """Ops that keep row-major element order: tangent = tangent.reshape(K, *out.shape)."""
    def rule(x, *args, **kwargs):
        if not isinstance(x, Dual) or any(isinstance(a, Dual) for a in tree_flatten((args, kwargs))[0]):
            return NotImplemented
        y = _plain(method, x._primal, *args, **kwargs)
        return Dual(y, x.tangent.reshape(x.tangent.shape[0], *y.shape))
    return rule


for _f in (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
           torch.Tensor.unflatten, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze, torch.unsqueeze,
           torch.Tensor.view_as, torch.Tensor.reshape_as):
    RULES[_f] = _same_order(_f)


def _view_rule(x, *args, **kwargs):
    if len(args) == 1 and isinstance(args[0], torch.dtype) or "dtype" in kwargs:
        return NotImplemented
    return _same_order(torch.Tensor.view)(x, *args, **kwargs)


RULES[torch.Tensor.view] = _view_rule


def _elementwise_same(method):
    """Ops applied identically to primal and tangent (casts, copies)."""
    def rule(x, *args, **kwargs):
        if not isinstance(x, Dual) or any(isinstance(a, Dual) for a in tree_flatten((args, kwargs))[0]):
            return NotImplemented
        y = _plain(method, x._primal, *args, **kwargs)
        if not y.is_floating_point():
            return y
        t = _plain(method, x.tangent, *args, **kwargs)
        return Dual(y, t.to(y.dtype) if t.dtype != y.dtype else t)
    return rule


for _f in (torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.float, torch.Tensor.half,
           torch.Tensor.bfloat16, torch.Tensor.double):
    RULES[_f] = _elementwise_same(_f)


def _to(x, *args, **kwargs):
    if not isinstance(x, Dual) or any(isinstance(a, Dual) for a in tree_flatten((args, kwargs))[0]):
        return NotImplemented
    y = _plain(torch.Tensor.to, x._primal, *args, **kwargs)
    if not y.is_floating_point():
        return y
    t = x.tangent.to(device=y.device, dtype=y.dtype)
    return Dual(y, t)


RULES[torch.Tensor.to] = _to
RULES[torch.Tensor.type_as] = lambda x, other: _to(x, primal(other).dtype) if isinstance(x, Dual) else NotImplemented


@_register(torch.Tensor.transpose, torch.transpose)
def _transpose(x, d0, d1):
    if not isinstance(x, Dual):
        return NotImplemented
    return Dual(_plain(torch.transpose, x._primal, d0, d1),
                x.tangent.transpose(_norm1(d0, x.dim()), _norm1(d1, x.dim())))


def _norm1(d, n):
    return (d % n) + 1 if n else 1


@_register(torch.Tensor.permute, torch.permute)
def _permute(x, *dims):
    if not isinstance(x, Dual):
        return NotImplemented
    if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = tuple(dims[0])
    n = x.dim()
    return Dual(_plain(torch.permute, x._primal, dims), x.tangent.permute(0, *[_norm1(d, n) for d in dims]))


@_register(torch.Tensor.expand)
def _expand(x, *sizes):
    if not isinstance(x, Dual):
        return NotImplemented
    y = _plain(torch.Tensor.expand, x._primal, *sizes)
    return Dual(y, _align(x.tangent, y.dim()).expand(x.tangent.shape[0], *y.shape))


@_register(torch.Tensor.expand_as)
def _expand_as(x, other):
    return _expand(x, primal(other).shape)


def _getitem(x, idx):
    if not isinstance(x, Dual):
        return NotImplemented
    if isinstance(idx, Dual) or (isinstance(idx, tuple) and any(isinstance(i, Dual) for i in idx)):
        return NotImplemented
    y = _plain(torch.Tensor.__getitem__, x._primal, idx)
    tidx = (slice(None),) + (idx if isinstance(idx, tuple) else (idx,))
    t = x.tangent[tidx]
    if tuple(t.shape[1:]) != tuple(y.shape):  # an index form that does not commute with a leading dim
        return NotImplemented
    return Dual(y, t)


RULES[torch.Tensor.__getitem__] = _getitem


@_register(torch.cat, torch.concat, torch.concatenate)
def _cat(tensors, dim=0, *, out=None):
    if out is not None:
        return NotImplemented
    # torch.cat skips legacy empty 1-D tensors; so do we.
    tensors = [t for t in tensors if not (t.dim() == 1 and t.shape[0] == 0)]
    K = next(t.tangent.shape[0] for t in tensors if isinstance(t, Dual))
    y = _plain(torch.cat, [primal(t) for t in tensors], dim)
    ts = [t.tangent if isinstance(t, Dual) else _zeros_tangent(t, K) for t in tensors]
    return Dual(y, torch.cat(ts, _shift_dim(dim)))


@_register(torch.stack)
def _stack(tensors, dim=0, *, out=None):
    if out is not None:
        return NotImplemented
    tensors = list(tensors)
    K = next(t.tangent.shape[0] for t in tensors if isinstance(t, Dual))
    y = _plain(torch.stack, [primal(t) for t in tensors], dim)
    ts = [t.tangent if isinstance(t, Dual) else _zeros_tangent(t, K) for t in tensors]
    return Dual(y, torch.stack(ts, dim + 1 if dim >= 0 else dim))


def _splitter(method):
    def rule(x, arg, dim=0):
        if not isinstance(x, Dual):
            return NotImplemented
        ys = _plain(method, x._primal, arg, dim)
        ts = method(x.tangent, arg, _shift_dim(dim))
        return tuple(Dual(y, t) for y, t in zip(ys, ts))
    return rule


for _f in (torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk):
    RULES[_f] = _splitter(_f)


@_register(torch.Tensor.unbind, torch.unbind)
def _unbind(x, dim=0):
    if not isinstance(x, Dual):
        return NotImplemented
    ys = _plain(torch.unbind, x._primal, dim)
    return tuple(Dual(y, t) for y, t in zip(ys, torch.unbind(x.tangent, _shift_dim(dim))))


# --- attention


@_register(F.scaled_dot_product_attention)
def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if isinstance(attn_mask, Dual):
        return NotImplemented
    if dropout_p > 0:
        raise NoTangentRule(f"scaled_dot_product_attention with dropout_p={dropout_p} and dual inputs in module "
                            f"{current_module()}: call model.eval()")
    from .ops.attention import dual_attention

    o, ot = dual_attention(primal(query), primal(key), primal(value), tangent(query), tangent(key), tangent(value),
                           attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                           tangent_dtype=next((tangent_matmul_dtype(t) for t in (tangent(query), tangent(key),
                                                                                   tangent(value)) if t is not None),
                                              None))
    return make_dual(o, ot)


# --- quantized frozen linear layers (fwdkern.nn.QuantLinear)


def _quant_linear(x, weight, bias=None):
    """y = x Wqᵀ + b; ẏ_k = ẋ_k Wqᵀ (+ ḃ_k for a trainable bias): the primal and every tangent row
    in one quant_linear_dual call (the backend reads the quantized weight once for all of them)."""
    from .ops.quant import quant_linear_dual

    xp, bp, xt, bt = primal(x), primal(bias), tangent(x), tangent(bias)
    y, t = quant_linear_dual(xp, xt, weight, bp)
    if bt is not None:
        tb = _align(bt, y.dim())
        t = tb if t is None else t + tb
    return _fix(y, t)


def _register_quant_rule():
    from .ops.quant import quant_linear

    RULES[quant_linear] = _quant_linear


_register_quant_rule()
