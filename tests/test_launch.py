"""`accelerate launch` as examples/README.md writes it starts the processes it names, on CPU too; a
launch that asked for several processes and got one says so (accelerate's simple launcher runs the
script once unless --multi_gpu is given, whatever --num_processes says)."""

from __future__ import annotations

import json

import pytest
import torch

from deltatune.train.run.runtime import lone_launch_warning
from helpers_train import make_tiny_model_dir, run_cli, upper_rows, write_config, write_jsonl

SIMPLE_LAUNCH = {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(("environ", "warns"), [
    (SIMPLE_LAUNCH, True),  # accelerate launch --num_processes 2 on a machine without GPUs
    ({**SIMPLE_LAUNCH, "ACCELERATE_USE_CPU": "True"}, True),  # ... --cpu --num_processes 2
    ({**SIMPLE_LAUNCH, "WORLD_SIZE": "2", "RANK": "0"}, False),  # the processes were started
    ({**SIMPLE_LAUNCH, "PMI_SIZE": "2"}, False),  # mpirun (accelerate's multi-CPU launch)
    ({"ACCELERATE_USE_CPU": "False"}, False),  # accelerate launch of one process: nothing to say
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, False),  # torchrun / accelerate --multi_gpu
    ({}, False),  # plain python
])
def test_lone_launch_is_recognised_from_the_launchers_environment(environ, warns):
    warning = lone_launch_warning(environ)
    assert (warning is not None) == warns
    if warns:
        assert "--multi_gpu --num_processes N" in warning and "torchrun --nproc-per-node N" in warning


def test_a_bare_accelerate_launch_of_two_processes_warns_in_the_one_it_starts(tmp_path):
    """The real launcher's environment (accelerate 1.15 on this machine, no --multi_gpu), through
    make_accelerator as `deltatune train` calls it."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom deltatune.train.run.runtime import make_accelerator\n"
                     "make_accelerator('fp32')\nprint('ranks', os.environ.get('WORLD_SIZE'))\n")
    result = run_cli("--num_processes", "2", str(probe), module="accelerate.commands.launch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ranks None") == 1  # one process, as the warning says
    assert lone_launch_warning(SIMPLE_LAUNCH) in result.stderr


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_the_documented_accelerate_command_trains_in_two_processes(tmp_path):
    """examples/README.md's `accelerate launch --multi_gpu --num_processes 2 -m deltatune train ...`."""
    model = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", upper_rows(12))
    config = write_config(tmp_path / "run.yaml", model, data, None, tmp_path / "run", max_steps=1,
                          batch_size=2, save_every=0)
    result = run_cli("--multi_gpu", "--num_processes", "2", "-m", "deltatune", "train", str(config),
                     module="accelerate.commands.launch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data-parallel: 2 processes, global batch 4" in result.stdout
    assert result.stdout.count("trainable params") == 1  # only rank 0 reports
    assert "started only this one" not in result.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epoch"] == pytest.approx(4 / 12, abs=1e-4)  # the one step took 2 x 2 rows
