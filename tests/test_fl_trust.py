"""The federated layer under hostile input and faults: strict parsing, bounded influence of one
client, checkpoints that cannot run code or resume silently wrong, one run per folder, bounded
failed rounds. Synthetic objective as in test_fl_protocol (exact jvps, no model)."""
import json
import math
import os
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwdkern.fl import SGD, FedAdam, FedYogi, RoundPlan, Server, Update, UpdateRejected
from fwdkern.fl.checkpoint import CorruptCheckpoint, RunLock, RunLocked, load_checkpoint, save_checkpoint
from fwdkern.fl.config import ConfigError, RunConfig
from fwdkern.fl.protocol import MAX_UPDATE_BYTES, RoundResult
from test_fl_protocol import SHAPES, client_update, loss_of, make


def _finite(server):
    return (all(bool(torch.isfinite(p).all()) for p in server.params.values()) and server.optimizer.finite())


def _round(server, target, clients, poison=None):
    """One round; `poison(plan, honest_update) -> update or bytes` replaces the first client's answer."""
    plans = server.plan_round(list(clients))
    for i, (c, plan) in enumerate(plans.items()):
        u = client_update(server, plan, target)
        server.submit(poison(plan, u) if (poison is not None and i == 0) else u)
    return server.finish_round()


# ---------------------------------------------------------------------- strict parsing
def _good(**kw):
    d = dict(client_id="c0", round=0, model_version=0, ks=[0, 1], jvps=[0.5, -0.25], num_samples=8, loss=0.7)
    d.update(kw)
    return d


@pytest.mark.parametrize("fields,reason", [
    (dict(round=True), "not int"),
    (dict(round=0.0), "not int"),
    (dict(num_samples=8.0), "not int"),
    (dict(num_samples=True), "not int"),
    (dict(num_samples=2**40), "num_samples"),
    (dict(num_samples=-3), "num_samples"),
    (dict(ks=[0, "1"]), "not int"),
    (dict(ks=[0, -1]), "outside"),
    (dict(ks={"a": 1}), "not a list"),
    (dict(jvps=[0.5, "x"]), "not float"),
    (dict(jvps=[0.5, None]), "not float"),
    (dict(jvps=[0.5, True]), "not float"),
    (dict(jvps=[0.5, 1e300]), "exceeds"),
    (dict(jvps=0.5), "not a list"),
    (dict(loss="0.7"), "not float"),
    (dict(loss=float("nan")), "non-finite loss"),
    (dict(client_id=5), "not str"),
    (dict(client_id=""), "client_id"),
    (dict(client_id="x" * 1000), "client_id"),
    (dict(extra=[1]), "extra"),
    (dict(extra={"a": {"nested": 1}}), "extra"),
    (dict(jvps=[0.0] * 20000, ks=list(range(20000))), "oversized"),
])
def test_strict_json_parsing(fields, reason):
    with pytest.raises(UpdateRejected, match=reason):
        Update.from_bytes(json.dumps(_good(**fields)).encode())


@pytest.mark.parametrize("payload,reason", [
    (b"[" * 100000 + b"]" * 100000, "oversized"),
    (b"[" * 20000 + b"]" * 20000, "malformed"),  # deeply nested: RecursionError inside json
    (b"\xff\xfe", "malformed"),
    (b"null", "not an object"),
    (json.dumps(dict(_good(), sneaky=1)).encode(), "unknown fields"),
    (json.dumps({"client_id": "c0"}).encode(), "missing fields"),
    (b"FK" + b"\x01", "truncated"),
    (b"FK\x09\x00" + b"\x00" * 40, "not understood"),
])
def test_hostile_payloads_are_rejected(payload, reason):
    with pytest.raises(UpdateRejected, match=reason):
        Update.from_bytes(payload)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "sign", "json"])
