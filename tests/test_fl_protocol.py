"""Federated protocol logic on a synthetic objective with exact directional derivatives.

Clients minimise L(theta) = 1/2 ||theta - theta*_client||^2; the exact jvp along
v(seed, pid, k) is seeded_dot(theta - theta*, seed, pid, k): no model needed.
"""
import math

import pytest
import torch

import fwdkern
from fwdkern.fl import SGD, FedAdam, FedYogi, LRSchedule, RoundPlan, Server, Update, split_groups
from fwdkern.fl.pacing import VariancePacing
from fwdkern._seed import derive_seed
from fwdkern.fl.sync import Replica

SHAPES = {"a": (16, 8), "b": (8, 16), "head": (5,)}


def make(seed=0, **kw):
    g = torch.Generator().manual_seed(123)
    params = {n: torch.zeros(s) for n, s in SHAPES.items()}
    target = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    ids = {n: i + 100 for i, n in enumerate(SHAPES)}
    opt = kw.pop("optimizer", None) or SGD(0.05)
    return Server(params, ids, opt, seed=seed, **kw), target


def client_update(server, plan, target, noise=0.0):
    """What a client computes: mean over its perturbations of grad . v (perturbed tensors only)."""
    jvps = []
    for k in plan.ks:
        j = 0.0
        for pid in plan.param_ids:
            name = server.names_by_id[pid]
            diff = server.params[name] - target[name]
            j += float(fwdkern.seeded_dot(diff, plan.seed, pid, [k])[0])
        jvps.append(j + noise)
    loss = 0.5 * sum(float(((server.params[n] - target[n]) ** 2).sum()) for n in server.params)
    return Update(plan.client_id, plan.round, plan.model_version, plan.ks, tuple(jvps), 8, loss)


def loss_of(server, target):
    return 0.5 * sum(float(((server.params[n] - target[n]) ** 2).sum()) for n in server.params)


def run_rounds(server, target, rounds, clients=("c0", "c1", "c2", "c3")):
    infos = []
    for _ in range(rounds):
        plans = server.plan_round(list(clients))
        for c, plan in plans.items():
            assert server.submit(client_update(server, plan, target))
        infos.append(server.finish_round())
    return infos


@pytest.mark.parametrize("opt", [lambda: SGD(0.02), lambda: SGD(0.01, momentum=0.5),
                                 lambda: FedAdam(0.05), lambda: FedYogi(0.05)])
def test_loss_decreases(opt):
    server, target = make(optimizer=opt(), perturbations_per_client=4)
    start = loss_of(server, target)
    run_rounds(server, target, 30)
    assert loss_of(server, target) < 0.7 * start


def test_gradient_estimate_is_unbiased_direction():
    # Many perturbations: the estimate aligns with the true gradient.
    server, target = make(perturbations_per_client=64)
    plans = server.plan_round(["c0", "c1"])
    for plan in plans.values():
        server.submit(client_update(server, plan, target))
    grads, var, _, count, _ = server._estimate([(plans, server.accepted)])
    assert count == 128 and var is not None and var > 0
    g = torch.cat([grads[n].flatten() for n in SHAPES])
    true = torch.cat([(server.params[n] - target[n]).flatten() for n in SHAPES])
    cos = float(g @ true / (g.norm() * true.norm()))
    assert cos > 0.5


def test_update_size_is_small():
    server, target = make(perturbations_per_client=4)
    plan = server.plan_round(["c0"])["c0"]
    upd = client_update(server, plan, target)
    assert upd.nbytes < 1024
    assert Update.from_bytes(upd.to_bytes()) == upd
    assert RoundPlan.from_config(plan.to_config()) == plan
    assert plan.seed >= 0 and plan.to_config()["seed_hi"] < 2**32


