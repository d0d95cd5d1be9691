"""Flower runner (fwdkern.fl.flower_app): message (de)serialisation, malformed replies, partition
mapping, parity with the embedded runner through an in-process Grid, and one real deployment
(flower-superlink + 2 flower-supernode processes + `flwr run`) compared with the embedded runner.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

import fwdkern

pytest.importorskip("flwr", reason="flwr is not installed (pip install flwr==1.41.0)")
pytest.importorskip("transformers")

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common.serde import (context_from_proto, context_to_proto, recorddict_from_proto,  # noqa: E402
                               recorddict_to_proto)

from fwdkern.fl import flower as fa  # noqa: E402
from fwdkern.fl.flower import codec  # noqa: E402
from fwdkern.fl.protocol import (MAX_UPDATE_BYTES, RawTensor, RoundPlan, Step, SyncMessage,  # noqa: E402
                                 TermGroup, Update, UpdateRejected, client_index)
from fwdkern.fl.simulation import build  # noqa: E402
from fwdkern.fl.checkpoint import load_checkpoint  # noqa: E402
from fwdkern.fl.config import RunConfig  # noqa: E402
from _tiny_models import save_tiny_bert, sentiment_rows, write_csv  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(REPO, "examples", "flower")
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fwdkern.__file__)))  # holds fwdkern/
WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT classifier and a CSV data set, saved to a folder (no downloads)."""
    d = save_tiny_bert(tmp_path_factory.mktemp("tiny_flower"), WORDS, layers=1, max_positions=32)
    write_csv(d / "data.csv", ["sentence", "sentiment"], sentiment_rows(WORDS, 120))
    return d


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    # _cfg pins one thread (the Flower processes run with OMP_NUM_THREADS=1, and bitwise parity
    # needs the same reduction order); build() sets it process-wide, so give it back afterwards.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(tiny, out, **kw):
    base = dict(model=str(tiny), data=str(tiny / "data.csv"), text_column="sentence", label_column="sentiment",
                out=str(out), clients=2, clients_per_round=2, rounds=3, perturbations=4, lr=0.05, max_length=12,
                eval_every=3, checkpoint_every=0, max_test=24, pacing="off", num_threads=1,
                optimizer="sgd")  # plain SGD: its steps replay from seeds and scalars
    base.update(kw)
    return RunConfig(**base)


def _run_config(cfg, **opts):
    return {"run-config": json.dumps(cfg.to_json()), **opts}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # build() applies cfg.num_threads to this process
    yield
    torch.set_num_threads(n)


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's Message constructor reads the running task's identity; fake one in-process."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older Flower builds Messages without a task identity
        return
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)


# ---------------------------------------------------------------------- (de)serialisation
def _wire(content: RecordDict) -> RecordDict:
    """What the other side receives: the content through Flower's protobuf serde."""
    return recorddict_from_proto(recorddict_to_proto(content))


def test_plan_and_download_records_roundtrip():
    plan = RoundPlan(client_id="client3", round=7, model_version=5, seed=2**64 - 3, ks=(4, 9, 11),
                     param_ids=(100, 2**31 + 5), num_batches=2, dist="gaussian", head_ks=tuple(range(2**30, 2**30 + 200)),
                     head_ids=(7,))
    rec = _wire(RecordDict({"plan": fa.plan_to_record(plan)}))["plan"]
    assert isinstance(rec, ConfigRecord) and fa.plan_from_record(rec) == plan
    assert rec.count_bytes() < 120  # 200 head directions travel as one run
    msg = SyncMessage(3, 5, steps=(Step(3, (3, 3), (TermGroup(2**64 - 1, (0, 1, 2), (0.5, -0.25, 0.125), (100,)),)),),
                      raw=(RawTensor(7, np.arange(6, dtype=np.float32), {"m": np.ones(6, dtype=np.float32)}),),
                      rule={"body": {"kind": "sgd"}}, init_digest=b"12345678")
    back = fa.sync_from_record(_wire(RecordDict({"s": fa.sync_to_record(msg.to_bytes())}))["s"])
    assert back.to_bytes() == msg.to_bytes() and back.steps == msg.steps


@pytest.mark.parametrize("wire", ["fp32", "fp16", "json"])
def test_update_content_carries_the_clients_record_byte_for_byte(wire):
    record = Update("client1", 3, 2, (0, 1, 2), (0.125, -1e-7, 3.5), 8, 0.6931, head=(0.5, 2.0)).to_bytes(wire)
    content = _wire(fa.update_to_content(record))
    assert fa.update_from_content(content) == record
    assert codec.nbytes(content) - len(record) < 16  # the record plus its key


