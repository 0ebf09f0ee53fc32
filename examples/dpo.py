"""Preference tuning (DPO) with TRL on the embedded SmolLM2-135M-Instruct: a LoRA adapter learns to prefer
the chosen answers; the reference model is the same model with the adapter disabled (no second copy).

Run: .venv/bin/python examples/dpo.py   (needs trl; about 3 minutes of CPU time: the reference pass, then
4 steps; the loss starts at ln 2 and the reward margin grows to about +0.96 with every pair ranked right)

DeltaDPOTrainer is TRL's DPOTrainer; the only difference is where the reference comes from: it scores every
example once before training with `model.disable_adapter()` (TRL's `precompute_ref_log_probs` path), so the
reference is the base model exactly. DeltaKTOTrainer does the same for KTO; TRL's experimental ORPOTrainer
needs no reference and takes a DeltaModel as it is.
"""

import math
import tempfile

from datasets import Dataset
from trl import DPOConfig

from deltatune import DeltaDPOTrainer, LoraConfig, get_peft_model
from deltatune.models import load_default

base, tokenizer = load_default()
config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
model = get_peft_model(base, config)

# Conversational preference pairs: TRL applies the model's chat template to prompt + completion.
QUESTIONS_AND_ANSWERS = [  # (question, preferred answer, rejected answer)
    ("What is the capital of France?", "Paris.", "I am not sure, maybe Lyon."),
    ("How many legs does a spider have?", "Eight.", "Spiders have six legs."),
    ("What is 12 times 3?", "36.", "It is 42."),
    ("Which planet is closest to the Sun?", "Mercury.", "Venus, I think."),
    ("What colour do you get by mixing blue and yellow?", "Green.", "Purple."),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees.", "About 80 degrees."),
]
pairs = Dataset.from_dict({
    "prompt": [[{"role": "user", "content": q}] for q, _, _ in QUESTIONS_AND_ANSWERS],
    "chosen": [[{"role": "assistant", "content": good}] for _, good, _ in QUESTIONS_AND_ANSWERS],
    "rejected": [[{"role": "assistant", "content": bad}] for _, _, bad in QUESTIONS_AND_ANSWERS],
})

with tempfile.TemporaryDirectory() as out:
    args = DPOConfig(
        output_dir=out,
        beta=0.1,
        learning_rate=5e-4,
        max_steps=4,
        per_device_train_batch_size=3,
        logging_steps=1,
        bf16=False,  # float32 on a CPU; TRL's default is bf16 autocast
        save_strategy="no",  # the adapter is saved below with model.save_pretrained
        report_to=[],
        disable_tqdm=True,
    )
    trainer = DeltaDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    model.save_pretrained(f"{out}/adapter")  # adapter_config.json + adapter_model.safetensors

logs = [entry for entry in trainer.state.log_history if "loss" in entry]
print(f"step 1 loss {logs[0]['loss']:.6f} (ln 2 = {math.log(2):.6f}: the fresh adapter equals the reference)")
for step, entry in enumerate(logs, start=1):
    print(f"step {step}: loss {entry['loss']:.4f}  reward margin {entry['rewards/margins']:+.4f}  "
          f"pairs ranked right {entry['rewards/accuracies']:.2f}")
