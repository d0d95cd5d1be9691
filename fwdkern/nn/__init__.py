"""Modules built on the fwdkern ops (LoRA, IA3 and bottleneck adapters, sentence-embedding and prompt classifiers)
and stable parameter ids."""
from .lora import LoRALinear, assign_param_ids, param_id  # noqa: F401
from .peft_layers import BottleneckAdapter, IA3Linear  # noqa: F401
from .pooling import SentenceEncoderForSequenceClassification, sentence_transformers_pooling  # noqa: F401
from .verbalizer import VerbalizerForSequenceClassification  # noqa: F401
from .quant import QuantEmbedding, QuantLinear, quantized_bytes  # noqa: F401

__all__ = ["LoRALinear", "assign_param_ids", "param_id", "SentenceEncoderForSequenceClassification",
           "sentence_transformers_pooling", "VerbalizerForSequenceClassification", "IA3Linear", "BottleneckAdapter", "QuantLinear", "QuantEmbedding",
           "quantized_bytes"]
