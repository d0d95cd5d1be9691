"""The body guard (fwdkern.fl.guard): a body step is taken only when the clients measure that it does not
raise their loss; the decision is recorded; clients holding the model stay bit-identical to the server."""
import json
import math

import pytest
import torch

import fwdkern
from fwdkern.fl import FedAdam, SGD
from fwdkern.fl.guard import Guard
from fwdkern.fl.protocol import Update
from fwdkern.fl.server import Server
from fwdkern.fl.sync import Replica

SHAPES = {"a": (16, 8), "b": (8, 16), "head": (5,)}


def test_the_guard_never_accepts_a_step_that_raises_the_measured_loss_beyond_its_tolerance():
    """Synthetic measurements: (sample weight, loss without, loss with the proposed step)."""
    for tol in (0.0, 0.01):
        g = Guard(tolerance=tol)
        for w, base, probe in [(8, 1.0, 1.0 + 2 * tol + 1e-3), (3, 2.0, 2.0 * (1 + tol) * 1.001)]:
            d = g.decide([(w, base, probe), (5, base, probe)])
            assert not d.accepted and d.delta > tol
        # a mix: one client better, the weighted mean worse -> rejected
        d = g.decide([(1, 1.0, 0.5), (9, 1.0, 1.0 + 0.1 + tol)])
        assert not d.accepted and d.delta == pytest.approx((0.05 + 0.9 * (1.1 + tol)) - 1.0)
        d = g.decide([(4, 1.0, 0.99), (4, 2.0, 2.0)])
        assert d.accepted and d.delta < 0
    g = Guard()
    assert [g.decide([(1, 1.0, 2.0)]).scale for _ in range(6)] == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert g.decide([(1, 1.0, 0.5)]).accepted and g.scale == 0.125  # accepted: the next proposal doubles
    # nothing measured (every client's probe loss missing or non-finite): not taken
    assert not g.decide([(1, 1.0, None), (2, float("nan"), 1.0), (3, 1.0, math.inf)]).accepted


def _server(guard=True, opt=None, K=4):
    g = torch.Generator().manual_seed(123)
    params = {n: torch.zeros(s) for n, s in SHAPES.items()}
    target = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    ids = {n: i + 100 for i, n in enumerate(SHAPES)}
    return Server(params, ids, opt or SGD(0.05), perturbations_per_client=K, guard=Guard() if guard else None), target


def _loss(params, target):
    return 0.5 * sum(float(((params[n] - target[n]) ** 2).sum()) for n in params)


def _round(server, target, probe_scale=1.0, clients=("c0", "c1", "c2")):
    """One round of honest clients on L = 1/2 |theta - target|^2; each reports its loss with the pending
    proposal times `probe_scale` (1: honestly)."""
    plans = server.plan_round(list(clients))
    for c, plan in plans.items():
        jv = []
        for k in plan.ks:
            jv.append(sum(float(fwdkern.seeded_dot(server.params[server.names_by_id[pid]] - target[server.names_by_id[pid]],
                                                   plan.seed, pid, [k])[0]) for pid in plan.param_ids))
        base = _loss(server.params, target)
        extra = {}
        if plan.probe:
            probe = {**server.params, **server.pending["params"]}
            extra["probe_loss"] = _loss(probe, target) * probe_scale
        assert server.submit(Update(c, plan.round, plan.model_version, plan.ks, tuple(jv), 8, base, extra=extra))
    return server.finish_round()


