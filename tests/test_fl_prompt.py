"""Prompt classification with a causal LM (fwdkern.fl.prompt) on a tiny random LLaMA."""
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


def test_batch_puts_one_label_token_after_the_prompt(tiny_lm):
    tok = _tok(tiny_lm)
    task = PromptTask(tok, ["neg", "pos"], "{text} Topic:", max_length=8)
    texts = ["good w1 w2", "bad " + " ".join(f"w{i}" for i in range(15))]  # the second one is truncated
    b = task.batch(texts, [1, 0])
    ids, lab, mask = b["input_ids"], b["labels"], b["attention_mask"]
    assert ids.shape[1] <= 8
    for i, y in enumerate([1, 0]):
        pos = (lab[i] != -100).nonzero().flatten().tolist()
        assert len(pos) == 1  # exactly one target: the verbalizer token
        p = pos[0]
        assert ids[i, p] == task.verbalizer[y] == lab[i, p]
        assert ids[i, p - 1] == tok.convert_tokens_to_ids("Topic:")  # right after the prompt
        assert mask[i, : p + 1].all() and not mask[i, p + 1:].any()


def test_predict_matches_full_logits(tiny_lm):
    from transformers import AutoModelForCausalLM

    tok = _tok(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    task = PromptTask(tok, ["neg", "pos"], "{text} Topic:", max_length=16)
    texts = ["good w1", "bad w2 w3 w4 w5", "great"]
    pred = task.predict(model, texts)
    for i, t in enumerate(texts):  # unpadded, full-vocabulary reference
        ids = torch.tensor([task._prompts([t])[0]])
        logits = model(input_ids=ids).logits[0, -1]
        assert pred[i] == logits[task.verbalizer].argmax()


def test_bad_templates_and_verbalizers(tiny_lm):
    tok = _tok(tiny_lm)
    with pytest.raises(ValueError, match="share a first token"):
        PromptTask(tok, ["pos", "pos"])
    with pytest.raises(ValueError, match="must contain"):
        PromptTask(tok, ["neg", "pos"], "no placeholder")
    with pytest.raises(ValueError, match="no room"):
        PromptTask(tok, ["neg", "pos"], "{text} Topic:", max_length=2)
    with pytest.raises(ValueError, match="needs labels"):
        PromptTask(tok, ["neg", "pos"]).batch(["good"], None)


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


def test_profile_skips_a_method_the_model_cannot_use(tiny_lm):
    """LLaMA has no biases: BitFit is reported as skipped (with the reason) and the others are measured."""
    from fwdkern.fl.profile import CANDIDATES, profile

    cfg = RunConfig(model=str(tiny_lm), data=str(tiny_lm / "data.csv"), task="prompt", max_length=12,
                    prompt_template="{text} Topic:", num_threads=1, clients=4, clients_per_round=2)
    cands = [c for c in CANDIDATES if c["peft"] == "bitfit" or (c["peft"] == "lora" and c["placement"] == "last")]
    rep = profile(cfg, perturbations=4, batches=1, candidates=cands, log=lambda *a: None, repeats=1)
    assert [r["peft"] for r in rep["skipped"]] == ["bitfit"] and "bias" in rep["skipped"][0]["reason"]
    assert [r["peft"] for r in rep["candidates"]] == ["lora"] and rep["recommended"] == rep["candidates"][0]["name"]
    with pytest.raises(ValueError, match="no candidate applies"):
        profile(cfg, perturbations=4, batches=1, candidates=[c for c in CANDIDATES if c["peft"] == "bitfit"],
                log=lambda *a: None, repeats=1)
