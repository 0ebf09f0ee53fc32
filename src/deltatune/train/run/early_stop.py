"""The best evaluation so far, early stopping and the best adapter at the end (Transformers' names):

    training.metric_for_best:          eval_loss | eval_ppl | exact_match | accuracy
    training.early_stopping_patience:  stop after N evaluations in a row without improvement
    training.early_stopping_threshold: an improvement must beat the best by more than this
    training.load_best_at_end:         the saved adapter (and the final evaluation) is the best one

Evaluations run every `training.eval_every` steps on `data.eval`; a generation metric (exact_match,
accuracy) generates an answer per eval row at each of them. Losses improve downwards, scores upwards.
The best adapter is a copy of the trainable tensors at the best evaluation (adapter-sized, kept in
memory and in every checkpoint with the rest of this state), so a resumed run keeps its best and its
count of evaluations without improvement.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.config import DeltaConfig, DeltaConfigError

GREATER_IS_BETTER = {"eval_loss": False, "eval_ppl": False, "exact_match": True, "accuracy": True}
GENERATION_METRICS = ("exact_match", "accuracy")


def check_best_settings(training: Any) -> None:
    """Within the training section: a known metric, patience >= 1; settings that need a metric get
    eval_loss (Transformers' default) when none is named."""
    if training.metric_for_best is None and (training.early_stopping_patience or training.load_best_at_end):
        training.metric_for_best = "eval_loss"
    if training.metric_for_best is not None and training.metric_for_best not in GREATER_IS_BETTER:
        raise DeltaConfigError(
            f"training.metric_for_best={training.metric_for_best!r}: must be one of {list(GREATER_IS_BETTER)}"
        )
    patience = training.early_stopping_patience
    if patience is not None and patience < 1:
        raise DeltaConfigError(f"training.early_stopping_patience={patience!r}: must be >= 1 (or null)")
    if training.early_stopping_threshold < 0:
        raise DeltaConfigError(
            f"training.early_stopping_threshold={training.early_stopping_threshold!r}: must be >= 0"
        )


def check_best_run(training: Any, eval_samples: list | None, method_config: DeltaConfig) -> None:
    """Before the model loads: tracking a best needs evaluations during training, on eval data with
    references for a generation metric, and a method whose state is its trainable tensors.

    Raises:
        DeltaConfigError: naming the key at fault.
    """
    metric = training.metric_for_best
    if metric is None:
        return
    if not eval_samples:
        raise DeltaConfigError(
            f"training.metric_for_best={metric!r}: needs data.eval or data.val_split (the rows it is measured on)"
        )
    if not training.eval_every:
        raise DeltaConfigError(
            f"training.metric_for_best={metric!r}: needs training.eval_every > 0 "
            "(evaluations during training)"
        )
    if metric in GENERATION_METRICS:
        kind = "accuracy" if eval_samples[0].kind == "classification" else "exact_match"
        if metric != kind:
            raise DeltaConfigError(f"training.metric_for_best={metric!r}: data.eval is scored by {kind}")
    hook = type(method_config).after_optimizer_step
    if training.load_best_at_end and hook is not DeltaConfig.after_optimizer_step:
        raise DeltaConfigError(
            f"training.load_best_at_end=true: {method_config.peft_type} changes the model between optimizer "
            "steps (merges, rank budgets, projections), so a copy of its trainable tensors cannot restore "
            "an earlier state; use training.early_stopping_patience alone"
        )


class BestTracker:
    """The best value of one metric, its step, the evaluations since, and (optionally) its weights."""

    def __init__(self, metric: str, patience: int | None, threshold: float = 0.0, keep_weights: bool = False):
        self.metric, self.patience, self.threshold = metric, patience, threshold
        self.keep_weights = keep_weights
        self.greater_is_better = GREATER_IS_BETTER[metric]
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.best_weights: dict[str, torch.Tensor] = {}

    def update(self, step: int, metrics: dict[str, float], model: torch.nn.Module) -> bool:
        """Record an evaluation at `step`; returns whether it is the new best (its weights are kept)."""
        value = metrics[self.metric]
        if self.best_value is None:
            improved = True
        else:
            gain = value - self.best_value if self.greater_is_better else self.best_value - value
            improved = gain > self.threshold
        if improved:
            self.best_value, self.best_step, self.evals_without_improvement = value, step, 0
            if self.keep_weights:
                self.best_weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                                     if p.requires_grad}
        else:
            self.evals_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience

    @torch.no_grad()
    def restore_best(self, model: torch.nn.Module) -> None:
        """Copy the best evaluation's trainable tensors back into `model`."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for name, tensor in self.best_weights.items():
            params[name].copy_(tensor)

    def summary(self) -> dict[str, Any]:
        return {"metric": self.metric, "best_step": self.best_step, "best_value": self.best_value,
                "evals_without_improvement": self.evals_without_improvement}

    def state_dict(self) -> dict[str, Any]:
        return {**self.summary(), "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_step, self.best_value = state["best_step"], state["best_value"]
        self.evals_without_improvement = state["evals_without_improvement"]
        self.best_weights = dict(state["best_weights"])


def finish_best(best: BestTracker, training: Any, model: torch.nn.Module, done: int, steps: int,
                metrics=None, log=None) -> None:
    """After the last step (`done` of `steps`): restore the best adapter when `training.load_best_at_end`,
    and, on the main process (`metrics`, `log` given), record the outcome as metrics.jsonl's
    `{"step": done, "best": {...}}` line and one log line."""
    if training.load_best_at_end:
        best.restore_best(model)  # the main process holds the copy (it evaluates), and it saves
    if metrics is None:
        return
    metrics.write({"step": done, "best": {**best.summary(), "stopped_early": done < steps,
                                           "loaded_best": training.load_best_at_end}})
    stopped = ""
    if done < steps:
        stopped = (f"stopped early at step {done} of {steps} ({training.early_stopping_patience} evaluations "
                   "without improvement); ")
    saved = ("saving that adapter" if training.load_best_at_end
             else "saving the last step's adapter (training.load_best_at_end=true saves the best)")
    log(f"{stopped}best {best.metric} {best.best_value:.4g} at step {best.best_step}; {saved}")