def test_binary_records_round_trip_and_refuse_tampering(encoding):
    u = Update("client7", 3, 2, tuple(range(10, 42)), tuple((-1) ** i * (i + 1) / 7 for i in range(32)), 8, 0.69,
               head=tuple(i / 3 for i in range(5)))
    b = u.to_bytes(encoding)
    v = Update.from_bytes(b)
    assert (v.client_id, v.round, v.model_version, v.ks, v.num_samples) == ("client7", 3, 2, u.ks, 8)
    tol = {"fp32": 1e-6, "fp16": 2e-3, "json": 0.0}.get(encoding)
    if tol is not None:
        assert max(abs(a - b) for a, b in zip(v.jvps + v.head, u.jvps + u.head)) <= tol * 5
    else:  # sign: signs exact, one shared magnitude
        assert [math.copysign(1, a) for a in v.jvps] == [math.copysign(1, a) for a in u.jvps]
    if encoding != "json":
        with pytest.raises(UpdateRejected):
            Update.from_bytes(b + b"\x00")  # trailing bytes
        with pytest.raises(UpdateRejected):
            Update.from_bytes(b[:-3])  # truncated


def test_upload_sizes():
    u = Update("client12", 3, 2, tuple(range(32)), tuple(float(i) for i in range(32)), 8, 0.5)
    assert len(u.to_bytes("fp32")) <= 200  # the wire-format goal at K=32
    assert len(u.to_bytes("fp16")) < len(u.to_bytes("fp32")) < len(u.to_bytes("json"))
    assert len(u.to_bytes("sign")) <= 60


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=400),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                              max_leaves=20).map(lambda x: json.dumps(x).encode()),
                 st.fixed_dictionaries({k: st.one_of(st.integers(), st.floats(), st.text(max_size=4), st.none(),
                                                     st.lists(st.one_of(st.integers(), st.floats()), max_size=3))
                                        for k in ("client_id", "round", "model_version", "ks", "jvps", "num_samples",
                                                  "loss")}).map(lambda d: json.dumps(d).encode())))
def test_fuzz_parser_raises_only_update_rejected(payload):
    try:
        u = Update.from_bytes(payload)
    except UpdateRejected:
        return
    assert isinstance(u, Update) and all(math.isfinite(j) for j in u.jvps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_server_never_raises_and_stays_finite(data):
    server, target = make(perturbations_per_client=2, optimizer=FedAdam(0.05))
    clients = ["c0", "c1", "c2"]
    for _ in range(3):
        plans = server.plan_round(clients)
        for c, plan in plans.items():
            u = client_update(server, plan, target)
            kind = data.draw(st.sampled_from(["honest", "bytes", "scale", "samples", "fields", "object"]))
            if kind == "bytes":
                u = data.draw(st.binary(max_size=200))
            elif kind == "scale":
                s = data.draw(st.floats(allow_nan=True, allow_infinity=True))
                u = Update(u.client_id, u.round, u.model_version, u.ks, tuple(j * s for j in u.jvps), u.num_samples,
                           u.loss)
            elif kind == "samples":
                u = Update(u.client_id, u.round, u.model_version, u.ks, u.jvps,
                           data.draw(st.integers(-2**70, 2**70)), u.loss)
            elif kind == "fields":
                d = json.loads(u.to_bytes())
                key = data.draw(st.sampled_from(sorted(d)))
                d[key] = data.draw(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                                             st.lists(st.integers(), max_size=3)))
                u = json.dumps(d).encode()
            elif kind == "object":
                u = data.draw(st.sampled_from([None, 3, "x", object(), [1, 2], {"client_id": "c0"}]))
            assert server.submit(u) in (True, False)
        info = server.finish_round()
        assert isinstance(info, RoundResult)
        assert _finite(server)


# ---------------------------------------------------------------------- bounded influence
def _honest_step(n, opt_factory, seed=0):
    server, target = make(perturbations_per_client=4, optimizer=opt_factory(), seed=seed)
    before = {k: p.clone() for k, p in server.params.items()}
    _round(server, target, [f"c{i}" for i in range(n)])
    return server, {k: server.params[k] - before[k] for k in before}


def _dist(a, b):
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


