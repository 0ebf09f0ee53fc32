"""`deltatune serve` (issue 19): the real server on a loopback port, spoken to with the `openai` package.

Three adapters of different methods are served at once on a tiny Llama (LoRA with a recorded system prompt,
IA3 recorded as plain text, prompt tuning, which takes over the model and so decodes in a batch of its own)
plus the base model. Every greedy answer is checked against `deltatune generate`'s for the same prompt and
adapter (generate_text, what the command calls), also when the rows shared a batch with other adapters and
prompts of other lengths (the engine's batch log says they did). Then streaming, stop strings, seeded
sampling, loading and unloading at run time, and the refusals (4xx in OpenAI's error shape, the server
answering afterwards).
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from deltatune.serve.app import create_app
from deltatune.serve.command import BackgroundServer, build_engine
from deltatune.train.commands.run_generate import Generator, generate_text
from serve_fixtures import make_workspace

SERVED = ("lora", "ia3", "prompt")
PROMPTS = ("shout apple", "where is order A1099? answer in one word")
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(files):
    engine = build_engine(str(files["model"]), {name: str(files[name]) for name in SERVED}, max_batch=8,
                          batch_wait=0.01)
    with BackgroundServer(create_app(engine, max_body_bytes=64 * 1024)) as url:
        yield {"url": url, "engine": engine,
               "client": openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)}


@pytest.fixture(scope="module")
def expected(files):
    """`deltatune generate`'s greedy answers, one prompt per call (a batch of one), per adapter and "base"."""
    answers = {}
    for name in SERVED:
        for prompt in PROMPTS:
            (answers[name, prompt],) = generate_text(str(files[name]), [prompt], model=str(files["model"]),
                                                     max_new_tokens=MAX_TOKENS)
    generator = Generator(str(files["lora"]), str(files["model"]), system=None, max_new_tokens=MAX_TOKENS)
    for prompt in PROMPTS:
        (answers["base", prompt],) = generator.base_answer([[{"role": "user", "content": prompt}]])
    return answers


def chat(server, model: str, prompt: str, **options):
    options = {"max_tokens": MAX_TOKENS, "temperature": 0, **options}
    return server["client"].chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   **options)


def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server["url"] + path, content=content, headers={"content-type": "application/json"},
                      timeout=60, **kwargs)


def together(engine, calls: list, wait: float = 1.0) -> list:
    """Run `calls` at once on threads, the engine's idle wait raised so they share a batch; their results."""
    results, errors = [None] * len(calls), []

    def run(index):
        try:
            results[index] = calls[index]()
        except Exception as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    engine.batch_wait = wait  # an idle worker waits this long for company (or until max_batch rows)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.batch_wait = 0.01
    if errors:
        raise errors[0]
    return results


def test_models_lists_the_base_and_every_adapter(server):
    models = {m.id: m for m in server["client"].models.list().data}
    assert set(models) == {"base", *SERVED}
    assert models["lora"].model_extra["parent"] == "base" and models["base"].model_extra["parent"] is None
    assert models["prompt"].model_extra["method"] == "PROMPT_TUNING"


@pytest.mark.parametrize("name", [*SERVED, "base"])
def test_greedy_answers_equal_deltatune_generate(server, expected, name):
    for prompt in PROMPTS:
        answer = chat(server, name, prompt)
        assert answer.model == name
        assert answer.choices[0].message.content.strip() == expected[name, prompt]  # generate strips its answer
    answers = {expected[n, PROMPTS[0]] for n in [*SERVED, "base"]}
    assert len(answers) == 4  # the adapters really answer differently, so routing is tested


def test_plain_completions_equal_generate_plain(server, files):
    # a completion's prompt is the raw text: generate --plain with no system prompt
    (reference,) = generate_text(str(files["lora"]), ["The capital of"], model=str(files["model"]), chat=False,
                                 system=None, max_new_tokens=MAX_TOKENS)
    answer = server["client"].completions.create(model="lora", prompt="The capital of", max_tokens=MAX_TOKENS,
                                                 temperature=0)
    assert answer.choices[0].text.strip() == reference
    assert answer.usage.completion_tokens == MAX_TOKENS and answer.choices[0].finish_reason == "length"


