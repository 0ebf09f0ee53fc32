"""LoRA extraction: any mergeable delta -> a LoRA of a chosen rank by truncated SVD.

For each adapted layer, delta W (out, fan_in) = U S V^T; the rank-r LoRA keeps the top r triplets:
    B = U[:, :r] * S[:r]  (out, r),   A = V^T[:r]  (r, fan_in),   scaling = lora_alpha / r = 1,
as `peft`'s SVD merge and kohya's extraction scripts do. The error reported per layer is the relative
Frobenius norm ||delta W - B A||_F / ||delta W||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2), and overall
the same ratio over all layers together. The result is a plain LoRA in the Hugging Face PEFT layout,
so servers that read only LoRA (vLLM, SGLang, LoRAX) can load it.

Sources of a delta:
- an adapter of a DeltaModel: LoRA, DoRA, LoHa, LoKr, IA3, OFT ... anything that merges, asked through
  its protocols (core/protocols.py): an Additive adapter gives `delta_weight`, its true update (DoRA
  included); a Reparameterizing one merged(W) - W, against the unmerged base;
- a full fine-tune: its weight minus the base model's, per linear / embedding / conv layer.

Layouts ("out-first" 2-D, what the SVD sees):
  nn.Linear (out, in) -> (out, in)        Transformers Conv1D (in, out) -> transposed
  nn.Embedding (num, dim) -> (dim, num)   ConvNd (out, in, *k) -> (out, in * prod(k))
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.config import DeltaConfigError
from ..core.layer import DeltaLayer, ModulesToSave
from ..core.merging import merge_rule
from ..core.model import DeltaModel
from ..core.protocols import Additive, LowRank, Reparameterizing, declares
from ..io.adapter_files import read_adapter, save_adapters, weights_fill
from ..io.atomic import write_json
from ..io.diffusers_layout import component_of
from ..io.models import load_weights
from ..io.pipelines import is_pipeline_folder
from ..methods.lora import KINDS, LoraConfig

REPORT_NAME = "extraction_report.json"


# ---------------------------------------------------------------------------------------------- layouts
def to_out_first(base: BaseLayer, delta: torch.Tensor) -> torch.Tensor:
    """A delta in the base weight's layout -> the 2-D (out, fan_in) matrix the SVD works on."""
    if base.kind == "embedding":
        return delta.T
    delta = base.to_out_first(delta)  # the view knows Conv1D's (in, out) layout
    return delta.flatten(1) if delta.dim() > 2 else delta


def layer_delta(layer: DeltaLayer, adapter_name: str, unrepresented: list[str] | None = None) -> torch.Tensor:
    """Adapter `adapter_name`'s float32 update of `layer`'s base weight, in the base weight's layout.

    Asks the protocols (core/protocols.py), never the method: an Additive adapter gives `delta_weight(base)`,
    the true update for every variant (DoRA's magnitude included); a Reparameterizing one that is not
    Additive (IA3, OFT) gives merged_weight(base, W, reference) - W. An update that is not a plain addition
    (merge_rule other than "additive") depends on W, so it needs W to be the plain base weight (nothing
    merged). A method whose merge also rewrites other base tensors (IA3 scales the bias) has them restored
    afterwards and their names appended to `unrepresented`: a weight delta cannot carry them.

    Raises:
        DeltaConfigError: the adapter declares no weight update (neither Additive nor Reparameterizing).
        RuntimeError: the update depends on W and adapters are merged into this layer.
    """
    adapter = layer.adapters[adapter_name]
    if not declares(adapter, Additive) and not declares(adapter, Reparameterizing):
        reason = adapter.merge_refusal() or "it declares neither Additive nor Reparameterizing"
        raise DeltaConfigError(f"{layer.module_name}: adapter {adapter_name!r} ({type(adapter).__name__}) "
                               f"has no mergeable weight update: {reason}")
    if layer.merged and merge_rule(adapter) != "additive":
        raise RuntimeError(f"{layer.module_name}: adapters {layer.merged} are merged into the base weight; "
                           "call unmerge_adapter() first (the update of a non-additive adapter depends on W)")
    base = layer.base
    if declares(adapter, Additive):
        return adapter.delta_weight(base).detach().float()
    others = {name: p.detach().clone() for name, p in base.module.named_parameters() if name != "weight"}
    reference = base.merge_reference()
    weight = reference["weight"]
    with torch.no_grad():
        delta = adapter.merged_weight(base, weight.clone(), reference).float() - weight
        for name, saved in others.items():
            live = base.module.get_parameter(name)
            if not torch.equal(live, saved):
                live.copy_(saved)
                if unrepresented is not None:
                    unrepresented.append(f"{layer.module_name}.{name}")
    return delta


