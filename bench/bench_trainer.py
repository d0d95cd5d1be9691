"""ForwardGradientTrainer vs the stock transformers Trainer (backprop LoRA, with and without activation
checkpointing) on one machine: the same model, data, LoRA placement, optimizer and learning-rate grid.

    HF_HUB_OFFLINE=1 python bench/bench_trainer.py --out bench/results/trainer_cpu

all-MiniLM-L6-v2 with its sentence-transformers pooling, LoRA r=8 on the last layer's query/value (peft's
default modules, layers=[-1]: the dual pass starts there) + the classifier head, BBC News (train split of fwdkern.fl, 1 epoch, batch 16,
64 tokens), AdamW with a linear schedule, each provider's best of 3 learning rates by test accuracy
(445 examples). One process per run (peak RSS growth is measured from the loaded model). Writes
<out>/results.json and <out>/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LRS = [1e-3, 3e-3, 1e-2]
PROVIDERS = {
    "fwdkern_trainer": dict(kind="fwdkern", checkpointing=False),
    "backprop_trainer": dict(kind="backprop", checkpointing=False),
    "backprop_trainer_checkpointing": dict(kind="backprop", checkpointing=True),
}

CHILD = r'''
import json, os, sys, time
sys.path.insert(0, ROOT)
import torch, transformers
import fwdkern
from fwdkern.fl.config import RunConfig
from fwdkern.fl.data import federated_split, load_dataset
from fwdkern.fl.models import resolve_model_path
from fwdkern.nn import SentenceEncoderForSequenceClassification
from fwdkern.trainer import ForwardGradientTrainer
torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"): return int(line.split()[1]) * 1024
def rss():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * 4096
data = load_dataset("bbc_news")
train, test, _ = federated_split(data, RunConfig(clients=1, clients_per_round=1, max_test=445))
path = resolve_model_path("all-minilm-l6-v2")
tok = transformers.AutoTokenizer.from_pretrained(path)
torch.manual_seed(0)
model = SentenceEncoderForSequenceClassification.from_pretrained(path, len(data.label_names))
model = fwdkern.patch(model, r=8, alpha=16, layers=[-1])
enc = lambda texts: tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
class DS(torch.utils.data.Dataset):
    def __init__(self, d):
        e = enc(d.texts); self.ids, self.am, self.y = e["input_ids"], e["attention_mask"], torch.tensor(d.labels)
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return {"input_ids": self.ids[i], "attention_mask": self.am[i], "labels": self.y[i]}
ds = DS(train)
args = transformers.TrainingArguments(output_dir="/tmp/fwdkern_trainer_bench", per_device_train_batch_size=16,
    learning_rate=spec["lr"], num_train_epochs=1, logging_steps=20, save_strategy="no", report_to=[], use_cpu=True,
    seed=0, lr_scheduler_type="linear", disable_tqdm=True, activation_checkpointing=spec["checkpointing"],
    activation_checkpointing_kwargs={"use_reentrant": False} if spec["checkpointing"] else None)
if spec["kind"] == "fwdkern":
    trainer = ForwardGradientTrainer(model=model, args=args, train_dataset=ds, perturbations=16)
else:
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds)
base = rss()
open("/proc/self/clear_refs", "w").write("5")
c0, t0 = time.process_time(), time.perf_counter()
out = trainer.train()
cpu, wall = time.process_time() - c0, time.perf_counter() - t0
peak = hwm() - base
model.eval()
correct = 0
with torch.no_grad():
    for i in range(0, len(test), 64):
        e = enc(test.texts[i:i + 64])
        correct += int((model(**e).logits.argmax(-1) == torch.tensor(test.labels[i:i + 64])).sum())
steps = out.global_step
print("RESULT " + json.dumps({"accuracy": correct / len(test), "steps": steps, "cpu_s": cpu, "wall_s": wall,
      "steps_per_cpu_s": steps / cpu, "peak_rss_growth_mib": peak / 2**20, "train_loss": out.training_loss}))
'''


def run(spec):
    p = subprocess.run([sys.executable, "-c", CHILD.replace("ROOT", repr(ROOT), 1), json.dumps(spec)],
                       capture_output=True, text=True, timeout=7200, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(line[7:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from bench.common import environment

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    res = json.load(open(path)) if os.path.exists(path) else {"runs": {}}
    for name, spec in PROVIDERS.items():
        lrs = LRS if not spec["checkpointing"] else [None]
        for lr in lrs:
            if spec["checkpointing"]:  # the memory-matched rival: backprop's best lr, checkpointed
                best = max((r for k, r in res["runs"].items() if k.startswith("backprop_trainer@")),
                           key=lambda r: r["accuracy"])
                lr = best["lr"]
            key = f"{name}@{lr}"
            if key not in res["runs"]:
                print(f"[trainer bench] {key}", flush=True)
                res["runs"][key] = dict(run(dict(spec, lr=lr)), provider=name, lr=lr)
                res["environment"] = environment()
                json.dump(res, open(path, "w"), indent=1)
    best = {}
    for k, r in res["runs"].items():
        if r["provider"] not in best or r["accuracy"] > best[r["provider"]]["accuracy"]:
            best[r["provider"]] = r
    lines = [f"{res['environment']['cpu']}, 1 torch thread per run, torch {res['environment']['torch']}, "
             f"{res['environment']['date']}. MiniLM (mean pooling) + LoRA r=8 q,v last layer + head, BBC News, "
             "1 epoch, batch 16; best of lr " + ", ".join(map(str, LRS)) + " per provider.", "",
             "| provider | lr | test accuracy | steps / CPU s | CPU s | peak RSS growth (MiB) | all lrs (accuracy) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in best.items():
        all_lr = ", ".join(f"{x['lr']}: {x['accuracy']:.3f}" for x in res["runs"].values() if x["provider"] == name)
        lines.append(f"| {name} | {r['lr']} | {r['accuracy']:.3f} | {r['steps_per_cpu_s']:.2f} | {r['cpu_s']:.0f} | "
                     f"{r['peak_rss_growth_mib']:.0f} | {all_lr} |")
    open(os.path.join(args.out, "results.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
