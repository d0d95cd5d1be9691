"""Causal-LM fine-tuning end to end on a tiny random LLaMA (no downloads): documents cut into windows
that never cross clients, prompt/response pairs with the loss on the response only, held-out loss and
perplexity, samples.md, the exported adapter in peft + transformers, and one-line errors for bad data."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fwdkern.fl.config import RunConfig  # noqa: E402
from fwdkern.fl.lm import IGNORE  # noqa: E402
from fwdkern.fl.simulation import build  # noqa: E402
from _tiny_models import save_tiny_llama, story_lines  # noqa: E402

CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    d = save_tiny_llama(tmp_path_factory.mktemp("tiny_lm"))
    (d / "text.txt").write_text("\n".join(story_lines(200)) + "\n")
    return d


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(tiny_lm, out, **kw):
    base = dict(model=str(tiny_lm), data=str(tiny_lm / "text.txt"), label_column=None, max_length=16, clients=10,
                clients_per_round=4, rounds=20, eval_every=5, max_test=32, out=str(out), num_threads=1, samples=2)
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_gradients_alone_lower_the_held_out_loss(tiny_lm, tmp_path, seed):
    """The default recipe on a causal LM: no head, so only the body's forward gradients train (16
    seeded tangents per sample of a client's batch of 8, FedAdam; no autograd anywhere). The held-out
    token loss -- on windows of documents no client holds -- is recorded before training and at every
    evaluation, and falls."""
    sim = build(_cfg(tiny_lm, tmp_path / "fg", seed=seed), log=lambda *a: None)
    assert (sim.cfg.perturbations, sim.cfg.tangent_scope) == (128, "sample")
    assert not sim.task.head_names and sim.method.name == "fwdkern"
    summary = sim.run()
    before, after = summary["initial"]["eval_loss"], summary["final"]["eval_loss"]
    assert after < before - 0.06, (before, after)
    assert summary["final"]["perplexity"] == pytest.approx(torch.tensor(after).exp().item(), rel=1e-6)
    rows = [json.loads(line) for line in open(tmp_path / "fg" / "metrics.jsonl")]
    assert [r["eval_loss"] for r in rows if "eval_loss" in r] and "perplexity" in rows[-1]
    assert max(r["bytes_up_per_client"] for r in rows) <= 1024  # seeds and scalars
    assert summary["heldout_windows"] == len(sim.task.heldout_windows()) > 0


def test_windows_never_cross_clients_and_held_out_documents_reach_none(tiny_lm, tmp_path):
    long_docs = [" ".join(story_lines(6, seed=i)) for i in range(40)]  # ~40+ tokens each: several windows
    (tmp_path / "long.txt").write_text("\n".join(long_docs) + "\n")
    sim = build(_cfg(tiny_lm, tmp_path / "w", data=str(tmp_path / "long.txt"), clients=5, rounds=1),
                log=lambda *a: None)
    task = sim.task
    assert all(len(task.lm.windows[d]) >= 2 for d in range(len(task.lm.windows)))  # split, not truncated
    owner = {d: c for c, part in enumerate(task.parts) for d in part}
    for c, wins in enumerate(task.client_windows):
        assert {w.doc for w in wins} <= set(task.parts[c]) and all(owner[w.doc] == c for w in wins)
    for c in range(5):  # a client's batches are windows of its own documents
        for b in task.client_batches(c, 0):
            docs = {w.doc for w in task.client_windows[c]}
            assert b["input_ids"].shape[1] <= 16 and docs
    held = {tuple(w.ids) for w in task.heldout_windows()}
    trained = {tuple(w.ids) for ws in task.lm.windows for w in ws}
    assert held and not (held & trained)  # (the documents are distinct sentences)
    targets = sum(len(w.ids) - 1 for ws in task.lm.windows for w in ws)
    expect = sum(len(task.tok(t, add_special_tokens=False)["input_ids"]) for t in task.train.texts)  # + </s> - 1
    assert targets == expect  # every next-token target in exactly one window: nothing truncated away


def test_a_model_whose_tokenizer_starts_with_bos_sees_bos_first_in_every_window(tmp_path):
    # Gemma's tokenizer adds BOS through its post-processor (add_bos_token unset) and its loss on a window
    # without BOS is that of another distribution, so every training and held-out window (and the prompt
    # task's prefix) must start with BOS, while each document token stays a target in exactly one window.
    from fwdkern.fl.lm import LMData, bos_prefix
    from fwdkern.fl.models import load_tokenizer
    from fwdkern.fl.prompt import PromptTask

    d = save_tiny_llama(tmp_path / "bos", bos=True)
    tok = load_tokenizer(str(d))
    assert not getattr(tok, "add_bos_token", False) and tok("the cat")["input_ids"][0] == tok.bos_token_id
    assert bos_prefix(tok) == [tok.bos_token_id]
    assert bos_prefix(load_tokenizer(str(save_tiny_llama(tmp_path / "plain")))) == []

    class Docs:
        prompts, texts = None, [" ".join(story_lines(6, seed=i)) for i in range(5)] + [""]

    for L in (3, 8, 16):
        lm = LMData(tok, Docs, L)
        for text, wins in zip(Docs.texts, lm.windows):
            body = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert (len(wins) > 1 if text and L < 16 else True) and (wins == [] if not text else True)
            assert all(w.ids[0] == tok.bos_token_id and len(w.ids) <= L for w in wins)
            targets = [lab for w in wins for lab in w.labels[1:] if lab != IGNORE]
            assert targets == (body if text else [])
    assert PromptTask(tok, ["a", "b"]).prefix[0] == tok.bos_token_id

    class Pairs:  # a pair's prompt trains, and `fwdkern generate` starts, from encode_prompt's ids: BOS first
        prompts, texts = ["the cat sat"], ["on the mat ."]

    from fwdkern.fl.lm import encode_prompt
    p = encode_prompt(tok, "the cat sat", "off")
    assert p[0] == tok.bos_token_id and list(LMData(tok, Pairs, 16, "off").windows[0][0].ids[:len(p)]) == p


def test_the_loss_is_on_the_response_only_in_the_chat_template(tmp_path):
    d = save_tiny_llama(tmp_path / "chat", chat_template=CHAT)
    rows = [("the cat sat", "on the mat ."), ("a dog ran", "on the rug .")] * 20
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("question", "answer")] + rows)
    sim = build(RunConfig(model=str(d), data=str(tmp_path / "pairs.csv"), prompt_column="question",
                          response_column="answer", task="causal_lm", max_length=24, clients=4, clients_per_round=2,
                          rounds=1, max_test=8, out=str(tmp_path / "out"), num_threads=1, samples=1),
                log=lambda *a: None)
    tok = sim.task.tok
    w = sim.task.lm.windows[0][0]
    prompt = tok.apply_chat_template([{"role": "user", "content": sim.task.train.prompts[0]}], tokenize=False,
                                     add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(sim.task.train.texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(w.ids) == p + r
    assert list(w.labels) == [IGNORE] * len(p) + r  # no loss on the prompt
    b = sim.task.lm.batch([w])
    assert (b["labels"][0, :len(p)] == IGNORE).all() and (b["labels"][0, len(p):len(p) + len(r)] != IGNORE).all()
    sim.run()
    assert "## Prompt 1" in (tmp_path / "out" / "samples.md").read_text()


def test_samples_and_the_exported_adapter_generate_the_same_tokens_in_peft(tiny_lm, tmp_path):
    """samples.md holds each held-out prompt's continuation before and after training; out/adapter loads
    with peft on the Hugging Face base model and continues a prompt with exactly the tokens of fwdkern's
    own model, and `fwdkern generate --run` prints that continuation."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ship"
    sim = build(_cfg(tiny_lm, out, rounds=6, lr=0.05), log=lambda *a: None)
    sim.run()
    text = (out / "samples.md").read_text()
    assert text.count("**Before training:**") == 2 and text.count("**After training:**") == 2
    tok = AutoTokenizer.from_pretrained(str(tiny_lm))
    ids = tok("the cat sat on", return_tensors="pt")["input_ids"]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ours = sim.model.generate(input_ids=ids, **kw)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
        theirs = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval().generate(input_ids=ids, **kw)
    assert torch.equal(ours, theirs)
    p = subprocess.run([sys.executable, "-m", "fwdkern", "generate", "--run", str(out), "--prompt", "the cat sat on",
                        "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-1500:]
    assert p.stdout.strip() == "the cat sat on" + tok.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fwdkern", "train", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bad_data_gets_one_line_and_exit_2_before_the_model_loads(tiny_lm, tmp_path):
    """Every data problem is reported before the model's weights load: the model folder here has a config
    and a tokenizer but no weights, so reaching the weights would give another error."""
    import shutil

    d = tmp_path / "noweights"
    shutil.copytree(tiny_lm, d)
    for f in os.listdir(d):
        if f.endswith(".safetensors") or f.endswith(".bin"):
            os.remove(d / f)
    (tmp_path / "empty.txt").write_text("")
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("q", "a"), (" ".join(["the"] * 40), "on the mat .")])
    common = ["--model", str(d), "--label-column", "none", "--out", str(tmp_path / "o"), "--task", "causal_lm",
              "--clients", "1", "--clients-per-round", "1"]
    cases = [(["--data", str(tmp_path / "empty.txt")], "empty"),
             (["--data", str(tmp_path / "pairs.csv"), "--prompt-column", "question", "--response-column", "a"],
              "'question' is not a column"),
             (["--data", str(tmp_path / "pairs.csv"), "--prompt-column", "q", "--response-column", "a",
               "--max-length", "16"], "leaves no room for its response"),
             (["--data", str(tiny_lm / "text.txt"), "--max-length", "100000"], "longer than anything the model takes"),
             (["--data", str(tmp_path / "pairs.csv"), "--prompt-column", "q"], "go together")]
    for extra, reason in cases:
        p = _cli(common + extra)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and reason in err[0], (extra, p.stderr[-1500:])
    notok = tmp_path / "notok"
    notok.mkdir()
    shutil.copy(tiny_lm / "config.json", notok / "config.json")
    p = _cli(["--model", str(notok), "--data", str(tiny_lm / "text.txt"), "--label-column", "none", "--out",
              str(tmp_path / "o2")])
    assert p.returncode == 2 and "no tokenizer" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
