"""fwdkern.dual: each explicit tangent rule (and the generic fallback) against torch.func.jvp,
and the in-place / aliasing rules."""
import pytest
import torch
import torch.nn.functional as F

from fwdkern.dual import Dual, NoTangentRule

_x = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
RULE_CASES = {
    "linear": (lambda x, w: F.linear(x, w, torch.ones(5, dtype=torch.float64)), [(2, 3, 4), (5, 4)]),
    "matmul_bcast": (lambda a, b: a @ b, [(2, 3, 4), (4, 6)]),
    "bmm": (torch.bmm, [(2, 3, 4), (2, 4, 5)]),
    "addmm": (lambda b, x, w: torch.addmm(b, x, w), [(5,), (3, 4), (4, 5)]),
    "add_sub_bcast": (lambda a, b: (a + b) - 2.0 * b + torch.sub(a, b, alpha=3), [(2, 3, 4), (4,)]),
    "mul_div_rsub": (lambda a, b: a * b / (b * b + 1) + (1 - a) / 2, [(3, 4), (3, 1)]),
    "pow_rsqrt_mean": (lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), [(3, 5)]),
    "sum_sqrt_exp_tanh_sigmoid": (lambda x: torch.sqrt(x.exp().sum((0, -1))) + torch.tanh(x).sigmoid().sum(1),
                                  [(3, 4)]),
    "softmax": (lambda x: F.softmax(x, dim=-1) + x.softmax(1), [(2, 3, 4)]),
    "silu_relu_gelu": (lambda x: F.silu(x) + F.relu(x) + F.gelu(x) + F.gelu(x, approximate="tanh"), [(3, 7)]),
    "layer_norm": (lambda x: F.layer_norm(x, (6,), torch.linspace(0.5, 2, 6, dtype=torch.float64),
                                          torch.ones(6, dtype=torch.float64)), [(2, 3, 6)]),
    "shapes": (lambda x: x.view(2, 12).reshape(4, 6).transpose(0, 1).permute(1, 0).unsqueeze(1).flatten(1)
               .unflatten(1, (2, 3)).squeeze(0).contiguous().expand(2, 4, 2, 3)[..., 1:].to(torch.float64),
               [(2, 3, 4)]),
    "getitem_adv": (lambda x: x[:, torch.tensor([2, 0])][torch.tensor([True, False, True])]
                    + x[torch.tensor([True, False, True])][:, :2], [(3, 4)]),
    "cat_stack_split": (lambda a, b: torch.cat([a, b], -1).split(2, dim=1)[1] + torch.stack([a, b], 1).chunk(2, 1)[0]
                        .squeeze(1)[:, :2] + sum(torch.unbind(a, 1))[:, None], [(3, 2), (3, 2)]),
    "generic_fallback": (lambda x: torch.cumsum(torch.special.erf(x), 1) + torch.logsumexp(x, -1, keepdim=True),
                         [(3, 4)]),
    "properties_factories": (lambda a, b: a.mT @ b.T + torch.zeros_like(a).sum() + a.new_ones(()), [(4, 3), (2, 4)]),
    "masked_fill_inplace": (lambda x: x.clone().masked_fill_(torch.eye(3, 4, dtype=torch.bool), 0).add_(x), [(3, 4)]),
}


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_dual_rules_match_forward_ad(name):
    torch.manual_seed(0)
    f, shapes = RULE_CASES[name]
    prims = [_x(*s) for s in shapes]
    tans = [_x(3, *s) for s in shapes]
    out = f(*[Dual(p, t) for p, t in zip(prims, tans)])
    ref_p, ref_t = torch.func.vmap(lambda *t: torch.func.jvp(f, tuple(prims), t), out_dims=(None, 0))(*tans)
    assert isinstance(out, Dual)
    torch.testing.assert_close(out._primal, ref_p)
    torch.testing.assert_close(out.tangent, ref_t)


def test_dual_setitem_copies_shared_tangent():
    a = Dual(_x(3, 4), _x(2, 3, 4))
    y = a + _x(3, 4)  # y.tangent is a's tangent (broadcast, shared)
    before = a.tangent.clone()
    y[1] = Dual(_x(4), _x(2, 4))
    assert torch.equal(a.tangent, before)
    torch.testing.assert_close(y.tangent[:, 0], before[:, 0])


def test_dual_inplace_on_view_and_into_plain_raise():
    d = Dual(_x(3, 4), _x(2, 3, 4))
    with pytest.raises(NoTangentRule, match="view"):
        d[0].add_(1.0)
    with pytest.raises(NoTangentRule, match="plain tensor"):
        _x(3, 4).add_(d)


def test_tangent_linear_reuses_a_cast_only_while_its_tensor_is_unchanged():
    """Under tangent_matmuls(bf16) the q, k and v projections of one tangent share its bf16 copy; a
    tangent modified in place (its version moves) or a new tensor is cast again, so a stale copy is
    never read. Outside the context nothing is kept."""
    from fwdkern.dual import tangent_linear, tangent_matmuls

    g = torch.Generator().manual_seed(0)
    xt, w = torch.randn(3, 5, 16, generator=g), torch.randn(8, 16, generator=g)
    exact = xt @ w.t()
    with tangent_matmuls(torch.bfloat16):
        a = tangent_linear(xt, w)
        assert a.dtype == torch.float32 and (a - exact).abs().max() < 5e-2 * exact.abs().max()
        assert torch.equal(tangent_linear(xt, w), a)
        xt.mul_(2)
        torch.testing.assert_close(tangent_linear(xt, w), 2 * a)
        other = xt.clone().neg_()
        torch.testing.assert_close(tangent_linear(other, w), -2 * a)
    from fwdkern import dual
    assert getattr(dual._TANGENT_MM, "last_cast", None) is None
    assert torch.equal(tangent_linear(xt, w), xt @ w.t())  # fp32 outside
