"""Quantized base models: QLoRA (NF4 / FP4, double quantization), LLM.int8, LoftQ init, merge and export.

Two ways in, handled alike:

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(...))
    model = deltatune.quant.quantize(float_model, "nf4", double_quant=True, skip=["mlp.down_proj"])

then `get_peft_model(model, config)` as usual: every method runs on top of the quantized layer's own
forward, and merges go through core's base-layer view (core/base.py `read_weight` / `write_weight`), which
dequantize and requantize here (merging into a 4-bit base rounds the merged weight once more; the
warning states by how much). For an exact merged float model: `dequantize(model)` first, then
`merge_and_unload()`.

Dtypes: adapters are created in the quantized layer's compute dtype (float32 unless the spec or
Transformers' `bnb_4bit_compute_dtype` says otherwise); norms, biases and embeddings keep the dtype the
model was loaded in. Unlike peft's `prepare_model_for_kbit_training`, nothing is upcast to float32, so
each FSDP unit holds one float dtype beside the (non-flattened) quantized storage.

The backend interface is `backend.QuantBackend`; bitsandbytes (bnb.py) and HQQ (hqq.py, "hqq1".."hqq8",
when the hqq package is installed) are the registered backends.
"""

from . import bnb, hqq  # noqa: F401  (register the bitsandbytes and HQQ backends; each imports its library lazily)
from .backend import (
    QUANT_TYPES,
    QuantBackend,
    QuantizedMergeWarning,
    QuantSpec,
    backend_for,
    dequantize,
    dequantize_weight,
    get_backend,
    is_quantized,
    merge_errors,
    parameter_counts,
    parse_quantize,
    quantize,
    register_backend,
    requantize_weight,
    round_trip,
    set_module_walk,
    weight_bytes,
)
from .loftq import loftq_factors, loftq_spec

__all__ = ["QUANT_TYPES", "QuantBackend", "QuantSpec", "QuantizedMergeWarning", "backend_for", "dequantize",
           "dequantize_weight", "get_backend", "is_quantized", "loftq_factors", "loftq_spec", "merge_errors",
           "parameter_counts", "parse_quantize", "quantize", "register_backend", "requantize_weight", "round_trip",
           "set_module_walk", "weight_bytes"]
