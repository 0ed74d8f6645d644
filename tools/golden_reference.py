"""Record what the PERK reference's own code computes for one meta-training step (the golden fixture).

    python tools/golden_reference.py --reference /path/to/eric11eca-perk --out tests/fixtures/golden

The reference's own code runs in an environment where it runs (its code at commit 9b1a918 with transformers
4.51.3, peft 0.15.2, lightning 2.5.2, hydra-core 1.3): nothing of the reference is copied here; the
script imports it from ``--reference`` and adds import shims of its own for what the published code
lacks (a missing ``higher/ademamix.py``, a wrongly named ``perk.optimizer``, unconditional imports of
``liger_kernel`` and ``datasets``), and one numerical shim: transformers 4.51 computes the causal-LM
loss in fp32 whatever the model's dtype, so the same loss in the logits' dtype replaces it (an fp64
golden must not carry fp32 rounding).

What it writes to ``--out`` (committed; ``tests/test_golden_reference.py`` reads it):

* ``model/`` -- a tiny random GPT-2 (2 layers, hidden 16, dropouts 0) and a byte-level BPE
  tokenizer trained here, both with ``save_pretrained``; ``data/`` -- one babilong-style example
  in the reference's layout.
* ``golden.json`` + ``golden.safetensors`` -- per case (the published ``experiment/meta_train.yaml``;
  then at ``inner_lr=1e-2``: as published, a full unroll, ``weight_decay=0.1``, ``first_order`` with the
  truncated loop, ``inner_opt=sgd``):
  the Hydra-composed config, the token ids and label masks of the inner and outer rows, the initial
  meta-parameters (LoRA A/B, learned learning rates, weighting model), the inner loss of every step,
  the adapted adapters, the outer loss and every meta-gradient -- all fp64.
* ``reference.ckpt`` -- a Lightning checkpoint written by the reference's own module after one
  training step, and the parameters it holds (``ckpt/...`` in the safetensors), for the import test.

The example context is one document: with one document the reference's packed row, its unpacked
padded batch and perk_fast's segments are the same rows with the same normalisation, so every
number must agree to fp64 rounding. Dropout is switched off (the base's in its config, LoRA's 0.1
by replacing the dropout modules) because the two codes cannot draw the same masks; perk_fast runs
its meta-step in eval mode, where it draws none.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

# the published config as it is, then variants at a larger inner learning rate (so that the inner loop
# moves the adapters enough for the variants to differ clearly from each other)
CASES = {
    "meta_train": [],
    "truncated_lr": ["inner_lr=1e-2"],
    "full_unroll": ["inner_lr=1e-2", "inner_funct=default"],
    "weight_decay_0.1": ["inner_lr=1e-2", "weight_decay=0.1"],
    "first_order_truncated": ["inner_lr=1e-2", "first_order=true"],
    "inner_opt_sgd": ["inner_lr=1e-2", "inner_opt=sgd"],
}
CONTEXT = ["Mary moved to the kitchen after lunch. Then she picked up the red apple and went to the garden."]
QUESTION, ANSWER = "Where is Mary?", "garden"
SUPPORT = ["Then she picked up the red apple and went to the garden."]


def install_shims(reference: str) -> None:
    """Import shims of our own for the reference's published import errors (after transformers is
    imported, so that its optional-package probes see the real environment)."""
    import transformers  # noqa: F401

    sys.path.insert(0, reference)
    ademamix = types.ModuleType("higher.ademamix")

    class AdEMAMix:  # only used as a key of higher's optimiser table
        pass

    ademamix.AdEMAMix = AdEMAMix
    sys.modules["higher.ademamix"] = ademamix
    liger = types.ModuleType("liger_kernel")
    liger_tf = types.ModuleType("liger_kernel.transformers")
    liger_tf.apply_liger_kernel_to_qwen2 = lambda **kw: None
    liger.transformers = liger_tf
    sys.modules.update({"liger_kernel": liger, "liger_kernel.transformers": liger_tf})
    datasets = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise RuntimeError("datasets is not available in the golden run (longgorilla is not used)")

    datasets.load_dataset = load_dataset
    sys.modules["datasets"] = datasets
    import perk.lslr_schedular as lslr

    sys.modules["perk.optimizer"] = lslr


def keep_fp64_causal_lm_loss() -> None:
    """transformers 4.51's causal-LM loss casts the logits to fp32 before the cross-entropy, which would
    leave the reference's outer loss (and every meta-gradient through it) fp32-accurate in an fp64
    run. Replace it by the same loss -- labels shifted by one, mean cross-entropy over the targets --
    in the logits' own dtype, so that the golden numbers are fp64-accurate."""
    import torch.nn.functional as F
    from transformers.loss import loss_utils

    def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                       **kwargs):
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:].contiguous()
        flat = logits.reshape(-1, vocab_size)
        target = shift_labels.reshape(-1).to(flat.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction=reduction)
        return loss / num_items_in_batch if num_items_in_batch is not None else loss

    loss_utils.LOSS_MAPPING["ForCausalLM"] = causal_lm_loss