def truncated_svd(matrix: torch.Tensor, rank: int, full_matrices: bool = False,
                  clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """matrix (out, fan_in) ~= B @ A with B (out, rank), A (rank, fan_in); factors are zero-padded when
    the matrix has fewer than `rank` singular values. Returns (B, A, dropped energy, total energy), the
    energies being sums of squared singular values (the squared Frobenius norms). `clamp` is a quantile:
    entries of B and A are clipped to +-that quantile of their joint values (peft's svd_clamp)."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=full_matrices)
    keep = min(rank, s.shape[0])
    b = u[:, :keep] @ torch.diag(s[:keep])
    a = vh[:keep, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    if keep < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - keep)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - keep, a.shape[1])], dim=0)
    energy = s.double().square()
    return b, a, float(energy[keep:].sum()), float(energy.sum())


def lora_factors(adapter: LowRank) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The live (A, B, scaling) of a LowRank adapter compose/ writes into (a plain LoRA it made)."""
    found = adapter.factors() if declares(adapter, LowRank) else None
    if found is None:
        raise TypeError(f"{type(adapter).__name__} gives no low-rank factors to write into")
    return found


@torch.no_grad()
def set_lora_factors(adapter: LowRank, b: torch.Tensor, a: torch.Tensor) -> None:
    """Copy out-first 2-D factors B (out, r), A (r, fan_in) into a LoRA adapter's own shapes."""
    live_a, live_b, _ = lora_factors(adapter)
    live_b.copy_(b.reshape(live_b.shape).to(live_b.dtype))
    live_a.copy_(a.reshape(live_a.shape).to(live_a.dtype))


# ---------------------------------------------------------------------------------------------- report
POOR_FIT = 0.1  # an overall relative error above this gets a warning wherever a report is printed


def fit_warning(error: float, rank: int) -> str | None:
    """A warning line when a rank-`rank` LoRA keeps too little of the update (relative error > POOR_FIT)."""
    if error <= POOR_FIT:
        return None
    return (f"warning: the rank-{rank} LoRA misses {error:.0%} of the update (relative Frobenius error > "
            f"{POOR_FIT}): it will not behave like the source adapter; convert with a higher rank (a "
            "multiplicative method such as IA3 changes whole weights and needs one near the layer width)")


@dataclass
class ExtractionReport:
    """How well the rank-`rank` LoRA approximates the source delta.

    Attributes:
        rank: the LoRA rank.
        layer_errors: module name -> ||delta - B A||_F / ||delta||_F (0 for an all-zero delta).
        overall_error: the same ratio over all layers together.
        skipped: parameters that changed but a LoRA cannot carry (biases, norms), or layers left out.
        adapter_name: the name of the LoRA adapter in the returned model.
    """

    rank: int
    layer_errors: dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0
    skipped: list[str] = field(default_factory=list)
    adapter_name: str = "default"

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.layer_errors.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        return {"rank": self.rank, "overall_relative_frobenius_error": self.overall_error,
                "layer_relative_frobenius_errors": self.layer_errors, "skipped": self.skipped}

    def __str__(self) -> str:
        lines = [f"LoRA rank {self.rank}: {len(self.layer_errors)} layers, relative Frobenius error "
                 f"{self.overall_error:.4f} overall"]
        lines += [f"  {name}: {err:.4f}" for name, err in self.worst()]
        if self.skipped:
            lines.append(f"  not representable as LoRA (left out): {len(self.skipped)}, "
                         f"e.g. {self.skipped[:3]}")
        warning = fit_warning(self.overall_error, self.rank)
        return "\n".join(lines + ([warning] if warning else []))


class _ErrorTally:
    def __init__(self) -> None:
        self.errors: dict[str, float] = {}
        self.dropped = self.total = 0.0

    def add(self, name: str, dropped: float, total: float) -> None:
        self.errors[name] = math.sqrt(dropped / total) if total > 0 else 0.0
        self.dropped += dropped
        self.total += total

    def overall(self) -> float:
        return math.sqrt(self.dropped / self.total) if self.total > 0 else 0.0


def _compact_targets(model, names: list[str]) -> list[str]:
    """The leaf names (["q_proj", "v_proj"]) when they select exactly `names`; else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = {n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in leaves}
    return leaves if chosen == set(names) else sorted(names)


# ---------------------------------------------------------------------------------------------- adapters
@torch.no_grad()
def extract_lora(model, adapter_name: str, rank: int, new_adapter_name: str | None = None,
                 full_matrices: bool = False) -> ExtractionReport:
    """Add to DeltaModel `model` a LoRA of rank `rank` approximating adapter `adapter_name`.

    Args:
        model: a DeltaModel holding `adapter_name` (any mergeable method).
        adapter_name: the source adapter.
        rank: the LoRA rank (factors are zero-padded in layers with fewer singular values).
        new_adapter_name: the new adapter's name (default: "<adapter_name>_lora").
        full_matrices: passed to torch.linalg.svd (the result is the same; False is faster).

    Returns:
        An ExtractionReport with the relative Frobenius error per layer and overall.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise DeltaConfigError(f"rank={rank!r}: must be a positive integer")
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(model.peft_config)}")
    new_name = new_adapter_name or f"{adapter_name}_lora"
    source = model.peft_config[adapter_name]
    layers = {path: layer for path, layer in model.delta_layers()
              if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters}
    skipped = [path for path, layer in layers.items() if layer.base.kind not in KINDS]
    deltas = {path: to_out_first(layer.base, layer_delta(layer, adapter_name, skipped))
              for path, layer in list(layers.items()) if path not in skipped}
    if not deltas:
        raise DeltaConfigError(f"adapter {adapter_name!r} ({source.peft_type}) adapts no layer a LoRA can "
                               "carry (linear, embedding, conv); nothing to extract")
    config = LoraConfig(r=rank, lora_alpha=rank, task_type=source.task_type,
                        base_model_name_or_path=source.base_model_name_or_path,
                        target_modules=_compact_targets(model.model, list(deltas)),
                        fan_in_fan_out=any(layers[p].base.fan_in_fan_out for p in deltas),
                        modules_to_save=source.modules_to_save, bias=getattr(source, "bias", "none"))
    model.inject(new_name, config)
    tally = _ErrorTally()
    try:
        for path, delta in deltas.items():
            b, a, dropped, total = truncated_svd(delta, rank, full_matrices)
            set_lora_factors(layers[path].adapters[new_name], b, a)
            tally.add(path, dropped, total)
        _copy_trained_heads(model, adapter_name, new_name)
    except BaseException:
        model.delete_adapter(new_name)
        raise
    return ExtractionReport(rank, tally.errors, tally.overall(), skipped, new_name)


