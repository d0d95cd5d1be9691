"""Prompt classification with a causal LM (fwdkern.fl.prompt, fwdkern.nn.verbalizer) on a tiny random LLaMA."""
import csv
import json
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fwdkern.fl.prompt import PromptTask  # noqa: E402
from fwdkern.fl.simulation import build  # noqa: E402
from fwdkern.fl.config import RunConfig  # noqa: E402

WORDS = ["good", "great", "bad", "awful", "pos", "neg", "Topic:", "x"] + [f"w{i}" for i in range(20)]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tinylm")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    rng = random.Random(0)
    with open(d / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(60):
            lab = rng.randrange(2)
            toks = [rng.choice(WORDS[:2] if lab else WORDS[2:4])] + [rng.choice(WORDS[8:]) for _ in range(rng.randrange(1, 6))]
            w.writerow([" ".join(toks), "pos" if lab else "neg"])
    return d


def _tok(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_lm))


def test_batch_is_the_right_padded_prompt_and_its_class(tiny_lm):
    tok = _tok(tiny_lm)
    task = PromptTask(tok, ["neg", "pos"], "{text} Topic:", max_length=8)
    texts = ["good w1 w2", "bad " + " ".join(f"w{i}" for i in range(15))]  # the second one is truncated
    b = task.batch(texts, [1, 0])
    ids, mask = b["input_ids"], b["attention_mask"]
    assert ids.shape[1] == 8 and b["labels"].tolist() == [1, 0]
    for i in range(2):
        last = int(mask[i].sum()) - 1
        assert ids[i, last] == tok.convert_tokens_to_ids("Topic:")  # the prompt ends the attended part
        assert mask[i, : last + 1].all() and not mask[i, last + 1:].any()
    assert "labels" not in task.batch(texts, None)
    assert task.verbalizer == [tok.convert_tokens_to_ids("neg"), tok.convert_tokens_to_ids("pos")]


def _verbalizer_model(tiny_lm, task):
    from transformers import AutoModelForCausalLM

    from fwdkern.nn import VerbalizerForSequenceClassification

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    return lm, VerbalizerForSequenceClassification(lm, task.verbalizer).eval()


def test_verbalizer_head_reads_the_lms_label_word_logits(tiny_lm):
    """Before training the classifier predicts what the LM does: its logits are the LM's logits of the
    label words at the last prompt position (unpadded, full-vocabulary reference), and it is a copy:
    training it leaves the (tied) LM head alone."""
    task = PromptTask(_tok(tiny_lm), ["neg", "pos"], "{text} Topic:", max_length=16)
    lm, model = _verbalizer_model(tiny_lm, task)
    texts = ["good w1", "bad w2 w3 w4 w5", "great"]
    with torch.no_grad():
        logits = model(**task.batch(texts, None)).logits
        for i, t in enumerate(texts):
            ref = lm(input_ids=torch.tensor([task._prompts([t])[0]])).logits[0, -1, task.verbalizer]
            torch.testing.assert_close(logits[i], ref, rtol=1e-5, atol=1e-5)
        emb = lm.get_input_embeddings().weight.clone()
        model.classifier.weight.add_(1.0)
    assert torch.equal(lm.get_input_embeddings().weight, emb)
    assert model(**task.batch(texts, [0, 1, 1])).loss > 0


