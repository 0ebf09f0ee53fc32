"""The image-model life cycle beyond the conformance table: LoRA, DoRA, LoHa, LoKr and OFT on diffusers'
UNet2DConditionModel, SD3 and Flux transformers and the CLIP text encoder (the table's DIFFUSION families)
train (the output moves after one optimizer step, and the trained adapter still merges exactly), combine
(weighted merges), swap in place (hotswap) and become a LoRA (compose/extract's SVD). Each check is an
independent invariant: a weighted merge's update is the weighted sum of the sources' updates, a full-rank
extraction reproduces the source's update, a hotswapped model equals the swapped-in adapter loaded fresh.

Also: what "all-linear" means on a denoiser, and convolutions with padding modes other than zeros (diffusers'
VAEs and some UNets pad by reflection), where each method's unmerged output must equal its merged layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from conformance_rows import DIFFUSION, ROWS, base_model, build
from deltatune.compose.extract import extract_lora, layer_delta
from deltatune.compose.hotswap import hotswap_adapter
from deltatune.compose.weighted import add_weighted_adapter
from deltatune.core.layer import DeltaLayer
from test_conformance import make_inputs, output, randomize

METHODS = ("lora", "dora", "loha", "lokr", "oft")  # conformance rows
CASES = [pytest.param(m, f, id=f"{m}-{f}") for m in METHODS for f in DIFFUSION]
TOL = 1e-5


def deltas(model: dt.DeltaModel, adapter: str) -> dict[str, torch.Tensor]:
    return {path: layer_delta(layer, adapter) for path, layer in model.delta_layers()
            if isinstance(layer, DeltaLayer) and adapter in layer.adapters}


@pytest.mark.parametrize("row_id,family", CASES)
def test_a_training_step_moves_the_output_and_still_merges_exactly(row_id, family):
    """From the default init (output == base), one AdamW step on a noise-prediction-like MSE moves the output;
    the trained adapter's merged output equals its unmerged output."""
    model, inputs = build(row_id, family).train(), make_inputs(family)
    base_out = output(base_model(family), inputs).detach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(base_out.shape, generator=torch.Generator().manual_seed(3))
    loss = nn.functional.mse_loss(output(model, inputs).float(), target)
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = output(model, inputs)
        assert (trained - base_out).abs().max() > 1e-4, "one step must move the output"
        model.merge_adapter()
        torch.testing.assert_close(output(model, inputs), trained, atol=TOL, rtol=TOL)


def two_adapters(row_id: str, family: str) -> dt.DeltaModel:
    """Adapters "a" and "b" of the row's method, each randomized differently."""
    torch.manual_seed(0)
    model = dt.get_peft_model(base_model(family), ROWS[row_id].config(family), adapter_name="a")
    model.add_adapter("b", ROWS[row_id].config(family))
    for name, seed in (("a", 5), ("b", 6)):
        model.set_adapter(name)
        randomize(model, seed)
    return model.eval()


