"""The `deltatune` command line; each subcommand is a thin call into the library.

deltatune demo [--out DIR [--overwrite]] [key=value ...]
deltatune train CONFIG.yaml [key=value ...] [--resume | --overwrite]
deltatune eval  CONFIG.yaml [key=value ...] | --adapter DIR --data FILE
deltatune generate --adapter DIR "prompt" | --chat [--system TEXT] [--temperature T --seed N]
deltatune generate --adapter RUN_DIR "prompt" [--out DIR --steps N --guidance-scale G --seed N]  # images
deltatune merge --adapter DIR --out DIR
deltatune inspect DIR | FILE.safetensors
deltatune export --to diffusers|kohya|gguf --adapter [COMPONENT=]DIR --out PATH [--pipeline DIR] [--component C]
deltatune serve [--model M] [--adapter NAME=DIR ...] [--host H --port P] [--engine deltatune|vllm]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import DeltaConfigError, DeltaError

# printed as one line with exit status 2; anything else is a bug and keeps its traceback. DeltaError covers
# every error deltatune raises for bad input (errors.py); the builtins are the missing files and packages
# Python itself reports while reading a config, a data file or a model folder.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    DeltaError,
    ModuleNotFoundError,
    FileNotFoundError,
    FileExistsError,
)


def _demo(args) -> None:
    from .train.commands.demo import run_demo

    run_demo(args.out, args.overrides, overwrite=args.overwrite)


def _train(args) -> None:
    from .train.config_file import load_config
    from .train.loop import train

    train(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)


def _eval(args) -> None:
    from .train.commands.run_eval import evaluate_adapter, evaluate_config

    if args.adapter:
        if not args.data:
            raise SystemExit("error: eval --adapter needs --data FILE")
        evaluate_adapter(
            args.adapter,
            args.data,
            model=args.model,
            data_format=args.format,
            max_samples=args.max_samples,
            max_new_tokens=args.max_new_tokens,
            out=args.out,
        )
    elif args.config:
        evaluate_config(args.config, args.overrides, out=args.out)
    else:
        raise SystemExit("error: eval needs a CONFIG.yaml or --adapter DIR --data FILE")


def _generate(args) -> None:
    from .io.pipelines import is_pipeline_folder
    from .train.commands.run_generate import TRAINING_SYSTEM, Generator, Sampling, chat_loop, generate_text
    from .train.image.generate import is_image_adapter

    if is_image_adapter(args.adapter) or is_pipeline_folder(args.model):
        _generate_images(args)
        return
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    system = TRAINING_SYSTEM if args.system is None else args.system
    chat = False if args.plain else None
    if args.chat:
        if args.base:
            raise DeltaConfigError("--base compares single answers; it cannot be combined with --chat")
        generator = Generator(args.adapter, args.model, chat, system, sampling, args.max_new_tokens)
        chat_loop(generator, args.prompt)
        return
    if not args.prompt:
        raise DeltaConfigError("generate needs a prompt (or --chat to read turns from standard input)")
    for answer in generate_text(
        args.adapter,
        args.prompt,
        model=args.model,
        chat=chat,
        max_new_tokens=args.max_new_tokens,
        base_only=args.base,
        system=system,
        sampling=sampling,
    ):
        print(answer)


def _generate_images(args) -> None:
    from .train.image.generate import ImageSampling, generate_images

    if args.chat:
        raise DeltaConfigError("--chat is for language models; an image pipeline takes prompts")
    sampling = ImageSampling(args.steps, args.guidance_scale, 0 if args.seed is None else args.seed,
                             args.height, args.width, args.num_images)
    for path in generate_images(args.adapter, args.prompt, args.out, args.model, sampling, base=args.base):
        print(path)


def _merge(args) -> None:
    from .train.commands.merge import merge_adapter

    out = merge_adapter(args.adapter, args.out, model=args.model, dtype=args.dtype)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")


def _inspect(args) -> int:
    from .io.image_tools import component_folders_or_self, image_file, image_file_report
    from .io.inspect import check_adapter, format_report

    file = image_file(args.dir)
    if file is not None:  # a kohya/LyCORIS/diffusers-layout file for an image model
        print(image_file_report(file))
        return 0
    reports = []
    for folder in component_folders_or_self(Path(args.dir)):  # a text-to-image run: one report per component
        info, problems, notes = check_adapter(folder)
        for problem in problems:  # one line each, the loader's words
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            return 2
        reports.append(format_report(info, notes))
    print("\n\n".join(reports))
    return 0


def _convert(args) -> None:
    from .compose.extract import convert_to_lora

    if "adapterhub" in (args.source, args.to):  # AdapterHub bottleneck adapters, either way (io/adapterhub.py)
        from .io.adapterhub import convert_adapterhub

        if args.adapter is None or args.source == args.to:
            raise DeltaConfigError("convert --from adapterhub / --to adapterhub takes --adapter DIR "
                                   "(and --base MODEL)")
        convert_adapterhub(args.adapter, args.out, "deltatune" if args.source == "adapterhub" else "adapterhub",
                           args.base, allow_pickle=args.allow_pickle)
        written = "AdapterHub" if args.to == "adapterhub" else "deltatune (PEFT layout)"
        print(f"{written} adapter written to {args.out}")
        return
    if args.rank is None:
        raise DeltaConfigError("convert --to lora needs --rank N")
    report = convert_to_lora(out=args.out, rank=args.rank, adapter=args.adapter, finetuned=args.finetuned,
                             base_model=args.base)
    print(report)
    print(f"LoRA written to {args.out}")


def _export(args) -> None:
    if args.to == "gguf":
        from .train.commands.export import export_gguf

        if len(args.adapter) != 1:
            raise DeltaConfigError(f"--adapter: --to gguf writes one adapter, got {len(args.adapter)}")
        print(export_gguf(args.adapter[0], args.out, model=args.model, rank=args.rank, outtype=args.outtype,
                          merged=args.merged, base_gguf=args.base_gguf))
        return
    from .io.diffusers_layout import component_folders, export_diffusers
    from .io.kohya_format import export_kohya

    adapters = component_folders(args.adapter, args.component)
    if args.to == "diffusers":
        path = export_diffusers(adapters, args.out, allow_pickle=args.allow_pickle)
        print(f"diffusers LoRA written to {path} (pipeline.load_lora_weights({str(args.out)!r}) loads it)")
    else:
        path = export_kohya(adapters, args.out, pipeline=args.pipeline, allow_pickle=args.allow_pickle)
        print(f"kohya/LyCORIS file written to {path} (LoRA as kohya LoRA, LoHa/LoKr as LyCORIS)")


def _serve(args) -> int:
    if args.engine == "vllm":  # vLLM's own server with the adapters handed over (serve/vllm_handoff.py)
        from .serve import vllm_handoff

        return vllm_handoff.run(args)
    from .serve.command import run_server

    return run_server(args)


def _version() -> str:
    """The installed package's version (its metadata); a source tree run without installing it gives
    the package's own `__version__`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deltatune")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _yaml_value(value) -> str:
    """A default as YAML writes it (null, true, false)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def config_keys_help() -> str:
    """`train --help`'s list of config keys, generated from the RunConfig dataclasses (train/config.py),
    so it lists every key with its form and default as the code has them."""
    import dataclasses
    import textwrap
    import typing

    from .core.config import registered_methods
    from .train.config import RunConfig, describe

    rows = []  # (key, form [default])
    for section in dataclasses.fields(RunConfig):
        kind = typing.get_type_hints(RunConfig)[section.name]
        if section.name == "method":  # a dict: `name` picks the method, the rest are its config's fields
            methods = ", ".join(sorted(name.lower() for name in registered_methods()))
            default = section.default_factory()["name"]
            rows.append(("method.name", f"a registered method: {methods} [{default}]"))
            rows.append(("method.<field>", "the chosen method's config fields, with peft's names "
                                           "(method.r, method.lora_alpha, method.target_modules, ...)"))
        elif dataclasses.is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            for field in dataclasses.fields(kind):
                unset = field.default is dataclasses.MISSING
                default = field.default_factory() if unset else field.default
                form = f"{describe(hints[field.name])} [{_yaml_value(default)}]"
                rows.append((f"{section.name}.{field.name}", form))
        else:
            rows.append((section.name, f"{describe(kind)} [{_yaml_value(section.default)}]"))
    width = max(len(key) for key, _ in rows) + 2
    lines = ["config keys (YAML sections; set any with section.key=value after CONFIG; default in brackets):"]
    for key, text in rows:
        lines += textwrap.wrap(text, 100, initial_indent=f"  {key:{width}}",
                               subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"deltatune {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="fine-tune the embedded SmolLM2 with LoRA on a bundled task, end to end")
    p.add_argument("--out", default=None, help="output directory (default runs/demo, replaced on each run)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out DIR")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. training.max_steps=30")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="train an adapter from a YAML config", epilog=config_keys_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="loss, perplexity and exact match of a trained adapter")
    p.add_argument("config", nargs="?", help="the YAML config the adapter was trained with")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--adapter", help="adapter directory (ours or written by peft)")
    p.add_argument("--data", help="data file to evaluate on (with --adapter)")
    p.add_argument("--format", default="auto", help="data format (default: detect)")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="use the first N rows (default all); 0: loss only, no generation",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", help="folder for eval_metrics.json and eval_predictions.jsonl "
                   "(default: the adapter's folder)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="generate with an adapter (one answer per prompt, or --chat)")
    p.add_argument("--adapter", required=True, help="adapter directory (ours or written by peft)")
    p.add_argument("prompt", nargs="*", help="prompt(s); each is sent as a user message")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--plain", action="store_true", help="send the prompt as raw text, not a chat message")
    p.add_argument("--base", action="store_true",
                   help="also print the base model's answer (image pipelines: also write its images)")
    p.add_argument(
        "--system",
        help="system prompt (default: the one the training rows had, recorded in deltatune_prompt.json; "
        "'' sends an empty one)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (with --temperature > 0)")
    p.add_argument("--seed", type=int, help="seed for sampling: the same seed gives the same answer")
    p.add_argument(
        "--chat",
        action="store_true",
        help="chat: read user turns from standard input, one per line, keeping the conversation; "
        "an empty line or end of input stops",
    )
    images = p.add_argument_group("image pipelines (an adapter trained with model.task: text-to-image)")
    images.add_argument("--out", default="samples", help="folder for the PNGs (default: samples)")
    images.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    images.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    images.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    images.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    images.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("merge", help="merge an adapter into its base model and save a full model")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output directory for the merged Transformers model")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    dtypes = ["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"]
    p.add_argument("--dtype", default="fp32", choices=dtypes,
                   help="dtype of the saved model (the merge itself runs in float32; default fp32)")
    p.set_defaults(func=_merge)

    p = sub.add_parser("convert", help="turn a mergeable adapter (or a full fine-tune) into a LoRA by SVD; "
                                       "AdapterHub bottleneck adapters to and from our layout")
    p.add_argument("--to", choices=["lora", "adapterhub"], default="lora",
                   help="target format (LoRA, which every server reads; adapterhub: the `adapters` package's)")
    p.add_argument("--from", dest="source", choices=["deltatune", "adapterhub"], default="deltatune",
                   help="adapterhub: --adapter is a folder the `adapters` package saved (written in our layout)")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickled pytorch_adapter.bin")
    p.add_argument("--rank", type=int, help="rank of the LoRA (--to lora)")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--adapter", help="adapter directory to convert (LoHa, LoKr, OFT, IA3, DoRA, ...)")
    p.add_argument("--finetuned", help="a fully fine-tuned model directory (with --base)")
    p.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="write a saved adapter in another tool's format: diffusers or kohya/LyCORIS "
                                      "(image models), GGUF (llama.cpp, Ollama)")
    p.add_argument("--to", choices=["diffusers", "kohya", "gguf"], required=True,
                   help="diffusers: OUT/pytorch_lora_weights.safetensors that pipeline.load_lora_weights reads "
                        "(LoRA, DoRA); kohya: one .safetensors file for A1111/ComfyUI/Forge (LoRA) and LyCORIS "
                        "(LoHa/LoKr); gguf: a llama.cpp GGUF LoRA adapter (other methods converted to LoRA by "
                        "SVD first)")
    p.add_argument("--adapter", action="append", required=True, metavar="[COMPONENT=]DIR",
                   help="adapter directory; image models: one pipeline component's (unet, transformer, text_encoder "
                        "...; told from its folder or base model, or COMPONENT=DIR), or a text-to-image run's "
                        "adapter/ folder holding one per component; repeat for several")
    p.add_argument("--out", required=True, help="diffusers: output directory; kohya: output .safetensors file; "
                                                "gguf: output .gguf file")
    p.add_argument("--component", help="diffusers, kohya: the component a single bare adapter DIR is for")
    p.add_argument("--pipeline", help="kohya: the diffusers pipeline folder the adapters were trained on "
                                      "(default: the adapters' base_model_name_or_path)")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickled adapter_model.bin")
    p.add_argument("--merged", help="gguf: also write the merged model as a GGUF model to this file")
    p.add_argument("--base-gguf", help="gguf: the base model's GGUF file, whose tokenizer and settings --merged "
                   "copies (default: the embedded SmolLM2's)")
    p.add_argument("--model", help="gguf: base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--rank", type=int, help="gguf: LoRA rank a non-LoRA adapter is converted to (default 16)")
    p.add_argument("--outtype", choices=["f32", "f16"], default="f32", help="gguf: tensor type (default f32)")
    p.set_defaults(func=_export)

    p = sub.add_parser("inspect", help="method, rank, targets, size and serving compatibility of an adapter")
    p.add_argument("dir", help="adapter directory, or an image-model .safetensors file (kohya, LyCORIS, "
                               "diffusers layout): which image tools load it")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("serve", help="an OpenAI-compatible server: one base model, many adapters, one per request")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="serve DIR as model NAME (repeatable)")
    p.add_argument("--model", help="base model (default: the embedded SmolLM2)")
    p.add_argument("--engine", choices=["deltatune", "vllm"], default="deltatune",
                   help="deltatune: this process (default); vllm: hand the adapters to vLLM's server")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $DELTATUNE_API_KEY, else none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch", type=int, default=8, help="most rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="most waiting requests; more get 503 (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long an idle server waits for more requests to batch with the first (default 10)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--setup-only", action="store_true",
                   help="--engine vllm: write the vLLM set-up and print its command, do not start vLLM")
    p.add_argument("--setup-dir", default="vllm-setup", help="--engine vllm: the set-up folder (default vllm-setup)")
    p.add_argument("--lora-rank", type=int, default=16,
                   help="--engine vllm: rank of the LoRA a non-LoRA adapter becomes (default 16)")
    p.set_defaults(func=_serve)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns at import, on CPUs with AVX512-BF16, that the optional hub package `kernels` is
    # missing; its own CPU path works without it, and diffusers imports bitsandbytes on every image command
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deltatune` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        status = args.func(args)  # None (0) or the command's own exit status
    except Exception as err:  # one clear line for expected input errors, a traceback for bugs
        if not isinstance(err, EXPECTED_ERRORS) or os.environ.get("DELTATUNE_DEBUG"):
            raise
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; `deltatune train CONFIG --resume` continues from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
