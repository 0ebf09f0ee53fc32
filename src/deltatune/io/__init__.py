"""Files: the Hugging Face PEFT on-disk layout, safetensors, atomic writes."""