def test_jvp_through_the_verbalizer_model_matches_autograd(tiny_lm):
    import fwdkern

    task = PromptTask(_tok(tiny_lm), ["neg", "pos"], "{text} Topic:", max_length=12)
    _, model = _verbalizer_model(tiny_lm, task)
    model = fwdkern.patch(model, r=2, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # B = 0 at the start: give the LoRA a value so every factor's derivative shows
        for n, _, t in fwdkern.trainable(model):
            t.normal_(0, 0.3)
    batch = task.batch(["good w1 w2", "awful w3", "great w4 w5 w6"], [1, 0, 1])
    ks = [0, 1, 2]
    loss, jv = fwdkern.jvp(model, batch, 17, ks)
    tr = fwdkern.trainable(model)
    assert "classifier.weight" in {n for n, _, _ in tr}
    params = [t for _, _, t in tr]
    with torch.enable_grad():
        for t in params:
            t.requires_grad_(True)
        ref_loss = model(**batch).loss
        grads = torch.autograd.grad(ref_loss, params)
    ref = torch.zeros(len(ks), dtype=torch.float64)
    for (n, pid, t), g in zip(tr, grads):
        for j, k in enumerate(ks):
            v = torch.zeros_like(t)
            fwdkern.seeded_axpy_(v, 17, pid, [k], [1.0])
            ref[j] += (g.double() * v.double()).sum()
    torch.testing.assert_close(float(loss), float(ref_loss.detach()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(jv.double(), ref, rtol=1e-4, atol=1e-5)


def test_bad_templates_and_verbalizers(tiny_lm):
    from fwdkern.nn import VerbalizerForSequenceClassification

    tok = _tok(tiny_lm)
    with pytest.raises(ValueError, match="share a first token"):
        PromptTask(tok, ["pos", "pos"])
    with pytest.raises(ValueError, match="must contain"):
        PromptTask(tok, ["neg", "pos"], "no placeholder")
    with pytest.raises(ValueError, match="no room"):
        PromptTask(tok, ["neg", "pos"], "{text} Topic:", max_length=1)
    lm, _ = _verbalizer_model(tiny_lm, PromptTask(tok, ["neg", "pos"]))
    for bad in ([], [5, 5], [10 ** 6], [-1]):
        with pytest.raises(ValueError, match="verbalizer"):
            VerbalizerForSequenceClassification(lm, bad)


@pytest.mark.parametrize("method", ["fwdkern", "backprop"])
def test_prompt_run_end_to_end(tiny_lm, tmp_path, method):
    cfg = RunConfig(model=str(tiny_lm), data=str(tiny_lm / "data.csv"), task="prompt", prompt_template="{text} Topic:",
                    out=str(tmp_path / method), clients=4, clients_per_round=2, rounds=2, perturbations=4, lr=0.05,
                    max_length=12, eval_every=1, checkpoint_every=0, max_test=12, pacing="off", method=method,
                    target_modules=["q_proj", "v_proj"])
    sim = build(cfg, log=lambda *a: None)
    before = {n: t.clone() for n, t in sim.server.params.items()}
    summary = sim.run()
    rows = [json.loads(line) for line in open(tmp_path / method / "metrics.jsonl")]
    assert summary["rounds"] == 2 and all(r["loss"] > 0 for r in rows)
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0 and any("accuracy" in r for r in rows)
    assert any(not torch.equal(before[n], t) for n, t in sim.server.params.items())
    if method == "fwdkern":
        assert all(r["bytes_up_per_client"] < 1024 for r in rows)


def test_default_recipe_trains_the_prompt_head(tiny_lm, tmp_path):
    """Nothing but the task set: the label-word head trains exactly on the clients (no perturbation of
    the body, under 1 KB up per client) and the run learns (training loss more than halves, test
    accuracy rises). How well it learns a real task is measured in bench/results/fl_smollm2_cpu/:
    a random 2-layer LM's last-position features carry too little of the text for a strong test."""
    rng = random.Random(1)
    with open(tmp_path / "cue.csv", "w", newline="") as f:  # the cue word right before the prompt's end
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(120):
            lab = rng.randrange(2)
            toks = [rng.choice(WORDS[8:]) for _ in range(rng.randrange(0, 3))] + [rng.choice(WORDS[:2] if lab else WORDS[2:4])]
            w.writerow([" ".join(toks), "pos" if lab else "neg"])
    cfg = RunConfig(model=str(tiny_lm), data=str(tmp_path / "cue.csv"), task="prompt", prompt_template="{text} Topic:",
                    out=str(tmp_path / "default"), clients=4, clients_per_round=2, rounds=12, max_length=12,
                    eval_every=4, checkpoint_every=0, max_test=24, target_modules=["q_proj", "v_proj"], num_threads=1)
    sim = build(cfg, log=lambda *a: None)
    assert sim.cfg.perturbations == 0 and sorted(sim.task.head_names) == ["classifier.bias", "classifier.weight"]
    summary = sim.run()
    rows = [json.loads(line) for line in open(tmp_path / "default" / "metrics.jsonl")]
    assert all(r["bytes_up_per_client"] < 1024 for r in rows)
    assert sum(r["loss"] for r in rows[-3:]) / 3 < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    assert summary["final"]["accuracy"] > summary["initial"]["accuracy"], summary


def test_profile_skips_a_method_the_model_cannot_use(tiny_lm):
    """LLaMA has no biases: BitFit would train only the label-word head's bias and weight, which the
    recipe trains exactly, so it is reported as skipped (with the reason) and the others are measured."""
    from fwdkern.fl.profile import CANDIDATES, profile

    cfg = RunConfig(model=str(tiny_lm), data=str(tiny_lm / "data.csv"), task="prompt", max_length=12,
                    prompt_template="{text} Topic:", num_threads=1, clients=4, clients_per_round=2)
    cands = [c for c in CANDIDATES if c["peft"] == "bitfit" or (c["peft"] == "lora" and c["placement"] == "last")]
    rep = profile(cfg, perturbations=4, batches=1, candidates=cands, log=lambda *a: None, repeats=1)
    assert [r["peft"] for r in rep["skipped"]] == ["bitfit"] and "outside the head" in rep["skipped"][0]["reason"]
    assert [r["peft"] for r in rep["candidates"]] == ["lora"] and rep["recommended"] == rep["candidates"][0]["name"]
    assert rep["head_trained_exactly"] and rep["candidates"][0]["d_body"] < rep["candidates"][0]["d"]
    with pytest.raises(ValueError, match="no candidate applies"):
        profile(cfg, perturbations=4, batches=1, candidates=[c for c in CANDIDATES if c["peft"] == "bitfit"],
                log=lambda *a: None, repeats=1)
