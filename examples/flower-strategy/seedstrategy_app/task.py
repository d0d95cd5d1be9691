"""Model and data, shared by the ClientApp and the ServerApp (no Flower here)."""
import csv
import random

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import fwdkern


def load_model(path: str, num_labels: int):
    torch.manual_seed(0)  # every participant starts from the same head and adapters
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()
    return fwdkern.patch(model, r=4, alpha=8), AutoTokenizer.from_pretrained(path)


def load_rows(path: str, text_column: str, label_column: str):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r[label_column] for r in rows})
    return [(r[text_column], names.index(r[label_column])) for r in rows], names


def client_batches(rows, tok, partition: int, num_partitions: int, round_seed: int, batch_size: int, max_length: int):
    mine = rows[partition::num_partitions]
    pick = random.Random(round_seed).sample(mine, min(batch_size, len(mine)))
    enc = tok([t for t, _ in pick], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return [dict(enc, labels=torch.tensor([y for _, y in pick]))]


@torch.no_grad()
def accuracy(model, tok, rows, max_length: int) -> float:
    enc = tok([t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    pred = model(**enc).logits.argmax(-1)
    return float((pred == torch.tensor([y for _, y in rows])).float().mean())