def test_requests_that_arrive_together_share_a_batch_and_keep_their_own_answers(server, expected):
    """8 concurrent requests over 4 names and 2 prompt lengths: the layer-level ones decode in one mixed batch
    (the engine's log), the prompt-tuning ones in their own; each answer equals the one decoded alone."""
    engine = server["engine"]
    jobs = [(name, prompt) for name in [*SERVED, "base"] for prompt in PROMPTS]
    before = len(engine.batch_log)
    answers = dict(zip(jobs, together(engine, [lambda job=job: chat(server, *job) for job in jobs])))
    for (name, prompt), answer in answers.items():
        assert answer.choices[0].message.content.strip() == expected[name, prompt], (name, prompt)
    log = list(engine.batch_log)[before:]
    rows = [(key, adapter) for _, batch in log for key, adapter in batch]
    assert sorted(key for key, _ in rows) == sorted(a.id for a in answers.values())  # each decoded exactly once
    by_key = {a.id: name for (name, _), a in answers.items()}
    assert all(by_key[key] == adapter for key, adapter in rows)  # with the adapter it asked for
    mixed = [sorted(adapter for _, adapter in batch) for _, batch in log if len({a for _, a in batch}) > 1]
    assert mixed == [["base", "base", "ia3", "ia3", "lora", "lora"]]
    assert sorted(adapter for _, batch in log for _, adapter in batch if adapter == "prompt") == ["prompt"] * 2
    assert all(len({a for _, a in batch}) == 1 for _, batch in log if ("prompt" in {a for _, a in batch}))


