"""Tiny randomly initialised models and data sets saved to folders (no downloads), shared by the FL tests."""
import csv

import torch


def save_tiny_bert(d, words, *, layers=2, max_positions=64, initializer_range=0.3, num_labels=2):
    """A BertForSequenceClassification + word-level tokenizer over `words`, saved to folder `d`."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    (d / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=max_positions, num_labels=num_labels,
                     initializer_range=initializer_range)
    BertForSequenceClassification(cfg).save_pretrained(str(d))
    return d


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def sentiment_rows(words, n, seed=0):
    """[sentence, pos|neg] rows: one polarity word (words[:3] pos, words[3:6] neg) + 2-5 fillers."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.randrange(2)
        toks = [rng.choice(words[6:]) for _ in range(rng.randrange(2, 6))]
        toks.insert(0, rng.choice(words[:3] if lab else words[3:6]))
        rows.append([" ".join(toks), "pos" if lab else "neg"])
    return rows


LEARNABLE_WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(40)]


def declare_mean_pooling(d, normalize: bool = True):
    """Make the folder `d` a sentence-transformers checkpoint that declares masked mean pooling (and
    L2 normalisation), as all-MiniLM-L6-v2 does: pooling "auto" then picks it up."""
    import json

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return d


def save_learnable(d):
    """A tiny random BERT whose pooled features separate the classes (linear probe ~98%), with its
    data.csv (sentence, sentiment): sentences are mostly polarity words, and initializer_range 0.1
    keeps the pooler out of tanh saturation."""
    import random

    save_tiny_bert(d, LEARNABLE_WORDS, initializer_range=0.1)
    words = LEARNABLE_WORDS
    rng = random.Random(0)
    rows = []
    for _ in range(240):
        lab = rng.randrange(2)
        toks = [rng.choice(words[:3] if lab else words[3:6]) for _ in range(rng.randrange(2, 5))]
        toks += [rng.choice(words[6:]) for _ in range(rng.randrange(0, 3))]
        rng.shuffle(toks)
        rows.append([" ".join(toks), "pos" if lab else "neg"])
    write_csv(d / "data.csv", ["sentence", "sentiment"], rows)
    return d


LM_WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "rug", "."] + [f"w{i}" for i in range(20)]


def save_tiny_llama(d, words=LM_WORDS, *, layers=2, max_positions=64, chat_template=None, bos=False):
    """A LlamaForCausalLM (hidden 32) + word-level tokenizer over `words`, saved to folder `d`; `chat_template`:
    a Jinja chat template for the tokenizer (None: the tokenizer has none); `bos`: the tokenizer starts every
    encoding with <s> through its post-processor, as Gemma's does (``add_bos_token`` stays unset)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d


def story_lines(n, seed=0):
    """Sentences of a tiny learnable language ('the cat sat on the mat .' and fillers), one per line."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(" ".join([rng.choice(["the", "a"]), rng.choice(["cat", "dog"]), rng.choice(["sat", "ran"]), "on",
                               "the", rng.choice(["mat", "rug"]), "."]
                              + [rng.choice(LM_WORDS[10:]) for _ in range(rng.randrange(0, 4))]))
    return lines
