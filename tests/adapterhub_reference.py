"""The `adapters` (AdapterHub) side of tests/test_adapterhub.py; runs in .venv-adapters, never imports deltatune.

    .venv-adapters/bin/python tests/adapterhub_reference.py JOBS.json

JOBS.json is a list of jobs; each job builds a tiny BertModel or LlamaModel from `config` with the base weights
in `base_weights` (safetensors, written by the test), then
  - `add`: [{"name", "config"}] adds adapters with that config and random weights (seeded, N(0, 0.2^2), so no
    adapter is the identity), or `load`: [dir] loads adapter folders (ours, written by save_adapterhub);
  - `fusions`: [{"names", "config", "load"?}] adds AdapterFusion layers (random weights) or loads one from a folder;
  - `active`: {"kind": "single" | "stack" | "fuse", "names": [...]} sets the adapter setup;
  - writes `last_hidden_state` for `input_ids` to `out` (safetensors) and, with `save`, every adapter and fusion
    to `save/<name>` (safetensors, and the default pickled .bin too when `save_bin` is true).
"""

import json
import sys

import adapters
import torch
from adapters.composition import Fuse, Stack
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel


def build(job):
    dtype = getattr(torch, job.get("dtype", "float32"))
    torch.set_default_dtype(dtype)  # adapters added or loaded later are built in it (a float64 file stays exact)
    model_cls, config_cls = {"bert": (BertModel, BertConfig), "llama": (LlamaModel, LlamaConfig)}[job["model"]]
    model = model_cls(config_cls(**job["config"])).to(dtype).eval()
    missing, unexpected = model.load_state_dict(load_file(job["base_weights"]), strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise SystemExit(f"base weights do not fit: missing {missing}, unexpected {unexpected}")
    adapters.init(model)
    return model, dtype


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * 0.2)


def run(job):
    model, dtype = build(job)
    seed = 1000
    for spec in job.get("add", []):
        model.add_adapter(spec["name"], config=spec["config"])
        for sub in model.modules():
            if isinstance(getattr(sub, "adapters", None), torch.nn.ModuleDict) and spec["name"] in sub.adapters:
                seed += 1
                randomize(sub.adapters[spec["name"]], seed)
    for folder in job.get("load", []):
        model.load_adapter(folder, use_safetensors=True)
    for spec in job.get("fusions", []):
        if "load" in spec:
            model.load_adapter_fusion(spec["load"], use_safetensors=True)
        else:
            model.add_adapter_fusion(Fuse(*spec["names"]), config=spec.get("config", "dynamic"))
            for sub in model.modules():
                fusion = getattr(sub, "adapter_fusion_layer", {})
                if ",".join(spec["names"]) in fusion:
                    seed += 1
                    randomize(fusion[",".join(spec["names"])], seed)
    model.to(dtype).eval()
    active = job.get("active")
    if active is None:  # only files wanted (a config deltatune refuses)
        save_all(model, job)
        return
    setup = {"single": lambda n: n[0], "stack": lambda n: Stack(*n), "fuse": lambda n: Fuse(*n)}[active["kind"]]
    model.set_active_adapters(setup(active["names"]))
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(job["input_ids"])).last_hidden_state
    save_file({"last_hidden_state": hidden.contiguous()}, job["out"])
    save_all(model, job)


def save_all(model, job):
    if "save" in job:
        for spec in job.get("add", []):
            model.save_adapter(f"{job['save']}/{spec['name']}", spec["name"], use_safetensors=True)
            if job.get("save_bin"):
                model.save_adapter(f"{job['save']}/{spec['name']}.bin", spec["name"])
        for spec in job.get("fusions", []):
            if "load" not in spec:
                model.save_adapter_fusion(f"{job['save']}/fusion", ",".join(spec["names"]), use_safetensors=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for job in json.load(open(sys.argv[1])):
        run(job)