@pytest.mark.parametrize("content", [
    RecordDict(),
    RecordDict({"update": MetricRecord({"record": 0.5})}),
    RecordDict({"update": ConfigRecord({"client_id": "client0"})}),
    RecordDict({"update": ConfigRecord({"record": "FK..."})}),
    RecordDict({"update": ConfigRecord({"record": b"x" * (MAX_UPDATE_BYTES + 1)})}),
], ids=["empty", "wrong-record-type", "no-record", "str-record", "oversized"])
def test_malformed_update_content_is_rejected(content):
    with pytest.raises(UpdateRejected, match="malformed|oversized"):
        fa.update_from_content(content)


def test_the_flower_apps_config_is_fwdkern_trains_defaults():
    """examples/flower's [tool.flwr.app.config] lists every RunConfig field (so each can be overridden with
    --run-config) at the value `fwdkern train` takes by default ("auto" left to the default recipe)."""
    import tomllib

    with open(os.path.join(PROJECT, "pyproject.toml"), "rb") as f:
        app = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    cfg, _ = fa.parse_run_config(app)
    assert cfg == RunConfig()
    assert {k for k in app if k not in fa.FLOWER_DEFAULTS} == {f.replace("_", "-") for f in RunConfig().to_json()}


def test_parse_run_config(tmp_path):
    cfg = RunConfig(clients=3, rounds=2, out=str(tmp_path))
    got, opts = fa.parse_run_config({"run-config": json.dumps(cfg.to_json()), "poll-interval": 0.5})
    assert got == cfg and opts["poll-interval"] == 0.5 and opts["round-timeout"] == 600.0
    (tmp_path / "c.json").write_text(json.dumps({"clients": 3}))
    assert fa.parse_run_config({"run-config": str(tmp_path / "c.json")})[0].clients == 3
    with pytest.raises(ValueError, match="unknown RunConfig fields"):
        fa.parse_run_config({"run-config": '{"clientz": 3}'})
    for method in ("backprop", "spry"):  # weight-upload rounds: the Flower apps carry seeds and scalars only
        with pytest.raises(ValueError, match=f"method '{method}'.*seed-and-scalar rounds only"):
            fa.parse_run_config({"run-config": json.dumps({"method": method})})


# ---------------------------------------------------------------------- in-process Grid
class FakeGrid:
    """A Grid that runs the ClientApp handlers in-process, one persisted Context per node.

    Contents and contexts go through Flower's protobuf serde (as between processes);
    a handler exception becomes a Flower error reply; `tamper(node, reply, instruction)` may
    alter or drop (None: never answers) a reply.
    """

    def __init__(self, partition_ids, run_config, tamper=None):
        self.contexts = {1000 + i: context_to_proto(Context(run_id=1, node_id=1000 + i, node_config=(
            {"partition-id": p} if p is not None else {}), state=RecordDict(), run_config=run_config))
            for i, p in enumerate(partition_ids)}
        self.tamper, self.replies, self.n, self.sent = tamper, {}, 0, []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.n += 1
            mid = f"m{self.n}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent.append(m)
            node = m.metadata.dst_node_id
            ctx = context_from_proto(self.contexts[node])
            inbound = Message(_wire(m.content), reply_to=m)  # a copy carrying the same reply routing
            inbound.metadata.__dict__.update(m.metadata.__dict__)
            handler = {"train": fa.handle_train, "query": fa.handle_query}[m.metadata.message_type]
            try:
                reply = handler(inbound, ctx)
                reply = Message(_wire(reply.content), reply_to=m)
            except Exception as e:  # what flwr-clientapp sends back when the ClientApp raises
                reply = Message(Error(code=3, reason=repr(e)), reply_to=m)
            self.contexts[node] = context_to_proto(ctx)
            if self.tamper is not None:
                reply = self.tamper(node, reply, m)
            if reply is not None:
                self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _flower_sim(cfg, grid, opts, rows):
    sim = build(cfg, log=lambda *a: None)
    node_of = fa.discover_partitions(grid, cfg.clients, timeout=1.0, poll=0.01)
    sim.exchange = fa.FlowerExchange(grid, sim, node_of, dict(fa.FLOWER_DEFAULTS, **opts), record=rows.append)
    return sim


