"""The served adapters: each checked as `deltatune inspect` checks it, then loaded all or nothing.

An adapter is refused before the model is touched when its files fail the loader's own checks
(io/inspect.py `check_adapter`: the config's fields, the safetensors header, LoRA halves and ranks); what
only the model can tell (a key that matches no module, a shape that does not fit) is refused by the
loader, whose `inject` plans everything before it writes (core/model.py), so a refused adapter leaves the
served model as it was.

Each adapter is served in the prompt format its training run recorded, as `deltatune generate` uses it
(train/commands/run_generate.py): the run's chat template and its system prompt (used when a request
brings no system message of its own), or plain text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from ..api import DeltaModel
from ..core.model import check_adapter_name
from ..core.protocols import TakesOverForward, declares
from ..errors import AdapterFileError, DeltaConfigError
from ..io.inspect import check_adapter
from ..train.commands.run_generate import read_prompt_record
from ..train.data.formats import Sample
from ..train.data.tokenize import TEMPLATE_FILE, prompt_text

BASE_MODEL = "base"  # the `model` value that selects no adapter (vLLM serves the base under its own name)


@dataclass(frozen=True)
class ServedAdapter:
    """One name the server answers to: an adapter (or the base model) and its prompt format.

    Attributes:
        whole_model: a prompt-style adapter (soft prompts, prefixes, X-LoRA) that takes over the model's
            forward; it cannot share a batch with other adapters, so it is decoded one adapter per batch.
        chat / system / template: as the training run recorded them (template None: the tokenizer's own).
    """

    name: str
    path: str
    method: str
    whole_model: bool = False
    chat: bool = True
    system: str | None = None
    template: str | None = None

    def render(self, tokenizer, messages: list[dict]) -> str:
        """The prompt text for a chat request, as `deltatune generate` renders it for this adapter."""
        if self.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        if not self.chat:  # trained on plain text: the turns' text, as generate --plain sends it
            return prompt_text(Sample([*messages, {"role": "assistant", "content": ""}], "request", "messages"),
                               tokenizer, False)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=self.template)


def check_files(name: str, path: str, fields: tuple[str, str] = ("lora_name", "lora_path")) -> ServedAdapter:
    """Check the name and the files of an adapter before anything is loaded; `fields` name the two where
    an error names them (vLLM's body fields; the CLI's `--adapter`).

    Raises:
        DeltaConfigError: a name that is taken by the base model or not allowed, or adapter files the loader
            would refuse (each problem on the same line).
    """
    if name == BASE_MODEL:
        raise DeltaConfigError(f"{fields[0]} {name!r} is the base model's name; choose another")
    try:
        check_adapter_name(name)
    except DeltaConfigError as err:
        raise DeltaConfigError(f"{fields[0]}: {err}") from None
    info, problems, _ = check_adapter(path)
    if problems:
        raise AdapterFileError(f"{fields[1]}: " + "; ".join(problems))
    record = read_prompt_record(path)
    template_file = Path(path) / TEMPLATE_FILE
    system = record.get("system") if record.get("distinct_system_prompts", 1) <= 1 else None
    return ServedAdapter(name, str(path), info.method, chat=record.get("template", "chat") != "plain",
                         system=system,
                         template=template_file.read_text(encoding="utf-8") if template_file.is_file() else None)


def load_into(model: nn.Module, adapter: ServedAdapter) -> tuple[DeltaModel, ServedAdapter]:
    """Load a checked adapter into `model` (a plain base model the first time, then the DeltaModel).

    Returns:
        The DeltaModel serving it and the adapter with `whole_model` read from what was loaded.

    Raises:
        DeltaConfigError / AdapterFileError / ValueError: the loader's refusal; `model` is unchanged.
    """
    if isinstance(model, DeltaModel):
        model.load_adapter(adapter.path, adapter_name=adapter.name, is_trainable=False)
    else:
        model = DeltaModel.from_pretrained(model, adapter.path, adapter_name=adapter.name, is_trainable=False)
    model.eval()
    level = model.model_adapters[adapter.name] if adapter.name in model.model_adapters else None
    whole = level is not None and declares(level, TakesOverForward)
    return model, replace(adapter, whole_model=whole)
