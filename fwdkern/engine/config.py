"""FwdkernConfig: what `patch` did to a model, and the peft adapter JSON it owns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class FwdkernConfig:
    """The adapter settings of a patched model (``model.fwdkern_config``).

    r, alpha: LoRA rank and alpha (scaling alpha / r). target_modules: the names matched (peft's
    rule: equal, or ending in "." + name). modules_to_save: modules trained as full tensors (the
    classifier head). fan_in_fan_out: Conv1D layers were converted (GPT-2). adopted: the model
    was not patched, its hand-inserted LoRALinear layers were adopted as they are (only their
    adapter tensors are trainable).
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: Union[list, str, None] = None
    dropout: float = 0.0
    train_bias: bool = False
    modules_to_save: list = field(default_factory=list)
    fan_in_fan_out: bool = False
    adopted: bool = False
    peft_type: str = "lora"  # lora | ia3 | bitfit | adapter
    feedforward_modules: list = field(default_factory=list)  # ia3: layers whose input is scaled
    reduction: int = 16  # adapter: hidden = dim // reduction

    def to_peft_json(self, task_type: Optional[str], base_model: Optional[str]) -> dict:
        """peft's adapter_config.json for this adapter (peft_type LORA or IA3; BitFit and bottleneck
        adapters, which peft does not have, use the same file with peft_type BITFIT / ADAPTER)."""
        targets = self.target_modules
        targets = list(targets) if isinstance(targets, (list, tuple)) else targets
        common = {"task_type": task_type, "base_model_name_or_path": base_model, "inference_mode": True,
                  "modules_to_save": list(self.modules_to_save) or None}
        if self.peft_type == "ia3":
            return dict(common, peft_type="IA3", target_modules=targets,
                        feedforward_modules=list(self.feedforward_modules), fan_in_fan_out=self.fan_in_fan_out,
                        init_ia3_weights=True)
        if self.peft_type == "bitfit":
            return dict(common, peft_type="BITFIT")
        if self.peft_type == "adapter":
            return dict(common, peft_type="ADAPTER", target_modules=targets, reduction=self.reduction,
                        non_linearity="relu")
        if self.train_bias:
            raise ValueError("save_adapter: train_bias=True (peft bias='lora_only') is not supported by the peft "
                             "format writer yet")
        targets = self.target_modules
        return {
            "peft_type": "LORA", "task_type": task_type, "r": self.r, "lora_alpha": self.alpha,
            "target_modules": list(targets) if isinstance(targets, (list, tuple)) else targets,
            "lora_dropout": self.dropout, "bias": "none", "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": list(self.modules_to_save) or None, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
        }

    @classmethod
    def from_peft_json(cls, cfg: dict, where: str = "adapter_config.json") -> "FwdkernConfig":
        kind = cfg.get("peft_type")
        saved = list(cfg.get("modules_to_save") or [])
        if kind == "IA3":
            return cls(peft_type="ia3", target_modules=cfg.get("target_modules"), modules_to_save=saved,
                       feedforward_modules=list(cfg.get("feedforward_modules") or []),
                       fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)))
        if kind == "BITFIT":
            return cls(peft_type="bitfit", modules_to_save=saved)
        if kind == "ADAPTER":
            return cls(peft_type="adapter", target_modules=cfg.get("target_modules"), modules_to_save=saved,
                       reduction=int(cfg.get("reduction", 16)))
        if kind != "LORA":
            raise ValueError(f"{where}: peft_type {kind!r} is not one of LORA, IA3, BITFIT, ADAPTER")
        if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError(f"{where}: DoRA / rsLoRA / rank or alpha patterns are not supported")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in cfg:
                raise ValueError(f"{where}: no {key!r}")
        r = cfg["r"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{where}: r must be a positive int, got {r!r}")
        return cls(r=r, alpha=float(cfg["lora_alpha"]), target_modules=cfg["target_modules"],
                   dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                   modules_to_save=list(cfg.get("modules_to_save") or []),
                   fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)))

    def replace(self, **kw) -> "FwdkernConfig":
        return dataclasses.replace(self, **kw)