def _copy_trained_heads(model, source: str, target: str) -> None:
    """Fully trained modules (classifier heads) of `source` carry over to `target` unchanged."""
    for _, wrapper in model.delta_layers():
        if isinstance(wrapper, ModulesToSave) and source in wrapper.copies and target in wrapper.copies:
            wrapper.copies[target].load_state_dict(wrapper.copies[source].state_dict())


# ------------------------------------------------------------------------------------------ full fine-tunes
@torch.no_grad()
def extract_lora_from_finetune(base: nn.Module, finetuned: nn.Module | dict[str, torch.Tensor], rank: int,
                               target_modules: list[str] | str | None = None, adapter_name: str = "default",
                               full_matrices: bool = False):
    """Wrap `base` in a DeltaModel whose LoRA (rank `rank`) approximates finetuned - base.

    Args:
        base: the base model (its weights are not changed).
        finetuned: the fully fine-tuned model with the same architecture, or its state dict.
        rank: the LoRA rank.
        target_modules: which layers to extract (LoraConfig's forms); default: every linear, embedding
            or conv layer (output head included) whose weight differs from the base's.
        adapter_name: the name of the LoRA adapter.
        full_matrices: passed to torch.linalg.svd.

    Returns:
        (DeltaModel, ExtractionReport); the report lists changed parameters a LoRA cannot carry
        (biases, norm weights) under `skipped`.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise DeltaConfigError(f"rank={rank!r}: must be a positive integer")
    tuned = finetuned if isinstance(finetuned, dict) else finetuned.state_dict()
    own = base.state_dict()
    missing = [k for k in own if k not in tuned]
    if missing or any(tuned[k].shape != v.shape for k, v in own.items()):
        bad = missing[:3] or [k for k, v in own.items() if tuned[k].shape != v.shape][:3]
        raise DeltaConfigError(f"the fine-tuned model does not match the base model's parameters, e.g. {bad}")
    changed = {k for k, v in own.items()
               if v.is_floating_point() and not torch.equal(tuned[k].to(v.dtype), v)}
    layer_weights = {name + ".weight": name for name, module in base.named_modules()
                     if name and BaseLayer(module).kind in KINDS}
    if target_modules is None:
        names = [layer_weights[k] for k in own if k in layer_weights and k in changed]
        if not names:
            raise DeltaConfigError("the fine-tuned model's linear/embedding/conv weights equal the base's; "
                                   "nothing to extract")
        target_modules = _compact_targets(base, names)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules,
                        fan_in_fan_out=any(BaseLayer(m).fan_in_fan_out for m in base.modules()))
    model = DeltaModel(base, config, adapter_name)
    tally = _ErrorTally()
    covered = set()
    for path, layer in model.delta_layers():
        key = path + ".weight"
        covered.add(key)
        delta = tuned[key].float() - layer.base.read_weight().float()
        b, a, dropped, total = truncated_svd(to_out_first(layer.base, delta), rank, full_matrices)
        set_lora_factors(layer.adapters[adapter_name], b, a)
        tally.add(path, dropped, total)
    skipped = sorted(changed - covered)
    return model, ExtractionReport(rank, tally.errors, tally.overall(), skipped, adapter_name)


# ---------------------------------------------------------------------------------------------- files (CLI)
def convert_to_lora(out: str | os.PathLike, rank: int, adapter: str | os.PathLike | None = None,
                    finetuned: str | os.PathLike | None = None, base_model: str | os.PathLike | None = None,
                    target_modules: list[str] | str | None = None, dtype: torch.dtype = torch.float32,
                    allow_pickle: bool = False) -> ExtractionReport:
    """Write a LoRA (PEFT layout) of rank `rank` approximating an adapter or a full fine-tune.

    `deltatune convert --to lora --rank R --adapter DIR --out DIR` calls
    `convert_to_lora(out=DIR, rank=R, adapter=DIR)`.

    Args:
        out: the output directory (adapter_config.json, adapter_model.safetensors and
            extraction_report.json are written there).
        rank: the LoRA rank.
        adapter: a saved adapter directory (any mergeable method); exactly one of adapter/finetuned.
        finetuned: a fully fine-tuned Transformers model directory.
        base_model: the base model (alias such as "smollm2-135m" or a local directory); default: the
            adapter config's `base_model_name_or_path` (required with `finetuned`).
        target_modules: with `finetuned`, which layers to extract (default: every changed layer).
        dtype: the dtype the models are loaded in.
        allow_pickle: accept a pickled adapter_model.bin.

    Returns:
        The ExtractionReport (also saved as extraction_report.json).
    """
    if (adapter is None) == (finetuned is None):
        raise DeltaConfigError("give exactly one of adapter=DIR (an adapter) or finetuned=DIR "
                               "(a full fine-tune)")
    if adapter is not None:
        config, weights = read_adapter(adapter, allow_pickle=allow_pickle)
        base_name = base_model or config.base_model_name_or_path
        if not base_name:
            raise DeltaConfigError(f"{adapter}: the adapter config has no base_model_name_or_path; "
                                   "pass base_model")
        component = component_of(config, Path(adapter), None) if is_pipeline_folder(base_name) else None
        base = load_weights(base_name, dtype, config.task_type, component)
        config.inference_mode = True
        model = DeltaModel(base, config, "source", fill=weights_fill(weights, str(adapter)))
        report = extract_lora(model, "source", rank, new_adapter_name="default")
        model.peft_config["default"].base_model_name_or_path = str(base_name)
        save_adapters(model, out, ["default"])
    else:
        if base_model is None:
            raise DeltaConfigError("finetuned=DIR needs base_model (the model it was fine-tuned from)")
        base = load_weights(base_model, dtype, None)
        tuned = load_weights(finetuned, dtype, None)
        model, report = extract_lora_from_finetune(base, tuned, rank, target_modules)
        model.peft_config["default"].base_model_name_or_path = str(base_model)
        save_adapters(model, out)
    write_json(Path(out) / REPORT_NAME, report.to_dict())
    return report
