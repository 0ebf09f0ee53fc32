"""Reusable invariant checks for merging, disabling and unloading (DESIGN.md section 8).

Each check takes a DeltaModel and the inputs of one forward (a dict of keyword arguments or a tensor) and
compares against numbers it computes itself, never against another library:

- assert_merged_equals_unmerged: merge_adapter() changes no output, unmerge_adapter() restores the base
  parameters (every parameter outside the adapters) and the unmerged output.
- assert_disable_is_base: inside disable_adapter() the output equals the base model's, bit for bit.
- assert_unload_is_base: unload() gives back the original base parameters and outputs.
- base_parameters / model_output: the helpers the checks are built on.
"""

from __future__ import annotations

import torch

ADAPTER_PARTS = (".adapters.", ".copies.")  # parameters owned by adapters, not by the base model


def model_output(model, inputs) -> torch.Tensor:
    """The main output tensor (logits, or the tensor a plain module returns) of model(**inputs)."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def base_parameters(model) -> dict[str, torch.Tensor]:
    """Copies of every base-model parameter (adapter parameters left out), by their path with wrapper
    names removed, so a wrapped and an unloaded model give the same keys. Tied parameters appear once per
    name; a parameter that a merge created (a new bias) shows up as an extra key."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        if any(part in name for part in ADAPTER_PARTS):
            continue
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        params[name] = param.detach().clone()
    return params


def _assert_parameters_equal(before: dict, after: dict, what: str, atol: float, rtol: float) -> None:
    assert before.keys() == after.keys(), f"{what}: parameters differ {sorted(before.keys() ^ after.keys())}"
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{what}: {name} changed: {m}")


def assert_merged_equals_unmerged(model, inputs, atol: float = 1e-4, rtol: float = 1e-4,
                                  adapter_names: list[str] | None = None) -> torch.Tensor:
    """merge_adapter(adapter_names) keeps the output; unmerge_adapter() restores base and output.

    Start from an unmerged model. Returns the unmerged output. Tolerances are float32 rounding of one
    merge (the merged weight is a different sum of the same products)."""
    unmerged = model_output(model, inputs)
    before = base_parameters(model)
    model.merge_adapter(adapter_names)
    merged = model_output(model, inputs)
    scale = unmerged.abs().max().item() + 1e-12
    torch.testing.assert_close(merged, unmerged, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"merged != unmerged: {m}")
    model.unmerge_adapter()
    _assert_parameters_equal(before, base_parameters(model), "after unmerge", atol, rtol)
    torch.testing.assert_close(model_output(model, inputs), unmerged, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"unmerged output after merge + unmerge: {m}")
    return unmerged


def assert_disable_is_base(model, base_outputs: torch.Tensor, inputs, atol: float = 0.0,
                           rtol: float = 0.0) -> None:
    """Inside disable_adapter() the output equals `base_outputs` (the base model's, computed before the
    adapters were added); exactly by default."""
    with model.disable_adapter():
        out = model_output(model, inputs)
    torch.testing.assert_close(out, base_outputs, atol=atol, rtol=rtol,
                               msg=lambda m: f"disable_adapter() output != base output: {m}")


def assert_unload_is_base(model, base_params: dict, base_outputs: torch.Tensor, inputs,
                          atol: float = 0.0, rtol: float = 0.0):
    """unload() returns the base: the parameters in `base_params` (from `base_parameters(base)` taken
    before the adapters were added) and the base outputs. Returns the unloaded model."""
    plain = model.unload()
    _assert_parameters_equal(base_params, base_parameters(plain), "after unload", atol, rtol)
    torch.testing.assert_close(model_output(plain, inputs), base_outputs, atol=atol, rtol=rtol,
                               msg=lambda m: f"unload() output != base output: {m}")
    return plain
