"""`deltatune generate`: answer prompts (or chat) with a saved adapter, in the training run's prompt format.

A training run records how its rows were rendered next to the adapter (`deltatune_prompt.json`: the
template and the system prompt every training row shared), so generation sees the prompt the adapter
learned. Without that, a chat template such as SmolLM2's inserts its own default system prompt, which
no training row had. The record is a file of its own: `adapter_config.json` stays exactly what `peft`
and serving engines read.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from ...core.config import DeltaConfigError
from ..build import load_adapted
from ..data.formats import Sample
from ..data.tokenize import ensure_chat_template, prompt_text
from ..evaluate import generate

PROMPT_FILE = "deltatune_prompt.json"
TRAINING_SYSTEM = object()  # default of `system`: the training run's recorded system prompt


def shared_system_prompt(samples: list[Sample]) -> tuple[str | None, int]:
    """The system prompt every sample starts with (None when none has one or they differ), and how
    many distinct system prompts the samples have (rows without one count as one more)."""
    seen = Counter(
        s.messages[0]["content"] if s.messages and s.messages[0]["role"] == "system" else None
        for s in samples
    )
    only = next(iter(seen)) if len(seen) == 1 else None
    return only, len(seen)


def write_prompt_record(out_dir: str | Path, samples: list[Sample], template: str) -> None:
    """Record the training rows' template and shared system prompt next to the adapter."""
    system, distinct = shared_system_prompt(samples)
    record = {"template": template, "system": system, "distinct_system_prompts": distinct}
    (Path(out_dir) / PROMPT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_prompt_record(adapter_dir: str | Path) -> dict:
    """The adapter's recorded prompt format; {} for adapters without one (e.g. written by `peft`)."""
    path = Path(adapter_dir) / PROMPT_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DeltaConfigError(f"{path}: not valid JSON ({err}); delete it or fix it") from err
    if not isinstance(record, dict):
        raise DeltaConfigError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy when `temperature` is 0 (the default), else sampling.

    Raises:
        DeltaConfigError: a value out of range, or top_p / top_k without sampling (they would be ignored).
    """

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise DeltaConfigError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise DeltaConfigError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise DeltaConfigError(f"--top-k {self.top_k}: must be >= 1")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise DeltaConfigError("--top-p/--top-k only apply when sampling: also pass --temperature > 0")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`; every knob explicit, so the model's own
        generation_config (SmolLM2 ships temperature/top_p values) never changes the decoding."""
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        # top_k=0 and top_p=1.0 switch those filters off (None would mean "the model's default")
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p or 1.0,
                "top_k": self.top_k or 0}


class Generator:
    """An adapted model with the prompt format it was trained with; answers single prompts or chats.

    Args:
        adapter: an adapter directory (ours or one written by `peft`).
        model: the base model; default the adapter's `base_model_name_or_path`.
        chat: render prompts with the chat template; None: as the training run did (chat if unrecorded).
        system: the system prompt; default the training run's (none recorded: the template's own);
            None sends no system message.
        sampling: decoding settings (greedy by default).
    """

    def __init__(self, adapter, model=None, chat: bool | None = None, system=TRAINING_SYSTEM,
                 sampling: Sampling = Sampling(), max_new_tokens: int = 128) -> None:
        record = read_prompt_record(adapter)
        self.chat = record.get("template", "chat") != "plain" if chat is None else chat
        if system is TRAINING_SYSTEM:
            # the recorded system prompt belongs to the recorded template: --plain on a chat-trained adapter
            # sends the prompt as raw text, with no system text glued in front
            as_trained = self.chat == (record.get("template", "chat") != "plain")
            system = record.get("system") if as_trained else None
            if as_trained and record.get("distinct_system_prompts", 1) > 1:
                warnings.warn(f"{adapter}: training rows had {record['distinct_system_prompts']} different "
                              "system prompts, so none is used by default; pass --system", stacklevel=2)
        elif system is not None and not self.chat:
            raise DeltaConfigError("--system needs chat prompts; it cannot be combined with --plain")
        self.system, self.sampling, self.max_new_tokens = system, sampling, max_new_tokens
        self.model, self.tokenizer = load_adapted(adapter, model)
        if self.chat:
            ensure_chat_template(self.tokenizer)

    def render(self, turns: list[dict]) -> str:
        """The prompt text for a conversation (user/assistant turns, the last one the user's)."""
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else []) + turns
        sample = Sample(messages + [{"role": "assistant", "content": ""}], "prompt", "messages")
        return prompt_text(sample, self.tokenizer, self.chat)

    def answer(self, conversations: list[list[dict]]) -> list[str]:
        """One answer per conversation (batched), decoded as `sampling` says."""
        if self.sampling.seed is not None:
            torch.manual_seed(self.sampling.seed)  # the sampling draws use torch's global generator
        texts = [self.render(turns) for turns in conversations]
        return generate(self.model, self.tokenizer, texts, self.max_new_tokens,
                        sampling=self.sampling.generate_kwargs())

    def base_answer(self, conversations: list[list[dict]]) -> list[str]:
        """The same with the adapter switched off (the base model)."""
        with self.model.disable_adapter():
            return self.answer(conversations)


def generate_text(adapter: str, prompts: list[str], model: str | None = None, chat: bool | None = None,
                  max_new_tokens: int = 128, base_only: bool = False, system=TRAINING_SYSTEM,
                  sampling: Sampling = Sampling()) -> list[str]:
    """Answers of the adapted model to `prompts` (each one user message unless `chat` is False).

    With `base_only` (the CLI's --base), each answer is followed by the base model's answer.
    Arguments as for `Generator`.
    """
    generator = Generator(adapter, model, chat, system, sampling, max_new_tokens)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    answers = generator.answer(conversations)
    if not base_only:
        return answers
    base_answers = generator.base_answer(conversations)
    return [f"adapter: {a}\nbase:    {b}" for a, b in zip(answers, base_answers)]


def chat_loop(generator: Generator, first_turns: list[str] = (), stdin: TextIO | None = None,
              stdout: TextIO | None = None) -> list[dict]:
    """Read user turns line by line and answer each with the whole conversation so far as context.

    `first_turns` are sent before reading `stdin` (default sys.stdin; answers go to `stdout`, default
    sys.stdout). Stops at end of input or an empty line. Returns the conversation (user and assistant
    turns).
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if not generator.chat:
        raise DeltaConfigError("--chat needs chat prompts; it cannot be combined with --plain")
    history: list[dict] = []
    pending = list(first_turns)
    while True:
        if pending:
            line = pending.pop(0)
        else:
            if stdin.isatty():
                print("you> ", end="", file=stdout, flush=True)
            line = stdin.readline()
        if not line.strip():  # EOF reads as "", an empty line as "\n"
            return history
        history.append({"role": "user", "content": line.strip()})
        (reply,) = generator.answer([history])
        history.append({"role": "assistant", "content": reply})
        print(reply, file=stdout, flush=True)
