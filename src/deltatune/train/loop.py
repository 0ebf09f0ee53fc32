"""The training loop, on accelerate: one process, or data-parallel under `accelerate launch`/`torchrun`.

Reproducibility is by construction, so a resumed run ends with the same adapter as one that never
stopped, and N processes match one process with the same global batch:
- The data order is a pure function of (seed, epoch): optimizer step s takes global samples
  [s*G, (s+1)*G) of the stream of per-epoch permutations, G = batch_size * grad_accum * processes;
  rank r takes its own slice of every micro-batch.
- Dropout is reseeded from (seed, step, micro-batch, rank) before every forward.
- The loss is summed over tokens (images) and divided by the token (image) count of the whole optimizer
  step (known to every rank in advance), so gradients do not depend on how a step is split.

The task decides the data, the model and the loss of a step (steps.py: TokenSteps for language models,
image/run.py: ImageSteps for text-to-image); everything else here is the same for every task.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..api import get_peft_model
from ..io.atomic import write_text
from ..models import load_tokenizer
from .build import (
    DTYPE,
    check_data_files,
    class_labels,
    load_base,
    read_train_eval,
    stored_model_name,
    tokenize_samples,
)
from .config import RunConfig
from .data.order import SampleOrder, ordered_batches
from .data.packing import check_packing_isolates
from .data.tokenize import TEMPLATE_FILE
from .evaluate import mean_token_loss
from .finish import TrainResult, evaluate_run, finish_run
from .image.run import build_image_model, read_image_data
from .image.settings import TEXT_TO_IMAGE
from .run.checkpoint import load_checkpoint, save_checkpoint
from .run.divergence import DivergenceError, check_step, gradient_norm
from .run.early_stop import GENERATION_METRICS, BestTracker, check_best_run, finish_best
from .run.kernels import apply_liger, resolve_kernels
from .run.metrics import MetricsLog, peak_memory_mb, shown
from .run.neftune import add_neftune
from .run.optim import check_optimizer_installed, make_optimizer
from .run.output_dir import claim_output_dir, clear_previous_run, is_main_rank
from .run.resume_check import (
    SCHEDULE_FIELDS,
    check_resume_length,
    file_fingerprint,
    point_schedule,
    resume_note,
    resume_point,
)
from .run.runtime import compile_for_training, enable_gradient_checkpointing, make_accelerator
from .run.schedule import make_scheduler
from .run.trackers import (
    accelerator_options,
    check_trackers_installed,
    end_trackers,
    log_record,
    start_trackers,
    tracker_names,
)
from .steps import TokenSteps

SPEED_KEYS = {"tokens": "tok_s", "images": "img_s"}  # the progress bar's throughput field per unit


def train(
    config: RunConfig,
    resume: bool = False,
    base=None,
    stop_after: int | None = None,
    show_progress: bool = True,
    log=print,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune `config.method` on `config.data.train` and save the adapter to `config.output_dir`.

    Args:
        config: a validated RunConfig.
        resume: continue from the newest checkpoint in `output_dir/checkpoints`.
        base: an already loaded `(model, tokenizer)` to adapt instead of loading `config.model`.
        stop_after: stop after this optimizer step as if killed (for tests of `resume`).
        show_progress: draw the progress bar.
        log: where one-line messages go.
        overwrite: replace an earlier run's files in `output_dir` (a new run refuses them otherwise).

    Returns:
        The trained model, tokenizer, final evaluation metrics and generated answers.

    Raises:
        DeltaConfigError: before the model loads, when `output_dir` is a file, is not writable, is in
            use by another run, or holds files and neither `resume` nor `overwrite` is set.
    """
    if not is_main_rank():  # rank 0 checks and locks the folder for all processes
        return _train(config, resume, base, stop_after, show_progress, log)
    with claim_output_dir(config.output_dir, resume, overwrite):
        return _train(config, resume, base, stop_after, show_progress, log)


