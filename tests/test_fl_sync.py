"""Downloads (fwdkern.fl.sync): per tensor the cheapest sufficient message, applied by the client's
Replica, leaves it bit-identical to the server -- after long gaps, with adaptive optimizers, after a
resume -- and unchanged tensors cost nothing."""
import random

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fwdkern.fl.config import RunConfig  # noqa: E402
from fwdkern.fl.protocol import RawTensor, Step, SyncMessage, TermGroup  # noqa: E402
from fwdkern.fl.simulation import build  # noqa: E402
from fwdkern.fl.sync import Replica, SyncError, state_digest  # noqa: E402
from _tiny_models import save_tiny_bert, sentiment_rows, write_csv  # noqa: E402

WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(20)]
OPTIMIZERS = {"sgd": dict(optimizer="sgd", lr=0.05), "momentum": dict(optimizer="sgd", lr=0.02, momentum=0.9),
              "fedadam": dict(optimizer="fedadam", lr=0.01), "fedyogi": dict(optimizer="fedyogi", lr=0.01)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny_bert(tmp_path_factory.mktemp("tiny_sync"), WORDS, layers=1)
    write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(WORDS, 120))
    return d


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # build() applies cfg.num_threads to this process
    yield
    torch.set_num_threads(n)


def _cfg(tiny, out, **kw):
    base = dict(model=str(tiny), data=str(tiny / "data.csv"), text_column="sentence", label_column="sentiment",
                out=str(out), clients=12, clients_per_round=4, rounds=30, max_length=12, eval_every=0,
                checkpoint_every=0, max_test=16, num_threads=1, head_directions=16)
    base.update(kw)
    return RunConfig(**base)


def _replica(sim, initial):
    """A client's own copy, rebuilt at version 0 from the run's seed (the task's initial weights)."""
    return Replica.fresh({n: t.clone() for n, t in initial.items()}, sim.task.param_ids)


def _assert_same(replica, server):
    assert replica.version == server.model_version
    for n, p in server.params.items():
        assert torch.equal(replica.params[n], p), n
    for srv_opt, opt in zip((server.optimizer, server.head_optimizer), replica.opts or ()):
        for n, st_ in srv_opt.state.items():
            for k, v in st_.items():
                assert torch.equal(opt.state[n][k], v), (n, k)