def _embedded(cfg):
    """The embedded runner, recording each client's jvps per round."""
    sim = build(cfg, log=lambda *a: None)
    jvps = []

    def exchange(plans, downloads):
        ups = sim._local_exchange(plans, downloads)
        jvps.append({client_index(u.client_id): list(u.jvps) for u in map(Update.from_bytes, ups)})
        return ups

    sim.exchange = exchange
    sim.run()
    return sim, jvps


def _params(sim):
    return {n: t.detach().clone() for n, t in sim.server.params.items()}


def _check_downloads_counted(rows, metrics):
    """What each node received is what the run counted: the plan and download records plus the two
    records' keys (Flower's framing of a ConfigRecord), and the metrics row's mean is theirs."""
    for row, m in zip(rows, metrics):
        got = [r["bytes_down"] for r in row["clients"].values()]
        assert all(r["bytes_down"] == r["download_bytes"] + 2 * len("record") for r in row["clients"].values())
        assert m["bytes_down_per_client"] == int(np.mean([r["download_bytes"] for r in row["clients"].values()]))
        assert m["bytes_down_max"] == max(r["download_bytes"] for r in row["clients"].values()) <= max(got)


@pytest.mark.parametrize("optimizer", ["sgd", "fedadam"])
def test_in_process_grid_matches_embedded_bit_for_bit(tiny, tmp_path, task_identity, optimizer):
    """Each node applies its download (steps as seeds and scalars, the head as a tensor) to the copy in
    its context.state and evaluates at exactly the server's weights, FedAdam's moments included: the
    Flower run's weights, jvps and metrics equal the embedded runner's bit for bit."""
    ref, ref_jvps = _embedded(_cfg(tiny, tmp_path / "emb", optimizer=optimizer))
    cfg = _cfg(tiny, tmp_path / "fl", optimizer=optimizer)
    rows = []
    grid = FakeGrid([1, 0], _run_config(cfg))
    sim = _flower_sim(cfg, grid, {"round-timeout": 5.0, "poll-interval": 0.01}, rows)
    sim.run()
    assert [r["status"] for row in rows for r in row["clients"].values()] == ["ok"] * 6
    # first contact: nothing to download (the initial adapter is rebuilt from the run's seed); then the
    # body's steps as seeds and scalars, the (smaller than its steps) head as a tensor, and the guard's
    # proposed body step (seeds and scalars again) that the node measures its loss with
    assert [[row["clients"][c]["sync"] for c in (0, 1)] for row in rows] == (
        [["none"] * 2] + [["steps+tensors+probe"] * 2] * 2)
    # context.state carried each node's weights and bookkeeping between messages
    assert [row["clients"][0]["state"]["messages"] for row in rows] == [1, 2, 3]
    got, exp = _params(sim), _params(ref)
    assert all(torch.equal(got[n], exp[n]) for n in exp)
    assert [{c: r["jvps"] for c, r in row["clients"].items()} for row in rows] == ref_jvps
    fl_metrics = [json.loads(line) for line in open(tmp_path / "fl" / "metrics.jsonl")]
    emb_metrics = [json.loads(line) for line in open(tmp_path / "emb" / "metrics.jsonl")]
    drop = {"wall_time_s", "cpu_time_s"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in fl_metrics] == [
        {k: v for k, v in m.items() if k not in drop} for m in emb_metrics]
    _check_downloads_counted(rows, fl_metrics)