@pytest.mark.parametrize("row_id,family", CASES)
@torch.no_grad()
def test_weighted_merge_is_the_weighted_sum_of_updates(row_id, family):
    """LoRA with "cat" (exact by construction), every method with "svd" at full rank: the new adapter's update
    in every layer is 0.7 a + 0.5 b, and its output is the output of that update merged into the base."""
    model = two_adapters(row_id, family)
    kind = "cat" if row_id == "lora" else "svd"
    add_weighted_adapter(model, ["a", "b"], [0.7, 0.5], "ab", combination_type=kind,
                         **({} if kind == "cat" else {"svd_rank": 64}))
    a, b, ab = deltas(model, "a"), deltas(model, "b"), deltas(model, "ab")
    assert sorted(ab) == sorted(a)
    for path, delta in ab.items():
        torch.testing.assert_close(delta, 0.7 * a[path] + 0.5 * b[path], atol=1e-5, rtol=1e-4, msg=path)
    model.set_adapter("ab")
    inputs = make_inputs(family)
    combined = output(model, inputs)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(output(merged, inputs), combined, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("row_id,family", CASES)
@torch.no_grad()
def test_hotswap_equals_the_swapped_in_adapter_loaded_fresh(row_id, family, tmp_path):
    """A live adapter takes another one's weights in place (a LoRA of another alpha: its scale is folded into
    B): the parameters stay the same objects, and the output equals that adapter loaded with from_pretrained."""
    inputs = make_inputs(family)
    kwargs = ROWS[row_id].config_kwargs(family)
    incoming = dt.get_peft_model(base_model(family), ROWS[row_id].config(family) if row_id != "lora" else
                                 dt.LoraConfig(**{**kwargs, "lora_alpha": 3}))
    randomize(incoming, seed=9)
    incoming.save_pretrained(str(tmp_path))
    live = build(row_id, family).eval()
    randomize(live)
    before = {n: p for n, p in live.named_parameters() if p.requires_grad}
    hotswap_adapter(live, str(tmp_path))
    assert all(p is before[n] for n, p in live.named_parameters() if p.requires_grad)
    fresh = dt.DeltaModel.from_pretrained(base_model(family), str(tmp_path)).eval()
    expected = output(fresh, inputs)
    assert (expected - output(base_model(family), inputs)).abs().max() > 1e-4
    torch.testing.assert_close(output(live, inputs), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("row_id,family", CASES)
@torch.no_grad()
def test_extracted_full_rank_lora_reproduces_the_adapter(row_id, family):
    """`convert --to lora` (extract_lora): at a rank no layer's update exceeds, the LoRA's update is the
    source's in every layer (error ~0) and the outputs agree; a rank-1 extraction of a richer update has an
    error above zero (the report is not a constant)."""
    model, inputs = build(row_id, family).eval(), make_inputs(family)
    randomize(model)
    expected, source = output(model, inputs), deltas(model, "default")
    report = extract_lora(model, "default", rank=64, new_adapter_name="full")
    assert report.overall_error < 1e-5 and not report.skipped
    for path, delta in deltas(model, "full").items():
        torch.testing.assert_close(delta, source[path], atol=2e-5, rtol=1e-4, msg=path)
    model.set_adapter("full")
    torch.testing.assert_close(output(model, inputs), expected, atol=TOL, rtol=TOL)
    assert extract_lora(model, "default", rank=1, new_adapter_name="one").overall_error > 1e-3


# ---------------------------------------------------------------------- targeting on denoisers
def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("family", DIFFUSION)
def test_all_linear_on_a_denoiser_leaves_only_its_output_layer_out(family):
    """"all-linear": every nn.Linear but the denoiser's top-level proj_out (SD3, Flux; a Flux single block's
    proj_out is an ordinary layer and is adapted); no convolution (the UNet's are targeted by name)."""
    base = base_model(family)
    model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=2, target_modules="all-linear"))
    adapted = {n for n, layer in model.delta_layers() if isinstance(layer, DeltaLayer)}
    output_layer = {"proj_out"} & linear_names(base)
    assert output_layer == ({"proj_out"} if family in ("sd3", "flux") else set())
    assert adapted == linear_names(base) - output_layer
    if family == "flux":
        assert "single_transformer_blocks.0.proj_out" in adapted


def test_conv_layers_are_targeted_by_name_in_every_target_form():
    """The UNet's ResNet convs by suffix list and by regex give the same layers: conv1, conv2, conv_shortcut."""
    base = base_model("sd_unet")
    wanted = {n for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv_shortcut")}
    for targets in (["conv1", "conv2", "conv_shortcut"], r".*resnets\.\d+\.(conv1|conv2|conv_shortcut)"):
        model = dt.get_peft_model(copy.deepcopy(base), dt.LoHaConfig(r=2, target_modules=targets))
        assert {n for n, _ in model.delta_layers()} == wanted
        assert all(isinstance(base.get_submodule(n), nn.Conv2d) for n in wanted)


# ---------------------------------------------------------------------- convolutions that pad otherwise
class PaddedConvNet(nn.Module):
    """Two 3x3 convs padded by `padding_mode` (a VAE-style block), then a strided one."""

    def __init__(self, padding_mode: str) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 8, 3, padding=1, padding_mode=padding_mode)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, padding_mode=padding_mode)
        self.conv_c = nn.Conv2d(8, 4, 3, stride=2, padding=1, padding_mode=padding_mode)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv_c(torch.relu(self.conv_b(torch.relu(self.conv_a(pixels)))))


PADDED = {"lora": dt.LoraConfig(r=4, lora_alpha=8), "dora": dt.LoraConfig(r=4, lora_alpha=8, use_dora=True),
          "loha": dt.LoHaConfig(r=4, alpha=8), "lokr": dt.LoKrConfig(r=2, alpha=4),
          "oft": dt.OFTConfig(r=0, oft_block_size=4)}


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
@pytest.mark.parametrize("method", PADDED)
@torch.no_grad()
def test_unmerged_equals_merged_on_convs_that_pad_by_reflection(method, padding_mode):
    """The unmerged adapter pads as its base does, so it equals the merged layer (LoRA's lora_A padded with
    zeros: off by 3.6 on a reflect conv, in peft 0.21.2 as well)."""
    torch.manual_seed(0)
    base = PaddedConvNet(padding_mode).eval()
    config = copy.deepcopy(PADDED[method])
    config.target_modules = ["conv_a", "conv_b", "conv_c"]
    model = dt.get_peft_model(copy.deepcopy(base), config).eval()
    randomize(model)
    pixels = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    adapted = model(pixels)
    assert (adapted - base(pixels)).abs().max() > 1e-3
    model.merge_adapter()  # DoRA's dropout path: tests/test_fast_paths.py (conv_reflect)
    torch.testing.assert_close(model(pixels), adapted, atol=TOL, rtol=TOL)
