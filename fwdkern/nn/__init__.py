"""Modules built on the fwdkern ops (LoRA layers) and stable parameter ids."""
from .lora import LoRALinear, assign_param_ids, param_id  # noqa: F401
from .pooling import SentenceEncoderForSequenceClassification, sentence_transformers_pooling  # noqa: F401

__all__ = ["LoRALinear", "assign_param_ids", "param_id", "SentenceEncoderForSequenceClassification",
           "sentence_transformers_pooling"]