def test_causal_lm_runs_through_the_flower_apps(tmp_path, task_identity):
    """The same ServerApp/ClientApp run a causal-LM task: its windows, held-out loss and downloads are the
    embedded runner's, bit for bit."""
    from _tiny_models import save_tiny_llama, story_lines

    d = save_tiny_llama(tmp_path / "lm")
    (d / "text.txt").write_text("\n".join(story_lines(60)) + "\n")
    kw = dict(model=str(d), data=str(d / "text.txt"), label_column=None, task="causal_lm", clients=2,
              clients_per_round=2, rounds=3, max_length=16, eval_every=3, checkpoint_every=0, max_test=8,
              num_threads=1, samples=1, optimizer="fedadam")
    ref, ref_jvps = _embedded(RunConfig(out=str(tmp_path / "emb"), **kw))
    cfg = RunConfig(out=str(tmp_path / "fl"), **kw)
    rows = []
    sim = _flower_sim(cfg, FakeGrid([0, 1], _run_config(cfg)), {"round-timeout": 5.0, "poll-interval": 0.01}, rows)
    summary = sim.run()
    assert {r["status"] for row in rows for r in row["clients"].values()} == {"ok"}
    assert any(row["clients"][0]["sync"] != "none" for row in rows[1:])  # the guard's probe travels as well
    got, exp = _params(sim), _params(ref)
    assert all(torch.equal(got[n], exp[n]) for n in exp)
    assert [{c: r["jvps"] for c, r in row["clients"].items()} for row in rows] == ref_jvps
    emb = json.load(open(tmp_path / "emb" / "summary.json"))
    assert summary["final"] == emb["final"] and "eval_loss" in summary["final"]
    assert (tmp_path / "fl" / "samples.md").exists() and (tmp_path / "fl" / "adapter").is_dir()


def test_lost_client_state_recovers_with_a_full_download(tiny, tmp_path, task_identity):
    """A SuperNode that lost its context.state (e.g. restarted) refuses a download that does not apply
    to what it holds; its next download carries every tensor."""
    cfg = _cfg(tiny, tmp_path / "lost", rounds=4, eval_every=0)
    grid = FakeGrid([0, 1], _run_config(cfg))
    rows = []

    def record(row):
        rows.append(row)
        if row["round"] == 1:  # client 1's SuperNode restarts: its Context starts empty again
            grid.contexts[1001] = context_to_proto(Context(run_id=1, node_id=1001, node_config={"partition-id": 1},
                                                           state=RecordDict(), run_config=_run_config(cfg)))

    sim = build(cfg, log=lambda *a: None)
    sim.exchange = fa.FlowerExchange(grid, sim, {0: 1000, 1: 1001}, {"round-timeout": 5.0, "poll-interval": 0.01},
                                     record=record)
    assert sim.run()["rounds"] == 4
    assert [(r["clients"][1]["sync"], r["clients"][1]["status"]) for r in rows] == [
        ("none", "ok"), ("steps+tensors+probe", "ok"), ("steps+tensors+probe", "error"), ("tensors+probe", "ok")]
    assert "download applies to version 1, the client holds 0" in rows[2]["clients"][1]["error"]


def test_malformed_error_and_missing_replies_do_not_crash(tiny, tmp_path, task_identity):
    cfg = _cfg(tiny, tmp_path / "bad", rounds=6, eval_every=0)

    def tamper(node, reply, instruction):
        if node != 1001 or instruction.metadata.message_type != "train":  # node 1001: client 1
            return reply
        rnd = fa.plan_from_record(instruction.content["plan"]).round

        def answering(**changes):  # the reply's record, re-encoded with `changes`
            upd = Update.from_bytes(fa.update_from_content(reply.content))
            record = dataclasses.replace(upd, **changes).to_bytes("fp32")
            return Message(fa.update_to_content(record), reply_to=instruction)

        if rnd == 0:  # malformed: not an update record
            return Message(fa.update_to_content(b"FK\x01garbage"), reply_to=instruction)
        if rnd == 1:  # a Flower error reply (the ClientApp raised)
            return Message(Error(code=3, reason="boom"), reply_to=instruction)
        if rnd == 2:  # never answers before the timeout
            return None
        if rnd == 3:  # well-formed but answering as another client
            return answering(client_id="client0")
        if rnd == 4:  # a NaN jvp: the record's strict parse refuses it
            upd = Update.from_bytes(fa.update_from_content(reply.content))
            return answering(jvps=(float("nan"),) + upd.jvps[1:])
        return reply  # round 5: back to normal

    rows = []
    grid = FakeGrid([0, 1], _run_config(cfg), tamper=tamper)
    sim = _flower_sim(cfg, grid, {"round-timeout": 0.3, "poll-interval": 0.01}, rows)
    summary = sim.run()
    assert summary["rounds"] == 6  # rounds 0-4 stepped on client 0's update alone
    assert [row["clients"][1]["status"] for row in rows] == ["malformed", "error", "timeout", "malformed",
                                                              "malformed", "ok"]
    assert [row["clients"][0]["status"] for row in rows] == ["ok"] * 6
    # every tensor again after each failure (what the client holds is unknown from then on)
    assert [row["clients"][1]["sync"] for row in rows[4:]] == ["tensors+probe", "tensors+probe"]
    assert rows[5]["clients"][0]["sync"] == "steps+tensors+probe"
    reasons = [r["reason"] for r in sim.server.rejections]
    assert any("malformed" in r for r in reasons) and any("answered as 'client0'" in r for r in reasons)
    assert any("non-finite jvp" in r for r in reasons)
    metrics = [json.loads(line) for line in open(tmp_path / "bad" / "metrics.jsonl")]
    assert [m["accepted"] for m in metrics] == [1, 1, 1, 1, 1, 2]