@pytest.mark.parametrize("mutate,reason", [
    (lambda u: u.__class__(**{**u.__dict__, "jvps": (float("nan"),) + u.jvps[1:]}), "non-finite"),
    (lambda u: u.__class__(**{**u.__dict__, "jvps": (float("inf"),) + u.jvps[1:]}), "non-finite"),
    (lambda u: u.__class__(**{**u.__dict__, "round": u.round - 1}), "late"),
    (lambda u: u.__class__(**{**u.__dict__, "model_version": 99}), "stale"),
    (lambda u: u.__class__(**{**u.__dict__, "ks": tuple(k + 1 for k in u.ks)}), "ks"),
    (lambda u: u.__class__(**{**u.__dict__, "jvps": u.jvps[:-1]}), "jvps"),
    (lambda u: u.__class__(**{**u.__dict__, "client_id": "intruder"}), "not sampled"),
    (lambda u: u.__class__(**{**u.__dict__, "num_samples": 0}), "num_samples"),
    (lambda u: u.__class__(**{**u.__dict__, "extra": {"pad": "x" * 100000}}), "oversized"),
    (lambda u: b"{not json", "malformed"),
])
def test_validation_rejects(mutate, reason):
    server, target = make(perturbations_per_client=2)
    plan = server.plan_round(["c0", "c1"])["c0"]
    before = {n: p.clone() for n, p in server.params.items()}
    assert not server.submit(mutate(client_update(server, plan, target)))
    assert reason in server.rejections[-1]["reason"]
    info = server.finish_round()  # nothing valid arrived: no step, state intact
    assert info.stepped is False
    assert all(torch.equal(before[n], server.params[n]) for n in before)


def test_duplicate_and_outlier_updates_rejected():
    server, target = make(perturbations_per_client=4)
    run_rounds(server, target, 3)  # builds the jvp history for the robust bound
    plans = server.plan_round(["c0", "c1"])
    good = client_update(server, plans["c0"], target)
    assert server.submit(good)
    assert not server.submit(good)
    assert "duplicate" in server.rejections[-1]["reason"]
    plans = server.plan_round(["c0", "c1", "c2", "c3"])
    for c in ("c0", "c1", "c2"):
        assert server.submit(client_update(server, plans[c], target))
    assert server.submit(client_update(server, plans["c3"], target, noise=1e6))  # well-formed but poisoned
    before = {n: p.clone() for n, p in server.params.items()}
    info = server.finish_round()
    assert info.stepped and info.accepted == 3
    assert "robust bound" in server.rejections[-1]["reason"] and server.rejections[-1]["client"] == "c3"
    # The step used only the honest updates: it moved the tensors by a sane amount.
    assert max(float((server.params[n] - before[n]).abs().max()) for n in before) < 10.0


def test_stragglers_and_dropouts():
    server, target = make(perturbations_per_client=2)
    plans = server.plan_round(["c0", "c1", "c2"])
    server.submit(client_update(server, plans["c0"], target))  # c1, c2 never answer
    info = server.finish_round()
    assert info.stepped and info.accepted == 1
    # c1's late answer to the old round is rejected.
    assert not server.submit(client_update(server, plans["c1"], target))


def test_split_more_clients_than_groups():
    groups = [[1, 2], [3, 4]]
    out = split_groups(groups, [f"c{i}" for i in range(5)], round_index=0, shared=[9])
    assert all(len(v) == 3 and v[0] == 9 for v in out.values())
    covered = {p for v in out.values() for p in v}
    assert covered == {1, 2, 3, 4, 9}
    out2 = split_groups([[i] for i in range(6)], ["a", "b"], round_index=1)
    assert sorted(p for v in out2.values() for p in v) == list(range(6))
    assert [len(v) for v in out2.values()] == [3, 3]
    assert split_groups([], ["a"], 0) == {"a": ()}


def test_contiguous_split_deals_each_client_one_block_of_consecutive_groups():
    # fwdkern's --split: every group dealt exactly once per round, each client a run of neighbours (a block of
    # layers, so its tangents start at its block), the blocks rotating over the rounds.
    groups = [[i] for i in range(7)]
    clients = ["a", "b", "c"]
    seen = {c: set() for c in clients}
    for r in range(3):
        out = split_groups(groups, clients, round_index=r, shared=[9], contiguous=True)
        body = {c: [p for p in v if p != 9] for c, v in out.items()}
        assert sorted(p for v in body.values() for p in v) == list(range(7))
        assert all(v == list(range(v[0], v[0] + len(v))) for v in body.values())
        assert sorted(len(v) for v in body.values()) == [2, 2, 3] and all(v[0] == 9 for v in out.values())
        for c, v in body.items():
            seen[c].add(v[0])
    assert all(len(v) == 3 for v in seen.values())  # every client held every block once in 3 rounds
    # fewer groups than clients: the same as the round-robin deal
    assert split_groups([[1], [2]], clients, 0, contiguous=True) == split_groups([[1], [2]], clients, 0)


def test_spry_split_training():
    server, target = make(groups=[["a"], ["b"]], shared=["head"], perturbations_per_client=4)
    start = loss_of(server, target)
    infos = run_rounds(server, target, 30, clients=[f"c{i}" for i in range(5)])
    assert loss_of(server, target) < 0.8 * start
    plan = server.plan_round(["c0", "c1", "c2"])
    assert all(server.param_ids["head"] in p.param_ids for p in plan.values())
    assert all(len(p.param_ids) == 2 for p in plan.values())