def make_model(out: str) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = CONTEXT + SUPPORT + [QUESTION, ANSWER, "You have memorized 1 documents.", "Answer:", "doc_0: doc_1:",
                                 "<support> </support> <output> </output>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts * 4, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                     model_max_length=128)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(hf_tok), n_positions=128, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=hf_tok.eos_token_id,
                     eos_token_id=hf_tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    path = os.path.join(out, "model")
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


def make_data(out: str) -> str:
    root = os.path.join(out, "data")
    row = {"context": CONTEXT, "question": QUESTION, "answer": ANSWER, "support": SUPPORT}
    for split in ("train", "validation", "test"):
        path = os.path.join(root, "babilong", "qa1_1k", f"{split}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(json.dumps(row) + "\n")
    return root


def compose(reference: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(reference, "configs"), version_base="1.3"):
        return hydra_compose(config_name="run.yaml", overrides=overrides)


def site_of(name: str) -> str:
    """``lm_model.base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight`` -> the module path."""
    core = name.split("base_model.model.", 1)[1]
    return core.split(".lora_", 1)[0]


def build_module(args):
    import torch
    from omegaconf import open_dict

    from perk.modules.meta_module import MetaLMModule

    with open_dict(args):
        args.run_dir = args.gen_dir = args.eval_dir = os.path.join(args.output_dir, "run")
    torch.manual_seed(0)
    module = MetaLMModule(args).double()
    for m in module.modules():  # LoRA's hard-coded 0.1 dropout: off (the two codes cannot share masks)
        if hasattr(m, "lora_dropout"):
            for key in list(m.lora_dropout.keys()):
                m.lora_dropout[key] = torch.nn.Identity()
    return module


def meta_parameters(module) -> dict:
    """Name -> tensor of the meta-parameters, keyed by module path (``A/<site>``, ``lr/B/<site>``, ...)."""
    out = {}
    for name, p in module.model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            out[f"{'A' if 'lora_A' in name else 'B'}/{site_of(name)}"] = p
        elif name.startswith("weighting_model."):
            out["weighting/" + name[len("weighting_model."):]] = p
    for key, p in module.inner_schedular.names_lr_dict.items():
        name = key.replace("-", ".")
        out[f"lr/{'A' if 'lora_A' in name else 'B'}/{site_of(name)}"] = p
    return out


def run_case(reference: str, overrides: list[str]) -> tuple[dict, dict]:
    import torch
    from omegaconf import OmegaConf

    import perk.model as ref_model

    args = compose(reference, overrides)
    module = build_module(args)
    params = meta_parameters(module)
    tensors = {f"init/{k}": p.detach().clone() for k, p in params.items()}
    inner_losses, adapted = [], {}
    original_forward = ref_model.CausalLM.forward

    def recording_forward(self, features, is_inner=False, inner_iter=0):
        out = original_forward(self, features, is_inner, inner_iter)
        if is_inner:
            inner_losses.append(float(out["loss"].detach()))
        return out

    inner_funct = module.inner_funct

    def capturing_inner_funct(features, fmodel, diffopt):
        result = inner_funct(features, fmodel, diffopt)
        for name, p in fmodel.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                adapted[f"adapted/{'A' if 'lora_A' in name else 'B'}/{site_of(name)}"] = p.detach().clone()
        return result

    ref_model.CausalLM.forward = recording_forward
    module.inner_funct = capturing_inner_funct
    try:
        batch = next(iter(module.train_dataloader()))
        out = module.step(batch)
        out["loss"].backward()
    finally:
        ref_model.CausalLM.forward = original_forward
    tensors.update(adapted)
    for k, p in params.items():
        tensors[f"grad/{k}"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    for key in ("train_input_ids", "train_attention_mask", "train_labels", "input_ids", "labels"):
        tensors[f"tokens/{key}"] = batch[key].detach().clone()
    record = {"config": OmegaConf.to_container(args, resolve=True), "inner_losses": inner_losses,
              "outer_loss": float(out["loss"].detach())}
    return record, tensors


def write_checkpoint(reference: str, overrides: list[str], path: str) -> dict:
    """One training step through Lightning, then ``trainer.save_checkpoint`` of the reference's module."""
    import lightning

    module = build_module(compose(reference, overrides))
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                                num_sanity_val_steps=0, limit_val_batches=0, enable_progress_bar=False,
                                precision="64-true")
    trainer.fit(module)
    trainer.save_checkpoint(path)
    return {f"ckpt/{k}": p.detach().clone() for k, p in meta_parameters(module).items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="a checkout of eric11eca/perk (commit 9b1a918)")
    ap.add_argument("--out", default="tests/fixtures/golden")
    args = ap.parse_args(argv)
    reference, out = os.path.abspath(args.reference), os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    install_shims(reference)
    keep_fp64_causal_lm_loss()
    import torch
    from safetensors.torch import save_file

    torch.set_default_dtype(torch.float64)  # the weighting model and schedular tensors are built fp64 too
    model = make_model(out)
    data = make_data(out)
    base = [f"model_name_or_path={model}", f"data_dir={data}", f"output_dir={os.path.join(out, '.run')}",
            "experiment=meta_train", "attn_implementation=eager", "lora_rank=4", "do_eval=false", "num_workers=0"]
    report, tensors = {"cases": {}, "base_overrides": [o for o in base if "=" in o and "/" not in o.split("=", 1)[1]]}, {}
    for name, extra in CASES.items():
        record, case_tensors = run_case(reference, base + extra)
        report["cases"][name] = {**record, "overrides": extra}
        tensors.update({f"{name}/{k}": v for k, v in case_tensors.items()})
        print(f"{name}: outer loss {record['outer_loss']:.12f}, inner losses {record['inner_losses']}")
    tensors.update(write_checkpoint(reference, base, os.path.join(out, "reference.ckpt")))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "golden.safetensors"))
    for case in report["cases"].values():  # paths of this machine are not part of the fixture
        for key in ("model_name_or_path", "data_dir", "output_dir", "run_dir", "gen_dir", "eval_dir"):
            case["config"].pop(key, None)
    with open(os.path.join(out, "golden.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
