"""`deltatune generate` (issue 17, item 6): the training run's system prompt by default, --system, sampling
options, and a chat loop over standard input. The rendered prompt is read from the token ids that reach
`model.generate`, so these tests see what the model sees."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import AutoTokenizer

from deltatune import DeltaModel
from deltatune.cli import main
from deltatune.train.commands.run_generate import (
    PROMPT_FILE,
    Generator,
    Sampling,
    chat_loop,
    generate_text,
    shared_system_prompt,
)
from helpers_train import make_tiny_model_dir, write_config, write_jsonl

SYSTEM = "You are a concise support agent for ShopCo."
# SmolLM2's template puts its own system prompt in front of a chat that has none (the bug in item 6)
TEMPLATE_DEFAULT = "You are a helpful AI assistant named SmolLM"
SMOL_LIKE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + TEMPLATE_DEFAULT + "<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def support_rows(n: int, system: str | None = SYSTEM) -> list[dict]:
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"Where is order A{1000 + i}?"},
                 {"role": "assistant", "content": f"Order A{1000 + i} has shipped."}]
        rows.append({"messages": ([{"role": "system", "content": system}] if system else []) + turns})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`deltatune train` on rows that all carry SYSTEM, with a tokenizer whose template has a default."""
    root = tmp_path_factory.mktemp("generate")
    model = make_tiny_model_dir(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = SMOL_LIKE_TEMPLATE
    tokenizer.save_pretrained(model)
    train_file = write_jsonl(root / "train.jsonl", support_rows(8))
    config = write_config(root / "run.yaml", model, train_file, None, root / "out", max_steps=2)
    assert main(["train", str(config), "data.max_length=256"]) == 0  # byte-level tokens: long rows
    return {"root": root, "model": model, "adapter": root / "out", "tokenizer": tokenizer}


@pytest.fixture
def prompts_seen(run, monkeypatch):
    """The decoded prompts (special tokens kept) of every `DeltaModel.generate` call."""
    seen, original = [], DeltaModel.generate

    def spy(self, *args, **kwargs):
        seen.extend(run["tokenizer"].batch_decode(kwargs["input_ids"], skip_special_tokens=False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeltaModel, "generate", spy)
    return seen


def rendered(run, messages: list[dict]) -> str:
    return run["tokenizer"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_training_records_the_system_prompt_beside_the_adapter(run):
    record = json.loads((run["adapter"] / PROMPT_FILE).read_text())
    assert record == {"template": "chat", "system": SYSTEM, "distinct_system_prompts": 1}
    config = json.loads((run["adapter"] / "adapter_config.json").read_text())
    assert "system" not in json.dumps(config)  # adapter_config.json stays what peft reads


def test_generate_uses_the_training_system_prompt_by_default(run, prompts_seen, capsys):
    argv = ["generate", "--adapter", str(run["adapter"]), "Where is order A1099?", "--max-new-tokens", "2"]
    assert main(argv) == 0
    user = {"role": "user", "content": "Where is order A1099?"}
    assert prompts_seen == [rendered(run, [{"role": "system", "content": SYSTEM}, user])]
    assert TEMPLATE_DEFAULT not in prompts_seen[0]


def test_plain_on_a_chat_trained_adapter_sends_the_raw_prompt(run, prompts_seen):
    """--plain: the prompt text alone; the recorded system prompt belongs to the chat template (it was glued
    in front with no separator, so `generate --plain` and the server's /v1/completions disagreed)."""
    argv = ["generate", "--adapter", str(run["adapter"]), "The capital of France is", "--plain",
            "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert SYSTEM not in prompts_seen[0] and prompts_seen[0].endswith("The capital of France is")


def test_system_option_overrides_the_recorded_prompt(run, prompts_seen):
    argv = ["generate", "--adapter", str(run["adapter"]), "hi", "--system", "Answer in French.",
            "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert prompts_seen == [rendered(run, [{"role": "system", "content": "Answer in French."},
                                           {"role": "user", "content": "hi"}])]
    assert SYSTEM not in prompts_seen[0]


def test_an_adapter_without_a_record_keeps_the_template_default(run, tmp_path, prompts_seen):
    import shutil

    bare = shutil.copytree(run["adapter"], tmp_path / "bare", ignore=shutil.ignore_patterns(PROMPT_FILE))
    generate_text(str(bare), ["hi"], max_new_tokens=2)
    assert prompts_seen == [rendered(run, [{"role": "user", "content": "hi"}])]
    assert TEMPLATE_DEFAULT in prompts_seen[0]


def test_rows_with_different_system_prompts_record_none():
    from deltatune.train.data.formats import Sample

    def sample(row):
        return Sample(row["messages"], "row", "messages")

    same = [sample(r) for r in support_rows(3)]
    mixed = same + [sample(r) for r in support_rows(1, "Other.")] + [sample(r) for r in support_rows(1, None)]
    assert shared_system_prompt(same) == (SYSTEM, 1)
    assert shared_system_prompt(mixed) == (None, 3)
    assert shared_system_prompt([sample(r) for r in support_rows(2, None)]) == (None, 1)


def greedy_by_repeated_forward(generator: Generator, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding the slow way: a full forward pass per token, argmax, stop at EOS."""
    tokenizer = generator.tokenizer
    ids = tokenizer(generator.render([{"role": "user", "content": prompt}]), return_tensors="pt",
                    add_special_tokens=False).input_ids
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(generator.model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_default_decoding_is_greedy_even_if_the_model_config_samples(run):
    generator = Generator(str(run["adapter"]), max_new_tokens=12)
    # SmolLM2's generation_config asks for sampling; our default must still be greedy
    config = generator.model.get_base_model().generation_config
    config.do_sample, config.temperature, config.top_p = True, 0.9, 0.5
    torch.manual_seed(1)
    first = generator.answer([[{"role": "user", "content": "Where is order A1099?"}]])
    torch.manual_seed(2)
    second = generator.answer([[{"role": "user", "content": "Where is order A1099?"}]])
    assert first == second == [greedy_by_repeated_forward(generator, "Where is order A1099?", 12)]


def test_sampling_with_a_seed_is_reproducible(run):
    def sample(seed):
        sampling = Sampling(temperature=1.5, top_k=200, seed=seed)
        return generate_text(str(run["adapter"]), ["hi", "Where is order A1099?"], max_new_tokens=16,
                             sampling=sampling)

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)  # the seed is what fixed it (a random model spreads over 259 tokens)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "0.9"], "--top-p/--top-k only apply when sampling"),
        (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
        (["--temperature", "1", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
        (["--plain", "--system", "x"], "--system needs chat prompts"),
        (["--chat", "--base"], "--base compares single answers"),
    ],
)
def test_bad_generate_options_are_one_line(run, extra, message, capsys):
    assert main(["generate", "--adapter", str(run["adapter"]), "hi", *extra]) == 2
    assert message in capsys.readouterr().err


def test_chat_loop_keeps_the_history(run, prompts_seen):
    generator = Generator(str(run["adapter"]), max_new_tokens=4)
    stdout = io.StringIO()
    history = chat_loop(generator, stdin=io.StringIO("Where is order A1001?\nAnd order A1002?\n\nignored\n"),
                        stdout=stdout)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert stdout.getvalue() == f"{history[1]['content']}\n{history[3]['content']}\n"
    system = {"role": "system", "content": SYSTEM}
    assert prompts_seen == [rendered(run, [system, history[0]]), rendered(run, [system, *history[:3]])]


def test_chat_command_reads_stdin_until_end_of_input(run, prompts_seen, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Where is order A1001?\nAnd order A1002?"))  # no final newline
    argv = ["generate", "--adapter", str(run["adapter"]), "--chat", "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert len(prompts_seen) == 2 and "Where is order A1001?" in prompts_seen[1]
    assert prompts_seen[1].endswith("And order A1002?<|im_end|>\n<|im_start|>assistant\n")
    assert capsys.readouterr().out.count("\n") == 2  # one line per answer