def _train(config: RunConfig, resume: bool, base, stop_after: int | None, show_progress: bool,
           log) -> TrainResult:
    tc, out = config.training, Path(config.output_dir)
    images = config.model.task == TEXT_TO_IMAGE
    if images:  # every image and caption read and checked now, before any model loads
        image_data = read_image_data(config.image, config.data.train)
        train_samples, fmt, eval_samples, eval_fmt = [], None, None, None
    else:
        check_data_files(config.data)
    trackers = tracker_names(tc.report_to)
    check_trackers_installed(trackers)
    check_optimizer_installed(tc.optimizer)
    if not images:  # eval: data.eval, or the rows data.val_split holds out of data.train
        train_samples, fmt, eval_samples, eval_fmt = read_train_eval(config.data)
        eval_samples = eval_samples[: config.eval.max_samples] if eval_samples else None
    # a classifier's head gets one output per training label (sorted); a causal LM has none
    labels = class_labels(train_samples) if config.model.task == "sequence_classification" else None
    method_config = config.method_config()
    method_config.base_model_name_or_path = stored_model_name(config.model.name_or_path)
    check_best_run(tc, eval_samples, method_config)
    train_data = file_fingerprint(image_data.fingerprint_files() if images else config.data.train)
    checkpoint, saved, changed = resume_point(out, config, train_data) if resume else (None, None, {})
    accelerator = make_accelerator(tc.precision, **accelerator_options(trackers, out))
    kernels = resolve_kernels(tc.kernels, accelerator.device)  # before the model loads: a clear error first
    main = accelerator.is_main_process

    if images:
        tokenizer, train_set, eval_set, examples = None, None, None, len(image_data.instances)
        data_stats = {"train": {"images": examples, "class_images": len(image_data.classes)}, "eval": None}
        if main:
            log(f"train data: {image_data.summary()}")
    else:
        tokenizer = base[1] if base else load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
        train_set = tokenize_samples(train_samples, fmt, tokenizer, config.data, config.data.packing, labels)
        eval_set = (tokenize_samples(eval_samples, eval_fmt, tokenizer, config.data, labels=labels)
                    if eval_samples else None)
        examples = len(train_set.examples)
        data_stats = {"train": vars(train_set.stats), "eval": vars(eval_set.stats) if eval_set else None}
        if main:
            log(f"train data: {train_set.stats.summary()}")
            if eval_set:
                log(f"eval data: {eval_set.stats.summary()}")
    world = accelerator.num_processes
    global_batch = tc.batch_size * tc.grad_accum * world
    if main and world > 1:
        log(f"data-parallel: {world} processes, global batch {global_batch}")
    steps = tc.max_steps or math.ceil(tc.epochs * examples / global_batch)
    if checkpoint is not None:
        check_resume_length(checkpoint, saved, steps, config)

    # the adapter's initial weights come from tc.seed: identical on every rank
    if images:
        model, loss_steps, tokenizer = build_image_model(config, image_data, method_config, tc.seed,
                                                         DTYPE[config.model.dtype])
    else:
        torch.manual_seed(tc.seed)
        model = get_peft_model(base[0] if base else load_base(config.model, labels, tokenizer)[0], method_config)
        loss_steps = TokenSteps(train_set.examples, tokenizer.pad_token_id, kernels)
    model.share_dropout_masks = tc.share_dropout_masks  # q/k/v share one mask, or independent ones (core/call.py)
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=tc.offload_checkpoints)
    if kernels == "liger":  # RMSNorm, SwiGLU, RoPE; the loss below (run/kernels.py)
        apply_liger(model.get_base_model())
    if tc.compile:
        compile_for_training(model)
        if main and accelerator.device.type == "cpu":
            log("training.compile: on a CPU the compiled decoder measured slower than eager "
                "(benchmarks/lora_step.py --compile; README, Performance); it is meant for CUDA")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = model.get_nb_trainable_parameters()
    if main:
        log(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )
    optimizer = make_optimizer(params, tc)
    # methods with a learning-rate shape of their own (ReLoRA's re-warmup) multiply into the schedule
    scheduler = make_scheduler(
        optimizer, steps, tc.warmup_steps, tc.schedule, getattr(method_config, "lr_multiplier", None)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    noise = None
    if not images:
        if config.data.packing:  # before any training: the model must keep packed examples apart
            check_packing_isolates(inner, train_set.examples[0], tokenizer.pad_token_id, accelerator.device)
        # methods that look at training data first (Child-Tuning_D's Fisher mask): the same batches on every
        # rank and on a resumed run (before the checkpoint loads), so the result is the same everywhere
        with accelerator.autocast():
            inner.before_training(
                ordered_batches(train_set.examples, tc.batch_size, tc.seed, tokenizer.pad_token_id,
                                accelerator.device),
                mean_token_loss,
            )
        noise = add_neftune(inner, tc.neftune_noise_alpha)  # after the checks above, which want clean outputs
    best = None
    if tc.metric_for_best:
        best = BestTracker(tc.metric_for_best, tc.early_stopping_patience, tc.early_stopping_threshold,
                           keep_weights=tc.load_best_at_end)

    start = 0
    if checkpoint is not None:
        restored = load_checkpoint(checkpoint, inner, optimizer, scheduler)
        start = restored["step"]
        if best is not None and "best" in restored:
            best.load_state_dict(restored["best"])
        if any(key in changed for key in SCHEDULE_FIELDS):
            point_schedule(optimizer, scheduler, tc.lr)
        if main:
            log(f"resuming from {checkpoint} (step {start} of {steps})")
            if changed:
                log(resume_note(checkpoint, start, changed))
    elif main:  # a fresh run (output_dir was empty, or --overwrite): nothing of an earlier run stays
        clear_previous_run(out)
    if main:
        header = f"# {resume_note(checkpoint, start, changed)}\n" if changed else ""
        write_text(out / "run_config.yaml", header + yaml.safe_dump(config.to_dict(), sort_keys=False))
        if config.data.chat_template:  # so generate/eval/serve on the adapter render prompts as training did
            write_text(out / TEMPLATE_FILE, tokenizer.chat_template)
    start_trackers(accelerator, trackers, out, config.to_dict())
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if checkpoint else None)
    if main and changed:
        resumed = {"step": start, "resumed": checkpoint.name}
        metrics.write({**resumed, "changed": {key: list(values) for key, values in changed.items()}})
    if main and checkpoint is None:
        metrics.write({"step": 0, "data": data_stats})

    order = SampleOrder(examples, tc.seed)
    counts = [loss_steps.weight(i) for i in range(examples)]
    device = accelerator.device
    bar = tqdm(
        total=steps, initial=start, desc="train", disable=not (main and show_progress), dynamic_ncols=True
    )
    window_loss, window_units, window_start = 0.0, 0, time.perf_counter()
    train_started, done = window_start, start
    for step in range(start, steps):
        first = step * global_batch
        step_ids = [order[first + i] for i in range(global_batch)]
        step_targets = max(1, sum(counts[i] for i in step_ids))
        step_loss = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            offset = micro * tc.batch_size * world + accelerator.process_index * tc.batch_size
            # seeds dropout, and an image batch's crops, flips, noise and timesteps
            torch.manual_seed(hash((tc.seed, step, micro, accelerator.process_index)) % 2**62)
            batch = loss_steps.batch(step_ids[offset : offset + tc.batch_size], device)
            sync = nullcontext() if micro == tc.grad_accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss_sum = loss_steps.loss_sum(model, batch)
                # DDP averages gradients over processes, hence * world
                loss = loss_sum * world / step_targets
                regulariser = inner.extra_loss()  # e.g. AdaLoRA's orthogonality term, once per step
                if regulariser is not None:
                    loss = loss + regulariser / tc.grad_accum
                accelerator.backward(loss)
            step_loss += loss_sum.detach()
        clipped = accelerator.clip_grad_norm_(params, tc.max_grad_norm) if tc.max_grad_norm else None
        grad_norm = gradient_norm(params, clipped)
        inner.before_optimizer_step(step)  # training-time methods: gradient masks (Child-Tuning), ...
        optimizer.step()
        inner.after_optimizer_step(step, optimizer)  # rank budgets (AdaLoRA), merge-and-reset (ReLoRA)
        step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        # the one host read per step (the log needs the loss); the gradient norm rides along
        read = torch.stack([accelerator.reduce(step_loss, "sum"), grad_norm.to(step_loss)])
        step_total, norm = read.tolist()
        # raises before this step is logged, checkpointed or saved (the NaN update stays in memory only)
        try:
            check_step(done, step_total / step_targets, norm, accelerator.optimizer_step_was_skipped, out, tc.lr)
        except DivergenceError:
            bar.close()  # so the error starts a line of its own
            raise
        window_loss += step_total / step_targets
        window_units += sum(loss_steps.size(i) for i in step_ids)
        bar.update(1)
        if done % tc.log_every == 0 or done == steps:
            n = tc.log_every if done % tc.log_every == 0 else done % tc.log_every
            elapsed = time.perf_counter() - window_start
            record = {
                "step": done,
                "epoch": round(done * global_batch / examples, 4),
                "loss": window_loss / n,
                "lr": step_lr,
                f"{loss_steps.unit}_per_s": window_units / max(elapsed, 1e-9),
                "step_s": elapsed / n,
                "peak_mem_mb": peak_memory_mb(),
            }
            speed = {SPEED_KEYS.get(loss_steps.unit, "per_s"): f"{record[f'{loss_steps.unit}_per_s']:.0f}"}
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", **speed)
            if main:
                metrics.write(record)
                log_record(accelerator, record, "train")
            window_loss, window_units, window_start = 0.0, 0, time.perf_counter()
        # with a best to track, the last step is evaluated too (it may be the best)
        due = done % tc.eval_every == 0 and done < steps if tc.eval_every else False
        if eval_set and (due or best is not None and done == steps):
            if main:
                result, _ = evaluate_run(config, accelerator, inner, tokenizer, eval_set,
                                         tc.metric_for_best in GENERATION_METRICS)
                metrics.write({"step": done, **result})
                log_record(accelerator, {"step": done, **result}, "eval")
                note = ""
                if best is not None:
                    if best.update(done, result, inner):
                        note = " (best)"
                    else:
                        note = f" (best {best.best_value:.4g} at step {best.best_step})"
                    if best.should_stop:
                        accelerator.set_trigger()
                bar.write(f"step {done}: {shown(result)}{note}")
                model.train()
        if tc.save_every and done % tc.save_every == 0 and done < steps:
            if main:
                extra = {"config": config.to_dict(), "data_train": train_data}
                if best is not None:
                    extra["best"] = best.state_dict()
                save_checkpoint(out, done, inner, optimizer, scheduler, extra, keep=tc.keep_checkpoints)
            accelerator.wait_for_everyone()
        if best is not None and done % tc.eval_every == 0 and accelerator.check_trigger():
            break  # patience ran out on the main process; every rank stops at this step
        if stop_after is not None and done >= stop_after:
            bar.close()
            if noise is not None:
                noise.remove()
            end_trackers(accelerator)
            return TrainResult(inner, tokenizer, steps=done)
    bar.close()
    if noise is not None:
        noise.remove()
    if main:
        log(f"trained {done - start} steps in {time.perf_counter() - train_started:.0f} s")
    if best is not None:
        finish_best(best, tc, inner, done, steps, metrics if main else None, log if main else None)
    return finish_run(config, accelerator, inner, tokenizer, eval_set, metrics, done, log, train_samples)

