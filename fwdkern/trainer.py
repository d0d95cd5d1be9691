"""A Hugging Face ``Trainer`` that fine-tunes with forward gradients instead of backpropagation.

``ForwardGradientTrainer`` is a drop-in ``transformers.Trainer``: each training step runs one dual
forward (:func:`fwdkern.jvp`: the loss and its directional derivatives along K seeded
perturbations of the trainable tensors), writes the forward-gradient estimate
``g = (1/K) sum_k jvp_k v_k`` into the parameters' ``.grad`` (never materializing a v), and
leaves the rest to the Trainer: the optimizer and its learning-rate schedule, gradient
clipping, logging, evaluation and checkpoints. Gradient accumulation means more tangents:
each micro-batch gets its own perturbations and the estimates add up. No activation is
stored, so memory stays at inference level.

    model = fwdkern.patch(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2))
    trainer = ForwardGradientTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                     perturbations=16)
    trainer.train()
    trainer.save_model("out/")   # peft adapter format (adapter_config.json + adapter_model.safetensors)
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer

import torch.nn.functional as F

from .engine import capture_input, jvp, load_adapter, save_adapter, trainable
from .engine.head import trainable_head
from .engine.losses import IGNORE, loss_kind
from .engine.patching import get_config
from .ops import seeded_axpy_

__all__ = ["ForwardGradientTrainer"]


def _seed(base: int, step: int, micro: int) -> int:
    import hashlib

    h = hashlib.blake2b(f"{base}:{step}:{micro}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


class ForwardGradientTrainer(Trainer):
    """``transformers.Trainer`` with forward gradients (see the module docstring).

    Args (besides the Trainer's):
        perturbations: K tangents per micro-batch (the estimate's cosine with the true gradient
            grows like sqrt(K / d) for d trainable values).
        dist: "rademacher" or "gaussian" perturbations.
        tangent_scope: "batch" (each tangent's derivative is of the micro-batch's loss) or "sample"
            (`perturbations` tangents for each sample, each the derivative of its own sample's share
            of the loss: B times the directions at the same compute, one dual pass;
            :func:`fwdkern.jvp`'s per_sample, LoRA layers only).
        loss: "auto" (from the model class), "classification" or "causal_lm".
        head: "exact" (classification: the classifier head -- a patched model's ``modules_to_save`` -- gets
            its exact gradient from its own input features, a backward through the head only; the body
            gets the forward-gradient estimate), "perturb" (every trainable tensor gets the forward-gradient
            estimate) or "auto" (exact when there is such a head).
    The model must be patched (:func:`fwdkern.patch`) or hold :class:`fwdkern.LoRALinear` layers.
    """

    def __init__(self, *args, perturbations: int = 16, dist: str = "rademacher", loss: str = "auto",
                 head: str = "auto", tangent_scope: str = "batch", **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(perturbations, bool) or not isinstance(perturbations, int) or perturbations < 1:
            raise ValueError(f"perturbations: expected a positive int, got {perturbations!r}")
        get_config(self.model)  # fails early, with the fix, on a model without adapters
        if head not in ("auto", "exact", "perturb"):
            raise ValueError(f"head: {head!r} is not one of auto, exact, perturb")
        if tangent_scope not in ("batch", "sample"):
            raise ValueError(f"tangent_scope: {tangent_scope!r} is not one of batch, sample")
        self.tangent_scope = tangent_scope
        self.perturbations, self.dist, self.loss_kind = perturbations, dist, loss
        self._micro = 0
        self.head_path, self.head_names = None, []
        if head != "perturb" and loss_kind(self.model, loss) == "classification":
            self.head_path, self.head_names = trainable_head(self.model)
        if head == "exact" and self.head_path is None:
            raise ValueError("head='exact' needs a classification model with a trainable head (modules_to_save)")

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        accum = max(1, self.args.gradient_accumulation_steps)
        step = self.state.global_step
        seed = _seed(self.args.seed, step, self._micro)
        self._micro = (self._micro + 1) % accum
        K = self.perturbations
        # "sample": K tangents for each of the B samples (ks[j * B + b] is sample b's j-th); each derivative
        # is of its sample's share of the loss, so sum_k jv_k v_k / K is unbiased for the batch gradient
        per_sample = self.tangent_scope == "sample"
        ks = list(range(K * int(inputs["input_ids"].shape[0]) if per_sample else K))
        tr = trainable(model)
        head = set(self.head_names)
        body = [n for n, _, _ in tr if n not in head]
        if self.head_path is None:
            loss, jv = jvp(model, inputs, seed, ks, dist=self.dist, loss=self.loss_kind, per_sample=per_sample)
        else:
            with capture_input(model.get_submodule(self.head_path)) as cap:
                if body:
                    loss, jv = jvp(model, inputs, seed, ks, dist=self.dist, loss=self.loss_kind, params=body,
                                   per_sample=per_sample)
                else:
                    with torch.no_grad():
                        model.eval()
                        loss, jv = model(**inputs).loss, None
            self._head_grad(model, cap.x, inputs["labels"], accum)
        if jv is not None:
            coeffs = (jv.double() / (K * accum)).tolist()
            for n, pid, p in tr:
                if n in head:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                seeded_axpy_(p.grad, seed, pid, ks, coeffs, self.dist)
        return loss.detach() / accum

    def _head_grad(self, model, x, labels, accum):
        """The head's exact gradient from its captured input (a backward through the head only)."""
        head = model.get_submodule(self.head_path)
        prefix = self.head_path + "."
        params = {n[len(prefix):]: p for n, _, p in trainable(model) if n in set(self.head_names)}
        keep = labels != IGNORE
        with torch.enable_grad():
            local = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            logits = torch.func.functional_call(head, local, (x,))
            loss = F.cross_entropy(logits.float()[keep], labels[keep])
            grads = torch.autograd.grad(loss, list(local.values()))
        for p, g in zip(params.values(), grads):
            p.grad = (g / accum).to(p.dtype) if p.grad is None else p.grad + (g / accum).to(p.dtype)

    def _save(self, output_dir=None, state_dict=None):
        """The adapter in peft's format, plus the tokenizer and training arguments as the Trainer saves them."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_adapter(model or self.model, resume_from_checkpoint)