@pytest.mark.parametrize("n", [2, 5, 10])
@pytest.mark.parametrize("attack", ["huge_jvps", "huge_samples", "flipped_scaled", "one_extreme"])
@pytest.mark.parametrize("opt", ["sgd", "fedadam"])
def test_one_malicious_client_has_bounded_influence(n, attack, opt):
    factory = {"sgd": lambda: SGD(0.05), "fedadam": lambda: FedAdam(0.05)}[opt]
    _, honest = _honest_step(n, factory)
    _, alone = _honest_step(1, factory)  # the scale of one honest client's step

    def poison(plan, u):
        if attack == "huge_jvps":
            return Update(u.client_id, u.round, u.model_version, u.ks, tuple(j * 1e14 for j in u.jvps), 8, u.loss)
        if attack == "huge_samples":
            return Update(u.client_id, u.round, u.model_version, u.ks, tuple(-j for j in u.jvps), 10**9, u.loss)
        if attack == "flipped_scaled":
            return Update(u.client_id, u.round, u.model_version, u.ks, tuple(-50 * j for j in u.jvps), 8, u.loss)
        return Update(u.client_id, u.round, u.model_version, u.ks, (1e15,) + u.jvps[1:], 8, u.loss)

    server, target = make(perturbations_per_client=4, optimizer=factory())
    before = {k: p.clone() for k, p in server.params.items()}
    _round(server, target, [f"c{i}" for i in range(n)], poison)
    assert _finite(server)
    step = {k: server.params[k] - before[k] for k in before}
    ref = max(_dist(honest, {k: 0 * v for k, v in honest.items()}), _dist(alone, {k: 0 * v for k, v in alone.items()}))
    # The poisoned step stays within a bounded multiple of an honest step (the pair case allows the
    # attacker up to robust_factor-ish times the honest client's magnitude, with weight 1/2).
    assert _dist(step, honest) <= 8 * ref, (attack, n, _dist(step, honest), ref)
    # ... and training goes on: further honest rounds keep the state finite and reduce the loss.
    start = loss_of(server, target)
    for _ in range(15):
        _round(server, target, [f"c{i}" for i in range(n)])
    assert _finite(server) and loss_of(server, target) < start


def test_fedadam_state_cannot_be_driven_non_finite():
    server, target = make(perturbations_per_client=2, optimizer=FedYogi(0.05))
    # A lone client, no history: the largest jvp the parser accepts.
    plans = server.plan_round(["c0"])
    u = client_update(server, plans["c0"], target)
    assert server.submit(Update(u.client_id, u.round, u.model_version, u.ks, (1e15, -1e15), 8, u.loss))
    server.finish_round()
    assert _finite(server)


def test_non_finite_step_is_rolled_back():
    server, target = make(perturbations_per_client=2, optimizer=SGD(1e30))
    before = {k: p.clone() for k, p in server.params.items()}
    info = _round(server, target, ["c0", "c1", "c2"], lambda plan, u: Update(
        u.client_id, u.round, u.model_version, u.ks, tuple(j * 1e9 for j in u.jvps), 8, u.loss))
    assert _finite(server)
    if not info.stepped:
        assert "non-finite" in info.reason
        assert all(torch.equal(before[k], server.params[k]) for k in before)


def test_rejection_log_is_bounded():
    server, target = make(perturbations_per_client=2)
    server.plan_round(["c0"])
    for i in range(3000):
        assert not server.submit(b"junk %d" % i)
    assert len(server.rejections) <= 1000 and server.rejected_total == 3000


def test_plan_caps_sample_count():
    server, target = make(perturbations_per_client=2, max_samples=8)
    plan = server.plan_round(["c0", "c1"])["c0"]
    assert plan.max_samples == 8
    u = client_update(server, plan, target)
    assert not server.submit(Update(u.client_id, u.round, u.model_version, u.ks, u.jvps, 9, u.loss))
    assert "above the plan" in server.rejections[-1]["reason"]


# ---------------------------------------------------------------------- checkpoints
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fwdkern_pwned_%d" % os.getpid(),))


def test_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    with open(path, "wb") as f:
        pickle.dump({"server": _Payload()}, f)
    torch.save({"server": _Payload()}, tmp_path / "torch.pt")
    marker = "/tmp/fwdkern_pwned_%d" % os.getpid()
    for p in (path, tmp_path / "torch.pt"):
        with pytest.raises(CorruptCheckpoint, match="corrupt checkpoint"):
            load_checkpoint(p)
    assert not os.path.exists(marker)


