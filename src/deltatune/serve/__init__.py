"""`deltatune serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

    engine.py    the batcher: a bounded queue, one worker thread, rows of one batch decoded together
                 (one adapter per row through the mixed-adapter path, prompt-style adapters one per batch)
    rows.py      per-row control inside one `generate` call: max_tokens, stop strings, seeded sampling
    adapters.py  the served adapters: checked as `deltatune inspect` does, loaded all or nothing
    schemas.py   the OpenAI request bodies and the error shape
    app.py       the FastAPI routes (the web stack is the `serve` extra, imported only here)
    command.py   the CLI command: load, check, start uvicorn

Nothing here is imported by `import deltatune`; the web stack (fastapi, uvicorn) is needed only to serve.
"""
