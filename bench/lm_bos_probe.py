"""Whether a causal LM needs its BOS token first: the loss of one client batch of fl_causal_lm's windows
(client 0, round 1) with BOS first and without it, the same targets scored (each window's first token is
context in both).

    HF_HUB_OFFLINE=1 python bench/lm_bos_probe.py gemma3-270m [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from bench.common import causal_lm_loss, environment, git_commit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from fwdkern.fl.config import RunConfig
    from fwdkern.fl.lm import IGNORE
    from fwdkern.fl.task import load_task

    cfg = RunConfig(model=args.model, data="bbc_news", task="causal_lm", clients=20, clients_per_round=5,
                    batch_size=4, max_length=64, local_batches=1, rounds=1, max_test=64, method="backprop",
                    num_threads=2, samples=0, validation=0.1, out="/tmp/fwdkern_bos_probe")
    task = load_task(cfg, log=lambda *a: None)
    model, bos = task.model.eval(), task.lm.bos
    if not bos:
        raise SystemExit(f"{args.model}: its tokenizer adds no BOS")
    b = task.client_batches(0, 1)[0]
    ids, am, lab = b["input_ids"], b["attention_mask"], b["labels"].clone()
    first = ids[:, 0] == bos[0]
    ids, am, lab = ids[:, 1:], am[:, 1:], lab[:, 1:]  # drop BOS: the windows as they were without it
    lab[:, 0] = IGNORE  # a window's first token is context either way
    with torch.no_grad():
        without = float(causal_lm_loss(model(input_ids=ids, attention_mask=am).logits, lab))
        B = torch.full((ids.shape[0], 1), bos[0])
        with_bos = float(causal_lm_loss(model(input_ids=torch.cat([B, ids], 1),
                                              attention_mask=torch.cat([torch.ones_like(B), am], 1)).logits,
                                        torch.cat([torch.full_like(B, IGNORE), lab], 1)))
    row = dict(model=args.model, windows=int(ids.shape[0]), windows_starting_with_bos=int(first.sum()),
               loss_without_bos=without, loss_with_bos=with_bos, commit=git_commit(HERE), **environment())
    print(json.dumps(row, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
