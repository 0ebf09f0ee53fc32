"""The whole LoRA life cycle on the embedded SmolLM2-135M-Instruct, in the library API.

Run: .venv/bin/python examples/quickstart.py
"""

import tempfile

import torch

from deltatune import DeltaModel, LoraConfig, get_peft_model
from deltatune.models import load_default

base, tokenizer = load_default()
ids = tokenizer("Translate to French: good morning", return_tensors="pt").input_ids
config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
model = get_peft_model(base, config)
model.print_trainable_parameters()

with torch.no_grad():  # stand-in for training: give lora_B some weight so the adapter does something
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.01)
model.eval()

with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors (Hugging Face PEFT layout)
    with torch.no_grad():
        unmerged = model(ids).logits
    fresh, _ = load_default()
    reloaded = DeltaModel.from_pretrained(fresh, out)
    with torch.no_grad():
        reload_diff = (reloaded(ids).logits - unmerged).abs().max().item()
        merged = reloaded.merge_and_unload()  # a plain Transformers model again
        merge_diff = (merged(ids).logits - unmerged).abs().max().item()
print(f"reloaded vs saved: max |diff| = {reload_diff:.2e}")
print(f"merged vs unmerged: max |diff| = {merge_diff:.2e} -> {'agree' if merge_diff < 1e-4 else 'DISAGREE'}")