def test_partition_mapping_errors(task_identity):
    cfg = {"run-config": "{}"}
    assert fa.discover_partitions(FakeGrid([1, 0], cfg), 2, timeout=1.0, poll=0.01) == {0: 1001, 1: 1000}
    with pytest.raises(ValueError, match=r"duplicated \{0: \[1000, 1001\]\}"):
        fa.discover_partitions(FakeGrid([0, 0], cfg), 2, timeout=0.2, poll=0.01)
    with pytest.raises(ValueError, match=r"missing \[1\].*without a partition-id \[1001\]"):
        fa.discover_partitions(FakeGrid([0, None], cfg), 2, timeout=0.2, poll=0.01)
    with pytest.raises(ValueError, match=r"missing \[1\]"):  # only one SuperNode is up
        fa.discover_partitions(FakeGrid([0], cfg), 2, timeout=0.2, poll=0.01)
    with pytest.raises(ValueError, match=r"out of range \[5\]"):
        fa.discover_partitions(FakeGrid([0, 1, 5], cfg), 2, timeout=0.2, poll=0.01)


# ---------------------------------------------------------------------- real deployment
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc):
    """Stop a process started here and its process group (its superexec/app children)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    else:  # the leader exited: its group may still hold children
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_NEEDS_FLOWER_CLIS = pytest.mark.skipif(shutil.which("flower-superlink") is None or shutil.which("flwr") is None,
                                        reason="Flower CLIs (flower-superlink, flower-supernode, flwr) not on PATH")


def _deploy(tmp_path, project, overrides: str, node_configs, done_file, deadline):
    """A real SuperLink + one SuperNode per node config + `flwr run --stream` of `project`, until
    `done_file` holds JSON; every process group is killed on the way out. Returns the log tail."""
    home = tmp_path / "flwr_home"
    home.mkdir(exist_ok=True)
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    ov = tmp_path / "overrides.toml"
    ov.write_text(overrides)
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               # The fwdkern this test imported (the repo in development, site-packages under CI, where
               # the clone has no compiled _C), so server and clients run the same code as the test.
               PYTHONPATH=os.pathsep.join([PKG_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")
    bindir = os.path.dirname(sys.executable)

    def exe(name):
        p = os.path.join(bindir, name)
        return p if os.path.exists(p) else shutil.which(name)

    procs, logs, files = [], {}, []

    def start(name, args):
        logs[name] = tmp_path / f"{name}.log"
        files.append(open(logs[name], "wb"))
        procs.append(subprocess.Popen(args, env=env, stdout=files[-1], stderr=subprocess.STDOUT, cwd=str(tmp_path),
                                      start_new_session=True))  # own process group: killed as a whole below
        return procs[-1]

    def tail():
        return "\n".join(f"--- {n}\n" + p.read_text(errors="replace")[-3000:] for n, p in logs.items())

    try:
        start("superlink", [exe("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation"])
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline - 120 and procs[0].poll() is None, "SuperLink did not start\n" + tail()
            time.sleep(0.2)
        for c, node_config in enumerate(node_configs):
            start(f"supernode{c}", [exe("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                    "--port", str(_free_port()), "--node-config", node_config])
        run = start("flwr_run", [exe("flwr"), "run", project, "e2e", "--stream", "--run-config", str(ov)])
        while True:  # the done file is written last
            try:
                json.loads(done_file.read_text())
                break
            except (OSError, ValueError):
                pass
            if run.poll() is not None and run.returncode != 0:
                pytest.fail("flwr run failed\n" + tail())
            assert time.monotonic() < deadline, "the Flower run did not finish in time\n" + tail()
            time.sleep(0.25)
    finally:
        for p in reversed(procs):
            _kill(p)
        for f in files:
            f.close()
    return tail()


@_NEEDS_FLOWER_CLIS
def test_superlink_supernodes_flwr_run_match_embedded(tiny, tmp_path):
    deadline = time.monotonic() + 150  # hard cap: the test never hangs
    cfg = _cfg(tiny, tmp_path / "flower")
    overrides = (f"run-config = '{json.dumps(cfg.to_json())}'\nround-timeout = 60.0\n"
                 "node-timeout = 60.0\npoll-interval = 0.1\n")
    # summary.json is written last (after the checkpoint and metrics.jsonl)
    log_tail = _deploy(tmp_path, PROJECT, overrides, [f"partition-id={c}" for c in range(cfg.clients)],
                       tmp_path / "flower" / "summary.json", deadline)

    def tail():
        return log_tail

    rows = [json.loads(line) for line in open(tmp_path / "flower" / "flower.jsonl")]
    assert len(rows) == 3, tail()
    status = {c: r["status"] for row in rows for c, r in row["clients"].items()}
    assert set(status.values()) == {"ok"}, rows
    # First contact downloads nothing (the initial adapter is rebuilt from the run's seed); afterwards
    # the body's steps travel as seeds and scalars and the small head as a tensor, since each client's
    # copy survived in context.state across process-isolated messages.
    assert [[row["clients"][str(c)]["sync"] for c in range(2)] for row in rows] == (
        [["none"] * 2] + [["steps+tensors+probe"] * 2] * 2)
    assert [row["clients"]["0"]["state"]["messages"] for row in rows] == [1, 2, 3]
    ref, ref_jvps = _embedded(_cfg(tiny, tmp_path / "embedded"))
    # Final trainable weights (the ServerApp's checkpoint) and per-round losses/jvps: every client
    # evaluated at exactly the server's weights.
    got = load_checkpoint(tmp_path / "flower" / "checkpoint.safetensors")["server"]["params"]
    exp = _params(ref)
    assert set(got) == set(exp) and all(torch.equal(got[n], exp[n]) for n in exp)
    fl_metrics = [json.loads(line) for line in open(tmp_path / "flower" / "metrics.jsonl")]
    emb_metrics = [json.loads(line) for line in open(tmp_path / "embedded" / "metrics.jsonl")]
    assert [m["round"] for m in fl_metrics] == [m["round"] for m in emb_metrics]
    _check_downloads_counted(rows, fl_metrics)
    for a, b in zip(fl_metrics, emb_metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for row, exp_j in zip(rows, ref_jvps):
        for c, j in exp_j.items():
            assert row["clients"][str(c)]["jvps"] == pytest.approx(j, rel=1e-4, abs=1e-6)
    assert not math.isnan(json.load(open(tmp_path / "flower" / "summary.json"))["final"]["accuracy"])


# ---------------------------------------------------------------------- SeedStrategy
STRATEGY_PROJECT = os.path.join(REPO, "examples", "flower-strategy")


class StrategyGrid:
    """Grid.send_and_receive over in-process ClientApp handlers (contents through protobuf serde)."""

    def __init__(self, handlers, tamper=None):
        self.handlers, self.tamper, self.n = handlers, tamper, 0

    def get_node_ids(self):
        return list(self.handlers)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.n += 1
            m.metadata.__dict__["_message_id"] = f"m{self.n}"
            inbound = Message(_wire(m.content), reply_to=m)
            inbound.metadata.__dict__.update(m.metadata.__dict__)
            try:
                reply = Message(_wire(self.handlers[m.metadata.dst_node_id](inbound).content), reply_to=m)
            except Exception as e:  # what flwr-clientapp sends back when the ClientApp raises
                reply = Message(Error(code=3, reason=repr(e)), reply_to=m)
            if self.tamper is not None:
                reply = self.tamper(m.metadata.dst_node_id, reply, m)
            if reply is not None:
                out.append(reply)
        return out


def _strategy_setup(tiny):
    import transformers

    from fwdkern.fl.flower.strategy import SeedStrategy, answer_plan

    torch.manual_seed(0)
    model = fwdkern.patch(transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny), num_labels=2)
                          .eval(), r=4, alpha=8)
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny))
    import csv as _csv

    rows = [(r["sentence"], int(r["sentiment"] == "pos")) for r in _csv.DictReader(open(tiny / "data.csv"))]

    def batches(node):
        part = rows[node % 3::3][:16]
        enc = tok([t for t, _ in part], padding=True, return_tensors="pt")
        return [dict(enc, labels=torch.tensor([y for _, y in part]))]

    def loss():
        enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
        with torch.no_grad():
            return float(model(**enc, labels=torch.tensor([y for _, y in rows])).loss)

    # Node ids as a SuperLink hands them out: uint64, two of them above 2**63 (which float64 cannot hold)
    node_ids = (1000, 1002, 2**63 + 4097, 2**64 - 3)
    states = {nid: RecordDict() for nid in node_ids}  # each node's context.state (the model object is shared)
    handlers = {nid: (lambda msg, i=i, nid=nid: answer_plan(msg, model, batches(i % 3), state=states[nid]))
                for i, nid in enumerate(node_ids)}
    return model, SeedStrategy, handlers, loss


def test_seed_strategy_trains_and_survives_bad_replies(tiny, task_identity):
    model, SeedStrategy, handlers, loss = _strategy_setup(tiny)

    def tamper(node, reply, msg):
        if node == 1002 and fa.plan_from_record(msg.content["plan"]).round % 2 == 0:  # every other round: garbage
            return Message(RecordDict({"update": ConfigRecord({"client_id": 7}), "metrics": MetricRecord({})}),
                           reply_to=msg)
        return reply

    strategy = SeedStrategy.from_model(model, optimizer="fedadam", lr=0.05, perturbations=8, clients_per_round=3)
    before = loss()
    initial = SeedStrategy.arrays_of(model)
    result = strategy.start(grid=StrategyGrid(handlers, tamper), initial_arrays=initial, num_rounds=12, timeout=5)
    sd = result.arrays.to_torch_state_dict()
    for n, _, p in fwdkern.trainable(model):
        p.data.copy_(sd[n])
    assert loss() < before - 0.01
    assert all(h.stepped for h in strategy.history)
    assert any("malformed" in r["reason"] for r in strategy.server.rejections)
    assert all(torch.isfinite(t).all() for t in sd.values())
    # A node's first download (and the one after each garbage reply) carries the whole adapter; the
    # others carry the steps it missed as seeds and scalars (FedAdam's included) and the small head.
    full = 4 * sum(t.numel() for t in sd.values())
    sizes = {}
    for rnd, node, n in strategy.bytes_down:
        sizes.setdefault(node, []).append(n)
    assert all(v[0] > full for v in sizes.values())
    assert min(n for v in sizes.values() for n in v[1:]) < full / 4


@_NEEDS_FLOWER_CLIS
def test_seed_strategy_app_with_real_processes(tiny, tmp_path):
    """examples/flower-strategy (its own ServerApp/ClientApp around SeedStrategy) over a real
    SuperLink and two SuperNodes: every round steps and accuracy is evaluated each round."""
    deadline = time.monotonic() + 240  # hard cap: three processes each load the model on a loaded machine
    out = tmp_path / "strategy_out"
    overrides = (f"model = '{tiny}'\ndata = '{tiny / 'data.csv'}'\ntext-column = 'sentence'\n"
                 f"label-column = 'sentiment'\nnum-rounds = 4\nperturbations = 4\nout = '{out}'\n")
    log_tail = _deploy(tmp_path, STRATEGY_PROJECT, overrides,
                       [f"partition-id={c} num-partitions=2" for c in range(2)], out / "result.json", deadline)
    res = json.load(open(out / "result.json"))
    assert len(res["rounds"]) == 4 and all(r["stepped"] and r["accepted"] == 2 for r in res["rounds"]), log_tail
    assert sorted(int(k) for k in res["accuracy"]) == [0, 1, 2, 3, 4] and not res["rejections"]


OLDEST_FLWR = os.path.join(REPO, ".flwr-oldest")


@pytest.mark.skipif(not os.path.isdir(os.path.join(OLDEST_FLWR, "flwr")),
                    reason="the oldest supported flwr is not installed (scripts/setup_env.sh puts it in .flwr-oldest)")
def test_oldest_supported_flower():
    """SeedStrategy, the codec and the malformed-reply handling under the oldest flwr claimed (1.21)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([OLDEST_FLWR, PKG_ROOT]))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                        "-k", "seed_strategy_trains or roundtrip or malformed_update and not oldest"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=os.path.dirname(__file__))
    assert p.returncode == 0 and "passed" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    check = subprocess.run([sys.executable, "-c", "import flwr; print(flwr.__version__)"], capture_output=True,
                           text=True, env=env)
    assert check.stdout.strip() == "1.21.0"