def test_a_rejected_proposal_changes_nothing_and_an_accepted_one_is_exactly_the_proposal():
    server, target = _server()
    first = _round(server, target)  # no proposal yet: nothing to decide, the first one is made
    assert first.guard is None and server.pending is not None and server.model_version == 0  # (no head to step)
    before = {n: p.clone() for n, p in server.params.items()}
    proposal = {n: t.clone() for n, t in server.pending["params"].items()}
    res = _round(server, target, probe_scale=1.5)  # the clients measure a higher loss with it
    assert res.guard == "rejected" and res.guard_delta > 0 and res.guard_scale == 1.0
    assert all(torch.equal(server.params[n], before[n]) for n in proposal)  # the body did not move
    assert server.guard.scale == 0.5  # the next proposal is made at half the lr
    proposal = {n: t.clone() for n, t in server.pending["params"].items()}
    res = _round(server, target)  # honest: the step lowers the loss
    assert res.guard == "accepted" and res.guard_delta < 0 and res.guard_scale == 0.5
    assert all(torch.equal(server.params[n], proposal[n]) for n in proposal)


@pytest.mark.parametrize("opt", [lambda: SGD(0.05), lambda: FedAdam(0.05)], ids=["sgd", "fedadam"])
def test_clients_stay_bit_identical_through_taken_and_rejected_proposals(opt):
    """Downloads under the guard: committed steps carry the body terms of the proposal they took (with its
    optimizer step count and lr scale); the client's preview of a pending proposal equals the server's."""
    server, target = _server(opt=opt())
    client = Replica.fresh({n: p.clone() for n, p in server.params.items()}, server.param_ids)
    for i in range(12):
        _round(server, target, probe_scale=1.5 if i % 3 == 1 else 1.0)
        if i in (2, 5, 11):
            msg = server.sync_message(client.version)
            client.apply(msg)
            assert all(torch.equal(client.params[n], server.params[n]) for n in SHAPES)
            if msg.probe is not None:
                preview = client.preview(msg.probe, msg.dist)
                assert all(torch.equal(preview[n], server.pending["params"][n]) for n in preview)
    assert any(h is False for h in server.guard.history) and any(server.guard.history)


def test_a_run_whose_body_steps_all_raise_the_loss_keeps_the_body_where_it_was(tmp_path):
    """With a body lr so large that every proposal raises the clients' loss, the guard takes none: the body
    tensors end exactly at their initial values, every decision is recorded, and the exactly trained head
    reaches the head-only run's accuracy."""
    pytest.importorskip("transformers")
    from fwdkern.fl.config import RunConfig
    from fwdkern.fl.simulation import build
    from _tiny_models import declare_mean_pooling, save_learnable

    (tmp_path / "m").mkdir()
    d = declare_mean_pooling(save_learnable(tmp_path / "m"))
    base = dict(model=str(d), data=str(d / "data.csv"), text_column="sentence", label_column="sentiment",
                clients=8, clients_per_round=4, rounds=6, max_length=12, eval_every=3, max_test=40, num_threads=1,
                checkpoint_every=0)
    h = build(RunConfig(out=str(tmp_path / "head"), **base), log=lambda *a: None).run()
    guarded = build(RunConfig(out=str(tmp_path / "guarded"), perturbations=4, optimizer="sgd", lr=1e4,
                              **dict(base, rounds=14)), log=lambda *a: None)
    assert guarded.cfg.guard == "on"  # the recipe's choice when the body trains
    initial = guarded.server.weights()
    g = guarded.run()
    # ten rejected proposals: the body has not paid, so it stops (no more tangents; the head goes on)
    assert [r.guard for r in guarded.metrics[1:11]] == ["rejected"] * 9 + ["stopped"]
    assert all(r.guard_delta > 0 for r in guarded.metrics[1:11]) and guarded.metrics[10].guard_scale == 1 / 16
    assert [r.tangents_per_client for r in guarded.metrics] == [4] * 10 + [0] * 4
    assert all(r.guard is None for r in guarded.metrics[11:]) and len(guarded.metrics) == 14
    body = [n for n in initial if n not in guarded.task.head_names]
    assert body and all(torch.equal(guarded.server.params[n], initial[n]) for n in body)
    assert g["final"]["accuracy"] >= h["final"]["accuracy"] - 0.05
    rows = [json.loads(line) for line in open(tmp_path / "guarded" / "metrics.jsonl")]
    assert [r.get("guard") for r in rows] == [None] + ["rejected"] * 9 + ["stopped"] + [None] * 3