@pytest.mark.parametrize("body", ["head_only", "body_on"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_a_client_seen_at_rounds_1_7_and_30_ends_bit_identical_each_time(tiny, tmp_path, opt, body):
    """The acceptance case: a client downloads at rounds 1, 7 and 30 (gaps of 1, 6 and 23 steps) and
    holds exactly the server's tensors and optimizer state each time (SGD, momentum, FedAdam, FedYogi;
    the head trained exactly alone, or beside 4 body tangents)."""
    sim = build(_cfg(tiny, tmp_path / "run", perturbations=0 if body == "head_only" else 4, **OPTIMIZERS[opt]),
                log=lambda *a: None)
    client = _replica(sim, sim.server.weights())
    head_ids = {sim.task.param_ids[n] for n in sim.task.head_names}
    for target in (1, 7, 30):
        while sim.server.model_version < target:
            sim.run_round()
        msg = SyncMessage.from_bytes(sim.server.sync_message(client.version).to_bytes())  # through the wire
        client.apply(msg)
        _assert_same(client, sim.server)
        if body == "head_only":  # the body never changes: it costs nothing (no tensor, no term)
            assert {t.pid for t in msg.raw} <= head_ids
            assert not any(g.pids for s in msg.steps for g in s.groups)


@pytest.mark.parametrize("opt", ["sgd", "fedadam"])
def test_every_clients_download_in_a_run_reproduces_the_server(tiny, tmp_path, opt):
    """Each sampled client applies exactly the download the run counted for it (from whatever version
    it last held) and evaluates at the server's weights; its first contact downloads nothing but the
    initial state's digest (it rebuilds the adapter from the run's seed)."""
    sim = build(_cfg(tiny, tmp_path / "run", rounds=12, perturbations=4, **OPTIMIZERS[opt]), log=lambda *a: None)
    initial = sim.server.weights()
    clients, checked = {}, []

    def on_download(c, record):
        first = c not in clients
        client = clients.setdefault(c, _replica(sim, initial))
        msg = SyncMessage.from_bytes(record)
        if first:
            assert msg.base_version == 0 and msg.init_digest == state_digest(initial)
        client.apply(msg)
        _assert_same(client, sim.server)
        checked.append(c)

    sim.on_download = on_download
    summary = sim.run()
    assert len(checked) == 12 * 4 and len(set(checked)) > 4
    d = summary["bytes_down_per_client"]
    assert d["count"] == 48 and d["max"] >= d["p95"] >= d["p50"] > 0
    assert d["first_contact_mean"] < d["mean"]  # a first contact downloads (nearly) nothing


def test_a_resumed_server_rolls_a_client_forward_from_before_the_resume(tiny, tmp_path):
    out = tmp_path / "resume"
    first = build(_cfg(tiny, out, rounds=3, perturbations=4, **OPTIMIZERS["fedadam"]), log=lambda *a: None)
    initial = first.server.weights()
    first.run()
    client = _replica(first, initial).apply(first.server.sync_message(0))
    resumed = build(_cfg(tiny, out, rounds=9, perturbations=4, **OPTIMIZERS["fedadam"]), log=lambda *a: None)
    resumed.run()
    msg = resumed.server.sync_message(client.version)
    assert msg.base_version == 3 and msg.steps  # the steps log survived the resume
    _assert_same(client.apply(msg), resumed.server)


def test_a_client_behind_the_steps_log_gets_tensors_with_their_optimizer_state(tiny, tmp_path):
    sim = build(_cfg(tiny, tmp_path / "window", rounds=9, perturbations=4, **OPTIMIZERS["fedyogi"]),
                log=lambda *a: None)
    sim.server.replay_window = 2
    client = _replica(sim, sim.server.weights())
    for _ in range(6):
        sim.run_round()
    msg = sim.server.sync_message(client.version)
    assert msg.base_version is None and not msg.steps and len(msg.raw) == len(sim.server.params)
    assert all(t.state for t in msg.raw if sim.task.names_by_id[t.pid] not in sim.task.head_names)
    _assert_same(client.apply(msg), sim.server)
    sim.run_round()
    msg = sim.server.sync_message(client.version)  # back inside the log: seeds and scalars again
    assert msg.base_version == 6 and msg.steps
    _assert_same(client.apply(msg), sim.server)


def test_a_download_that_does_not_apply_is_refused_and_changes_nothing(tiny, tmp_path):
    sim = build(_cfg(tiny, tmp_path / "refuse", rounds=4, perturbations=4), log=lambda *a: None)
    initial = sim.server.weights()
    for _ in range(3):
        sim.run_round()
    client = _replica(sim, initial)
    before = {n: t.clone() for n, t in client.params.items()}
    for msg, reason in [(sim.server.sync_message(2), "applies to version 2, the client holds 0"),
                        (SyncMessage(None, 3, raw=(RawTensor(99, np.zeros(3, np.float32)),)), "tensor id 99"),
                        (SyncMessage(None, 3, raw=()), "full download lacks")]:
        with pytest.raises(SyncError, match=reason):
            client.apply(msg)
    assert all(torch.equal(before[n], client.params[n]) for n in before) and client.version == 0
    other = _replica(sim, {n: t + 1.0 for n, t in initial.items()})  # not the initial state the server started from
    with pytest.raises(SyncError, match="initial adapter"):
        other.apply(sim.server.sync_message(0, first_contact=True))


def _message(rng):
    groups = tuple(TermGroup(rng.getrandbits(64), tuple(range(rng.randrange(5))), tuple(0.5 for _ in range(0)), (1,))
                   for _ in range(2))
    groups = tuple(TermGroup(g.seed, g.ks, tuple(0.25 * i for i in range(len(g.ks))), g.pids) for g in groups)
    return SyncMessage(rng.randrange(10), 12, steps=(Step(3, (3, 0), groups),),
                       raw=(RawTensor(5, np.arange(4, dtype=np.float32), {"m": np.ones(4, np.float32)}),),
                       rule={"body": {"kind": "sgd"}}, init_digest=b"abcdefgh")


def test_download_records_round_trip_and_refuse_tampering():
    rec = _message(random.Random(0)).to_bytes()
    assert SyncMessage.from_bytes(rec).to_bytes() == rec
    for bad, reason in [(rec[:-1], "truncated"), (rec + b"\0", "trailing"), (b"FX" + rec[2:], "not a download"),
                        (rec[:2] + b"\x09" + rec[3:], "not understood"), ("text", "not bytes")]:
        with pytest.raises(ValueError, match=reason):
            SyncMessage.from_bytes(bad)
    nan = rec.replace(np.float32(3.0).tobytes(), np.float32("nan").tobytes())  # a raw value
    with pytest.raises(ValueError, match="non-finite"):
        SyncMessage.from_bytes(nan)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_download_parser_raises_only_value_error(data):
    rec = bytearray(_message(random.Random(data.draw(st.integers(0, 99)))).to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(rec) - 1))
        rec[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(rec)))
    try:
        SyncMessage.from_bytes(bytes(rec[:cut]) if data.draw(st.booleans()) else bytes(rec))
    except ValueError:
        pass