def test_streaming_gives_the_same_answer_in_openai_chunks(server, expected):
    stream = chat(server, "ia3", PROMPTS[1], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected["ia3", PROMPTS[1]]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    pieces = list(server["client"].completions.create(model="prompt", prompt="abc", max_tokens=6, temperature=0,
                                                      stream=True))
    whole = server["client"].completions.create(model="prompt", prompt="abc", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text


def test_stop_strings_cut_the_answer_before_them(server):
    full = server["client"].completions.create(model="base", prompt="xyz", max_tokens=12, temperature=0)
    text = full.choices[0].text
    at = next(i for i in range(2, len(text)) if text[i] != "\ufffd" and text.index(text[i]) == i)
    cut = server["client"].completions.create(model="base", prompt="xyz", max_tokens=12, temperature=0,
                                              stop=["\u2603", text[i := at]])
    assert cut.choices[0].text == text[:i] and cut.choices[0].finish_reason == "stop"
    streamed = server["client"].completions.create(model="base", prompt="xyz", max_tokens=12, temperature=0,
                                                   stop=text[i], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:i]


def test_seeded_sampling_repeats_whatever_the_batch_mates(server):
    def sample(seed, model="lora"):
        return chat(server, model, PROMPTS[0], temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content

    alone = sample(7)
    assert sample(8) != alone  # the seed matters
    mates = together(server["engine"], [lambda: sample(7), lambda: sample(7), lambda: sample(8, "ia3"),
                                        lambda: sample(8, "ia3"), lambda: chat(server, "base", PROMPTS[1])])
    assert mates[0] == mates[1] == alone
    assert mates[2] == mates[3]


def test_adapters_load_and_unload_at_run_time(server, files, expected):
    client = server["client"]
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "loha", "lora_path": str(files["loha"])})
    assert response.status_code == 200, response.text
    (reference,) = generate_text(str(files["loha"]), [PROMPTS[0]], model=str(files["model"]),
                                 max_new_tokens=MAX_TOKENS)
    assert chat(server, "loha", PROMPTS[0]).choices[0].message.content.strip() == reference
    assert "loha" in {m.id for m in client.models.list().data}
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "loha"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(server, "loha", PROMPTS[0])
    assert chat(server, "lora", PROMPTS[0]).choices[0].message.content.strip() == expected["lora", PROMPTS[0]]


@pytest.mark.parametrize("body, status, param", [
    ({"lora_name": "lora", "lora_path": "{lora}"}, 400, "lora_name"),  # taken
    ({"lora_name": "base", "lora_path": "{loha}"}, 400, "lora_name"),  # reserved (not "loaded already")
    ({"lora_name": "a/b", "lora_path": "{loha}"}, 400, "lora_name"),
    ({"lora_name": "x", "lora_path": "{model}/nowhere"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "{model}"}, 400, "lora_path"),  # a model folder, not an adapter
    ({"lora_name": "x", "lora_path": "{other_model_lora}"}, 400, "lora_path"),  # shapes of another model
    ({"lora_name": "x"}, 400, "lora_path"),
], ids=["taken", "base", "bad-name", "missing", "not-an-adapter", "wrong-shapes", "no-path"])
def test_a_refused_adapter_changes_nothing(server, files, expected, body, status, param):
    body = {k: v.format(**{n: str(p) for n, p in files.items()}) for k, v in body.items()}
    response = post(server, "/v1/load_lora_adapter", body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert ("reserved for the base model" in response.text) == (body["lora_name"] == "base")
    assert set(server["engine"].adapters) == {"base", *SERVED}
    assert set(server["engine"].model.peft_config) == set(SERVED)  # nothing half loaded
    assert chat(server, "lora", PROMPTS[1]).choices[0].message.content.strip() == expected["lora", PROMPTS[1]]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/completions", b'{"model": "lora", "prompt": "hi"', 400, "body"),
    ("/v1/completions", b"[1, 2]", 400, "body"),
    ("/v1/completions", {"model": "lora", "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "lora", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "lora", "prompt": "hi " * 200}, 400, "prompt"),
    ("/v1/completions", {"model": "lora", "prompt": "x" * 70_000}, 413, "body"),
    ("/v1/completions", {"model": "lora", "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "lora", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "lora", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "lora", "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": "lora", "prompt": ["hi"] * 9}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "lora"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "lora", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "lora_name"),
    ("/v1/unload_lora_adapter", {"lora_name": "base"}, 404, "lora_name"),
], ids=["unknown-model", "malformed-json", "not-an-object", "over-context", "zero-tokens", "long-prompt",
        "too-large", "n", "temperature", "five-stops", "logprobs", "too-many-prompts", "no-messages", "bad-role",
        "unload-unknown", "unload-base"])
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_answering(server, expected, path, body,
                                                                               status, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert chat(server, "ia3", PROMPTS[0]).choices[0].message.content.strip() == expected["ia3", PROMPTS[0]]


def test_a_full_queue_answers_503_and_the_queued_requests_are_still_answered(files):
    engine = build_engine(str(files["model"]), {}, max_batch=1, max_queue=1, batch_wait=0)
    body = {"model": "base", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    with BackgroundServer(create_app(engine)) as url:
        statuses = []

        def ask():
            statuses.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code)

        with engine._model_lock:  # the worker cannot decode: the first request waits in it, the second queued
            first = threading.Thread(target=ask)
            first.start()
            while engine.stats["submitted"] < 1 or engine.queued:  # queued, then taken by the worker
                first.join(0.01)
            second = threading.Thread(target=ask)
            second.start()
            while engine.queued < 1:
                second.join(0.01)
            third = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        first.join()
        second.join()
    assert third.status_code == 503 and third.json()["error"]["type"] == "server_overloaded"
    assert statuses == [200, 200] and engine.stats["refused_busy"] == 1


def test_an_api_key_is_required_when_set(files):
    engine = build_engine(str(files["model"]), {}, batch_wait=0)
    with BackgroundServer(create_app(engine, api_key="s3cret")) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["base"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_a_refused_first_adapter_leaves_the_plain_base_and_a_failed_decode_answers_500(files, monkeypatch):
    from deltatune import DeltaModel
    from deltatune.serve import engine as engine_module

    engine = build_engine(str(files["model"]), {}, batch_wait=0)
    body = {"model": "base", "prompt": "hi", "max_tokens": 4, "temperature": 0}
    with BackgroundServer(create_app(engine)) as url:
        before = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        refused = httpx.post(f"{url}/v1/load_lora_adapter", timeout=60,
                             json={"lora_name": "x", "lora_path": str(files["other_model_lora"])})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_path"
        assert not isinstance(engine.model, DeltaModel)  # the base model was not wrapped half way
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == before

        real, calls = engine_module.generate_rows, []

        def fails_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("out of memory (simulated)")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine_module, "generate_rows", fails_once)
        failed = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert failed.status_code == 500 and "simulated" in failed.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == before
