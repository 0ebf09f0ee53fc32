"""The batcher: requests wait in a bounded queue; one worker thread decodes the rows that arrived together.

A batch is what the queue holds when the worker is free (after waiting `batch_wait` seconds for company
when it was idle), up to `max_batch` rows. Its rows are split into decode groups:

- every row whose adapter can share a batch (all layer-level methods, and the base model): one group,
  one adapter per row, through the mixed-adapter path (`generate(adapter_names=...)`, core/layer.py:
  Batched methods in one call per layer, the others once per adapter on its rows);
- each prompt-style adapter (soft prompts, prefixes, X-LoRA: `TakesOverForward`, which core refuses to mix
  per row): a group of its own.

Each group is one `generate` call through `train.evaluate.generate_rows`, the decoding path of
`deltatune generate`, with a `RowControl` (rows.py) for each row's own settings. A row answers as soon as it
is done, not when its batch is. The engine counts what it did (`stats`, `batch_log`) so tests and the load
test can see which rows shared a batch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from torch import nn
from transformers import LogitsProcessorList, StoppingCriteriaList

from ..api import DeltaModel
from ..core.layer import BASE_ADAPTER
from ..errors import DeltaConfigError, DeltaError
from ..train.evaluate import generate_rows
from .adapters import BASE_MODEL, ServedAdapter, check_files, load_into
from .rows import RowControl, RowSpec


class QueueFull(Exception):
    """The request queue holds `max_queue` requests already."""


class AdapterNotFound(DeltaConfigError):
    """No adapter of that name is served."""


@dataclass
class Request:
    """One API request: its adapter, its rendered prompts (one row each) and each row's settings."""

    key: str  # the response id, also in the batch log
    adapter: str
    prompts: list[str]
    specs: list[RowSpec]
    batch: int | None = None  # the batch it was decoded in
    arrived: float = field(default_factory=time.monotonic)