def test_pacing_requests_more_perturbations():
    server, target = make(perturbations_per_client=1, pacing=VariancePacing(threshold=1e-9, max_attempts=3))
    infos = run_rounds(server, target, 6)
    # Threshold is unreachable: each step waits for max_attempts attempts, accumulating perturbations.
    steps = [i for i in infos if i.stepped]
    assert steps and all(i.perturbations == 3 * 4 for i in steps)
    assert server.schedule == [12] * len(steps)
    held = [i for i in infos if not i.stepped]
    assert held and all("variance" in i.reason for i in held)


def test_pacing_auto_threshold():
    pacing = VariancePacing(threshold=None)
    server, target = make(perturbations_per_client=2, pacing=pacing)
    run_rounds(server, target, 8)
    assert pacing.current_threshold() is not None and pacing.current_threshold() > 0
    assert len(server.schedule) >= 2


def test_discriminative_sampling_prefers_aligned():
    server, target = make(perturbations_per_client=4, candidates=10)
    run_rounds(server, target, 1)  # needs a previous gradient
    plans = server.plan_round(["c0"])
    plan = plans["c0"]
    cand_range = range(0, 4 * 10)
    assert all(k in cand_range for k in plan.ks)

    def score(k):
        return abs(sum(float(fwdkern.seeded_dot(server.prev_grad[n], plan.seed, server.param_ids[n], [k])[0])
                       for n in SHAPES))

    chosen = sorted(score(k) for k in plan.ks)
    others = sorted(score(k) for k in cand_range if k not in plan.ks)
    assert chosen[0] >= others[-1] - 1e-4


@pytest.mark.parametrize("opt", [lambda: SGD(0.05), lambda: SGD(0.02, momentum=0.9), lambda: FedAdam(0.05),
                                 lambda: FedYogi(0.05)], ids=["sgd", "momentum", "fedadam", "fedyogi"])
def test_a_client_rolled_forward_from_seeds_matches_the_server_bit_for_bit(opt):
    """A client that downloads at versions 1, 7 and 30 redoes the steps it missed from seeds and
    scalars (its own optimizer state included) and ends bit-identical to the server each time."""
    server, target = make(perturbations_per_client=3, optimizer=opt())
    client = Replica.fresh({n: p.clone() for n, p in server.params.items()}, server.param_ids)
    for version in (1, 7, 30):
        run_rounds(server, target, version - server.model_version)
        msg = server.sync_message(client.version)
        if version == 1:  # the 128-value tensors as one step's seeds and scalars (K=3 x 4 clients)
            assert msg.steps and not {t.pid for t in msg.raw} & {server.param_ids["a"], server.param_ids["b"]}
        client.apply(msg)
        assert client.version == server.model_version == version
        assert all(torch.equal(client.params[n], server.params[n]) for n in SHAPES)
        for n, st in server.optimizer.state.items():
            assert all(torch.equal(client.opts[0].state[n][k], v) for k, v in st.items())


def test_checkpoint_resume_is_bit_identical(tmp_path):
    ref, target = make(perturbations_per_client=2, optimizer=FedYogi(0.05), pacing=VariancePacing(None))
    run_rounds(ref, target, 6)
    s1, _ = make(perturbations_per_client=2, optimizer=FedYogi(0.05), pacing=VariancePacing(None))
    run_rounds(s1, target, 3)
    s1.save(str(tmp_path / "ckpt.pt"))
    s2, _ = make(perturbations_per_client=2, optimizer=FedYogi(0.05), pacing=VariancePacing(None))
    s2.load(str(tmp_path / "ckpt.pt"))
    run_rounds(s2, target, 3)
    for n in SHAPES:
        assert torch.equal(s2.params[n], ref.params[n])
    assert s2.round == ref.round and s2.schedule == ref.schedule


def test_lr_schedule():
    s = LRSchedule(1.0, warmup=2, total=10, decay="linear")
    assert s(0) == 0.5 and s(1) == 1.0 and s(10) == pytest.approx(0.0)
    c = LRSchedule(1.0, total=10, decay="cosine", final_frac=0.1)
    assert c(0) == pytest.approx(1.0) and c(10) == pytest.approx(0.1)


def test_derive_seed_stable():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    assert 0 <= derive_seed(2**63, 0) < 2**64
