"""`deltatune serve`: load the base model and the adapters, then serve them over HTTP with uvicorn.

Every adapter's files are checked (adapters.check_files) before the base model loads, so a typo in
`--adapter name=DIR` stops the command in a second with one line naming it. `BackgroundServer` runs the same
app on a thread, for tests and the load test (benchmarks/serve.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading

from ..errors import DeltaConfigError
from ..io.models import DEFAULT_ALIAS, load_model
from ..train.build import DTYPE
from ..train.data.tokenize import ensure_chat_template
from .adapters import BASE_MODEL, ServedAdapter, check_files, load_into
from .engine import Engine

WEB_STACK = ("fastapi", "uvicorn")


def require_web_stack() -> None:
    """Raises DeltaConfigError naming the `serve` extra when fastapi or uvicorn is not installed."""
    missing = [name for name in WEB_STACK if importlib.util.find_spec(name) is None]
    if missing:
        raise DeltaConfigError(f"deltatune serve needs {', '.join(missing)}: pip install 'deltatune[serve]'")


def parse_adapters(values: list[str]) -> dict[str, str]:
    """`--adapter name=DIR` values -> {name: DIR}. Raises DeltaConfigError naming the bad value."""
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise DeltaConfigError(f"--adapter {value!r}: expected NAME=DIR (e.g. --adapter support=runs/demo)")
        if name in adapters or name == BASE_MODEL:
            why = "given twice" if name in adapters else f"reserved for the base model ({BASE_MODEL})"
            raise DeltaConfigError(f"--adapter {value!r}: the name {name!r} is {why}")
        adapters[name] = path
    return adapters


def build_engine(model: str | None, adapters: dict[str, str], dtype: str = "float32", **engine_options) -> Engine:
    """The base model (default: the embedded SmolLM2) with every adapter loaded, in an Engine.

    Raises:
        DeltaConfigError: an adapter the checks or the model refuse (before the base model loads when its
            files are at fault); ModelNotFoundError: an unknown model.
    """
    if dtype not in DTYPE:
        raise DeltaConfigError(f"--dtype {dtype!r}: one of {sorted(DTYPE)}")
    checked = [check_files(name, path, ("--adapter", f"--adapter {name}")) for name, path in adapters.items()]
    name = model or DEFAULT_ALIAS
    base, tokenizer = load_model(name, DTYPE[dtype])
    ensure_chat_template(tokenizer)
    served = {BASE_MODEL: ServedAdapter(BASE_MODEL, str(name), "base")}
    for adapter in checked:
        base, served[adapter.name] = load_into(base, adapter)
    return Engine(base.eval(), tokenizer, served, **engine_options)


class BackgroundServer:
    """uvicorn serving `app` on a thread; `with BackgroundServer(app) as url:` gives its base URL.
    Port 0 takes a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="deltatune-serve-http", daemon=True)
        self.host = host

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start (see the log above)")
            self.thread.join(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()


def api_key_of(option: str | None) -> str | None:
    """--api-key, else $DELTATUNE_API_KEY, else None (no key asked)."""
    return option or os.environ.get("DELTATUNE_API_KEY") or None


def run_server(args) -> int:
    """The CLI command (engine deltatune): check, load, serve until interrupted."""
    require_web_stack()
    import uvicorn

    from .app import create_app

    adapters = parse_adapters(args.adapter or [])
    api_key = api_key_of(args.api_key)
    engine = build_engine(args.model, adapters, args.dtype, max_batch=args.max_batch, max_queue=args.max_queue,
                          batch_wait=args.batch_wait_ms / 1000)
    app = create_app(engine, api_key=api_key, max_body_bytes=args.max_body_bytes)
    names = ", ".join(sorted(engine.adapters))
    print(f"serving {names} on http://{args.host}:{args.port}/v1 (the request's `model` picks one; "
          f"{'API key required' if api_key else 'no API key'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