class Engine:
    """One base model, its served adapters, a bounded queue and the worker thread that decodes.

    Args:
        model: the base model (a plain model, or a DeltaModel holding the served adapters).
        tokenizer: its tokenizer (the worker's own: the app renders and counts with a copy).
        adapters: the served names (the base model included) -> ServedAdapter.
        max_batch: most rows decoded together.
        max_queue: most requests waiting; `submit` refuses more (QueueFull).
        batch_wait: seconds an idle worker waits for more requests before it decodes the first.
    """

    def __init__(self, model: nn.Module, tokenizer, adapters: dict[str, ServedAdapter], max_batch: int = 8,
                 max_queue: int = 64, batch_wait: float = 0.01) -> None:
        if max_batch < 1 or max_queue < 1:
            raise DeltaConfigError(f"--max-batch {max_batch} and --max-queue {max_queue} must be >= 1")
        self.model, self.tokenizer, self.adapters = model.eval(), tokenizer, dict(adapters)
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.device = next(model.parameters()).device
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.stats: Counter = Counter()  # submitted, refused_busy, requests, rows, batches (generate calls), ...
        self.batch_sizes: Counter = Counter()  # rows per generate call -> how many calls
        self.batch_log: deque = deque(maxlen=10_000)  # (batch, [(request key, adapter) per row])
        self._queue: queue.Queue[Request] = queue.Queue(max_queue)
        self._waiting: deque[Request] = deque()  # taken from the queue, not yet decoded (worker only)
        self._model_lock = threading.Lock()  # a decode, a load and an unload never overlap
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ requests
    def adapter(self, name: str) -> ServedAdapter:
        """Raises AdapterNotFound naming the `model` field."""
        if name not in self.adapters:
            raise AdapterNotFound(f"model {name!r} is not served; served: {sorted(self.adapters)}")
        return self.adapters[name]

    def room(self, name: str) -> int | None:
        """Tokens a prompt and its answer may take together with adapter `name` (None: no known limit);
        soft prompts take some of the context themselves."""
        if self.context is None:
            return None
        config = self.model.peft_config.get(name) if isinstance(self.model, DeltaModel) else None
        return self.context - (getattr(config, "num_virtual_tokens", 0) or 0)

    def submit(self, request: Request) -> None:
        """Queue a request (its rows answer through their specs' `emit`). Raises QueueFull."""
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            self.stats["refused_busy"] += 1
            raise QueueFull(f"{self._queue.maxsize} requests are waiting already; retry later") from None
        self.stats["submitted"] += 1

    @property
    def queued(self) -> int:
        """Requests in the queue, not yet taken by the worker."""
        return self._queue.qsize()

    # ------------------------------------------------------------------ adapters at run time
    def load_adapter(self, name: str, path: str) -> ServedAdapter:
        """Check and load an adapter; a refused one changes nothing.

        Raises:
            DeltaError: the name is taken or not allowed, or the files or the model refuse it.
        """
        if name == BASE_MODEL:
            raise DeltaConfigError(f"lora_name {name!r} is reserved for the base model; choose another name")
        if name in self.adapters:
            raise DeltaConfigError(f"lora_name {name!r} is loaded already; unload it first")
        checked = check_files(name, path)  # before the model is touched
        with self._model_lock:
            if name in self.adapters:
                raise DeltaConfigError(f"lora_name {name!r} is loaded already; unload it first")
            try:
                self.model, served = load_into(self.model, checked)
            except (DeltaError, ValueError, KeyError, RuntimeError) as err:  # inject wrote nothing
                raise DeltaConfigError(f"lora_path: {path}: the model refuses it: {err}") from err
            self.adapters[name] = served
        return served

    def unload_adapter(self, name: str) -> None:
        """Raises AdapterNotFound naming `lora_name` (the base model cannot be unloaded)."""
        with self._model_lock:
            if name == BASE_MODEL or name not in self.adapters:
                raise AdapterNotFound(f"lora_name {name!r} is not a loaded adapter; loaded: "
                                      f"{sorted(set(self.adapters) - {BASE_MODEL})}")
            self.model.delete_adapter(name)
            del self.adapters[name]

    # ------------------------------------------------------------------ the worker
    def start(self) -> None:
        if self._worker is None:
            self._stop.clear()
            self._worker = threading.Thread(target=self._work, name="deltatune-serve-engine", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._decode_batch(batch)

    def _next_batch(self) -> list[Request]:
        """The waiting requests, up to max_batch rows; an idle worker waits batch_wait for more."""
        if not self._waiting:
            try:
                self._waiting.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return []
            deadline = time.monotonic() + self.batch_wait
            while (left := deadline - time.monotonic()) > 0 and self._rows_waiting() < self.max_batch:
                with contextlib.suppress(queue.Empty):
                    self._waiting.append(self._queue.get(timeout=left))
        with contextlib.suppress(queue.Empty):
            while True:
                self._waiting.append(self._queue.get_nowait())
        batch, rows = [], 0
        while self._waiting and (not batch or rows + len(self._waiting[0].specs) <= self.max_batch):
            batch.append(self._waiting.popleft())
            rows += len(batch[-1].specs)
        return batch

    def _rows_waiting(self) -> int:
        return sum(len(r.specs) for r in self._waiting)

    def _decode_batch(self, batch: list[Request]) -> None:
        groups: dict[str | None, list[Request]] = {}  # None: the mixed group
        for request in batch:
            adapter = self.adapters.get(request.adapter)
            if adapter is None:  # unloaded while it waited
                for spec in request.specs:
                    spec.emit("error", (404, f"model {request.adapter!r} was unloaded", "model"))
                continue
            groups.setdefault(request.adapter if adapter.whole_model else None, []).append(request)
        for group, requests in groups.items():
            self._decode_group(group, requests)

    def _decode_group(self, group: str | None, requests: list[Request]) -> None:
        specs = [spec for r in requests for spec in r.specs]
        names = [r.adapter for r in requests for _ in r.specs]
        control = RowControl(specs, self.tokenizer, self.tokenizer.eos_token_id)
        options = {"logits_processor": LogitsProcessorList([control.processor]),
                   "stopping_criteria": StoppingCriteriaList([control.criteria])}
        with self._model_lock:
            self.stats["batches"] += 1
            batch_id = self.stats["batches"]
            for request in requests:
                request.batch = batch_id
            self.batch_log.append((batch_id, [(r.key, r.adapter) for r in requests for _ in r.specs]))
            self.batch_sizes[len(specs)] += 1
            self.stats["requests"] += len(requests)
            self.stats["rows"] += len(specs)
            self.stats["max_rows"] = max(self.stats["max_rows"], len(specs))
            self.stats["mixed_batches"] += len(set(names)) > 1
            try:
                with self._routing(group, names, options):
                    generate_rows(self.model, self.tokenizer, [p for r in requests for p in r.prompts],
                                  max(spec.max_tokens for spec in specs), self.device, **options)
                control.finish_all()
            except Exception as err:  # a bug or an odd input: these rows fail, the server keeps serving
                for spec in control.fail_open(err):
                    spec.emit("error", (500, f"decoding failed: {type(err).__name__}: {err}", None))

    def _routing(self, group: str | None, names: list[str], options: dict):
        """Set the model up for one decode group; returns the context to decode in."""
        model = self.model
        if not isinstance(model, DeltaModel):  # no adapter loaded yet: the base model itself
            return contextlib.nullcontext()
        adapters = set(names) - {BASE_MODEL}
        if not adapters:
            return model.disable_adapter()
        if group is not None or len(set(names)) == 1:  # one adapter for every row: no per-row routing
            model.set_adapter(names[0])
            return contextlib.nullcontext()
        # rows route by adapter_names; the active adapters must not be a prompt-style one (it would take over)
        if any(self.adapters[n].whole_model for n in model.active_adapters if n in self.adapters):
            model.set_adapter(sorted(adapters)[0])
        options["adapter_names"] = [BASE_ADAPTER if n == BASE_MODEL else n for n in names]
        return contextlib.nullcontext()