def test_checkpoint_detects_flipped_bytes_and_truncation(tmp_path):
    server, target = make(perturbations_per_client=2, optimizer=FedAdam(0.05))
    for _ in range(2):
        _round(server, target, ["c0", "c1", "c2"])
    path = str(tmp_path / "ckpt.safetensors")
    server.save(path)
    data = open(path, "rb").read()
    restored, _ = make(perturbations_per_client=2, optimizer=FedAdam(0.05))
    restored.load(path)
    assert all(torch.equal(restored.params[n], server.params[n]) for n in SHAPES)
    n_header = int.from_bytes(data[:8], "little")
    for pos in (3, 8 + n_header // 2, len(data) - 5, 8 + n_header + 7):  # header length, JSON, tensor bytes
        bad = bytearray(data)
        bad[pos] ^= 0x10
        open(path, "wb").write(bytes(bad))
        with pytest.raises(CorruptCheckpoint):
            load_checkpoint(path)
    for cut in (0, 5, len(data) // 2, len(data) - 1):
        open(path, "wb").write(data[:cut])
        with pytest.raises(CorruptCheckpoint):
            load_checkpoint(path)
    with pytest.raises(CorruptCheckpoint, match="cannot read"):
        load_checkpoint(str(tmp_path / "missing"))


def test_checkpoint_state_round_trips_exactly(tmp_path):
    state = {"a": [1, 2.5, float("inf"), None, True, "x", 2**64 - 1], "t": torch.arange(6.0).view(2, 3),
             "nested": {"h": torch.tensor([1, 2], dtype=torch.int64), "f": 0.1 + 0.2}}
    save_checkpoint(str(tmp_path / "s"), state)
    back = load_checkpoint(str(tmp_path / "s"))
    assert back["a"] == state["a"] and torch.equal(back["t"], state["t"])
    assert torch.equal(back["nested"]["h"], state["nested"]["h"]) and back["nested"]["f"] == 0.1 + 0.2
    with pytest.raises(TypeError, match="cannot be stored"):
        save_checkpoint(str(tmp_path / "s2"), {"x": object()})


def test_run_lock_is_exclusive(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(RunLocked, match="in use by another fwdkern run"):
            with RunLock(str(tmp_path)):
                pass
    with RunLock(str(tmp_path)):  # released
        pass


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize("kw,flag", [
    (dict(dropout=1.0), "--dropout"), (dict(clients_per_round=0), "--clients-per-round"),
    (dict(clients=5, clients_per_round=6), "--clients-per-round"), (dict(batch_size=0), "--batch-size"),
    (dict(rounds=0), "--rounds"), (dict(lr=-0.1), "--lr"), (dict(eps=0.0), "--eps"), (dict(eps=-1.0), "--eps"),
    (dict(local_lr=0.0), "--local-lr"), (dict(optimizer="adamw"), "--optimizer"), (dict(pacing="fast"), "--pacing"),
    (dict(lr=float("nan")), "--lr"), (dict(perturbations=-1), "--perturbations"), (dict(method="sgd"), "--method"),
    (dict(wire="xml"), "--wire"), (dict(max_failed_rounds=0), "--max-failed-rounds"),
])
def test_impossible_settings_are_refused(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        RunConfig(**kw).validate()


def test_resume_differences_allow_extending_rounds():
    a = RunConfig(rounds=10)
    assert RunConfig(rounds=20).resume_differences(a.to_json()) == []
    assert RunConfig(rounds=20, lr=0.5).resume_differences(a.to_json()) == ["lr"]
    assert RunConfig(rounds=20, decay="cosine").resume_differences(
        RunConfig(rounds=10, decay="cosine").to_json()) == ["rounds"]


def test_resume_ignores_fields_the_method_never_reads():
    # A backprop run saved under an older head_lr default resumes; a fwdkern run (which trains the
    # exact head with it) does not, and neither does a change of method.
    old = RunConfig(method="backprop", head_lr=2.0).to_json()
    assert RunConfig(method="backprop", head_lr=8.0).resume_differences(old) == []
    assert RunConfig(method="backprop", head_lr=8.0, lr=0.5).resume_differences(old) == ["lr"]
    assert RunConfig(method="fwdkern", head_lr=8.0).resume_differences(
        RunConfig(method="fwdkern", head_lr=2.0).to_json()) == ["head_lr"]
    assert set(RunConfig(method="mezo", head_lr=8.0).resume_differences(old)) == {"head_lr", "method"}


def test_plan_config_is_parsed_strictly():
    plan = RoundPlan("c0", 1, 1, 2**63 + 5, (0, 1), (7,), head_ks=(9,), head_ids=(8,))
    assert RoundPlan.from_config(plan.to_config()) == plan
    bad = dict(plan.to_config(), ks=[0, 1.5])
    with pytest.raises(ValueError, match="malformed plan"):
        RoundPlan.from_config(bad)
    with pytest.raises(ValueError, match="malformed plan"):
        RoundPlan.from_config({"client_id": "c0"})


def test_binary_header_layout_is_stable():
    # The record layout is a wire contract: magic, version 1, encoding, then little-endian fields.
    b = Update("c", 1, 2, (0,), (1.0,), 3, 0.5).to_bytes("fp32")
    assert b[:2] == b"FK" and b[2] == 1 and b[3] == 0
    assert struct.unpack("<IIIf", b[4:20]) == (1, 2, 3, 0.5)
    assert len(b) < MAX_UPDATE_BYTES


def test_block_indices_are_accepted_and_checked():
    assert RunConfig(layers=[-1]).validate().layers == [-1]  # what `--layers -1` gives
    with pytest.raises(ConfigError, match="--layers"):
        RunConfig(layers=["x"]).validate()


def test_a_run_saved_before_tangent_precision_resumes_where_it_computed_the_same():
    # Saved runs predating --tangent-precision (run-state layout 2) computed tangents in fp32: migrated,
    # a body run resumes under fp32 and is refused (naming the setting) under bf16; runs without
    # tangents (head only, backprop) never read it.
    from fwdkern.fl.runstate import migrate

    def saved(**kw):
        cfg = {k: v for k, v in RunConfig(**kw).to_json().items() if k != "tangent_precision"}
        return migrate({"layout": 2, "config": cfg}, "run", log=lambda *a: None)["config"]

    body = saved(perturbations=16)
    assert RunConfig(perturbations=16, tangent_precision="fp32").resume_differences(body) == []
    assert RunConfig(perturbations=16, tangent_precision="bf16").resume_differences(body) == ["tangent_precision"]
    head = saved(perturbations=0)
    assert RunConfig(perturbations=0, tangent_precision="bf16").resume_differences(head) == []
    bp = saved(method="backprop")
    assert RunConfig(method="backprop", tangent_precision="bf16").resume_differences(bp) == []


def test_a_run_saved_before_tangent_scope_resumes_with_whole_batch_tangents():
    # Saved runs predating --tangent-scope (run-state layout 3) answered every tangent on the whole batch:
    # migrated, a body run resumes under "batch" and is refused (naming the setting) under "sample"; runs
    # whose clients answer no tangents (head only, backprop) never read it.
    from fwdkern.fl.runstate import migrate

    def saved(**kw):
        cfg = {k: v for k, v in RunConfig(**kw).to_json().items() if k != "tangent_scope"}
        return migrate({"layout": 3, "config": cfg}, "run", log=lambda *a: None)["config"]

    body = saved(perturbations=16)
    assert body["tangent_scope"] == "batch"
    assert RunConfig(perturbations=16, tangent_scope="batch").resume_differences(body) == []
    assert RunConfig(perturbations=16, tangent_scope="sample").resume_differences(body) == ["tangent_scope"]
    assert RunConfig(perturbations=0, tangent_scope="sample").resume_differences(saved(perturbations=0)) == []
    bp = saved(method="backprop")
    assert RunConfig(method="backprop", tangent_scope="sample").resume_differences(bp) == []
