"""The whole LoRA life cycle on the embedded SmolLM2-135M-Instruct, in the library API.

Run: .venv/bin/python examples/quickstart.py   (the same numbers every run: the stand-in weights are seeded)
"""

import copy
import tempfile

import torch

from deltatune import DeltaModel, LoraConfig, get_peft_model
from deltatune.models import load_default


def main() -> dict[str, float]:
    """Add LoRA, save, reload, merge; returns the max |logit| differences that the printout judges."""
    torch.manual_seed(0)  # the stand-in weights below: every run prints the same numbers
    base, tokenizer = load_default()
    ids = tokenizer("Translate to French: good morning", return_tensors="pt").input_ids
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    with torch.no_grad():  # stand-in for training: give lora_B some weight so the adapter does something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.eval()

    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors (the peft layout)
        with torch.no_grad():
            unmerged = model(ids).logits
        fresh, _ = load_default()
        reloaded = DeltaModel.from_pretrained(fresh, out)
    with torch.no_grad():
        reload_diff = (reloaded(ids).logits - unmerged).abs().max().item()  # same weights, same ops: 0
        # Merging reorders float32 arithmetic, so merged and unmerged logits (about 30 in size here, where
        # float32 steps are 2e-6) differ by rounding. How much rounding moves them is measured, not guessed:
        # the same unmerged model in float64 gives the rounding error of one float32 pass.
        rounding = (copy.deepcopy(reloaded).double()(ids).logits - unmerged).abs().max().item()
        merged = reloaded.merge_and_unload()  # a plain Transformers model again
        merge_diff = (merged(ids).logits - unmerged).abs().max().item()
    tolerance = 4 * rounding  # two float32 passes, each off by up to `rounding`, with room to spare
    print(f"reloaded vs saved: max |diff| = {reload_diff:.2e}")
    verdict = "agree" if merge_diff <= tolerance else "DISAGREE"
    print(f"merged vs unmerged: max |diff| = {merge_diff:.2e} "
          f"(float32 rounding here: {rounding:.2e}) -> {verdict}")
    return {"reload_diff": reload_diff, "merge_diff": merge_diff, "rounding": rounding}


if __name__ == "__main__":
    main()
