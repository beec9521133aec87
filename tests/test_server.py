"""`sparserun serve`: a real server on a free loopback port, driven by the official `openai` client and raw HTTP."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(stories, tmp_path_factory):
    port = free_port()
    env = dict(os.environ, SPARSERUN_CACHE=str(tmp_path_factory.mktemp("cache")))
    p = subprocess.Popen([sys.executable, "-m", "sparserun.cli", "serve", str(stories), "--port", str(port),
                          "--ctx", "256", "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if p.poll() is not None:
            pytest.fail(f"server exited: {p.stderr.read()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ok":
                    break
        except OSError:
            time.sleep(0.5)
    else:
        p.kill()
        pytest.fail("server did not come up")
    yield base
    p.terminate()
    p.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def health(base):
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        return json.loads(r.read())


def post(base, path, data, raw=False):
    body = data if raw else json.dumps(data).encode()
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_chat(client, stories):
    assert [m.id for m in client.models.list().data] == [stories.name]
    r = client.chat.completions.create(model=stories.name, messages=[{"role": "user", "content": "Tell me a story"}],
                                       max_tokens=12, temperature=0, seed=1)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_is_greedy_and_matches_the_engine(client, stories):
    """A greedy completion is the engine's own greedy continuation of the prompt."""
    import sparserun

    r = client.completions.create(model=stories.name, prompt="Once upon a time", max_tokens=16, temperature=0)
    m = sparserun.load(stories)
    want = "".join(m.generate("Once upon a time", max_tokens=16, temperature=0.0))
    assert r.choices[0].text == want and r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_streaming_and_stop(client, stories):
    stream = client.chat.completions.create(model=stories.name, stream=True, max_tokens=20, temperature=0,
                                            messages=[{"role": "user", "content": "Once upon a time"}])
    pieces, finish = [], None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    text = "".join(pieces)
    assert text and finish in ("length", "stop")
    whole = client.completions.create(model=stories.name, prompt="Once upon a time", max_tokens=30, temperature=0)
    word = whole.choices[0].text.split()[3]
    cut = client.completions.create(model=stories.name, prompt="Once upon a time", max_tokens=30, temperature=0,
                                    stop=[word])
    assert word not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    assert whole.choices[0].text.startswith(cut.choices[0].text)


def test_follow_up_reuses_the_cached_prefix(server, client, stories):
    """The second turn's prompt starts with the first turn's prompt and answer: only its new tokens are computed."""
    msgs = [{"role": "user", "content": "Tell me a story about a dog"}]
    r1 = client.chat.completions.create(model=stories.name, messages=msgs, max_tokens=8, temperature=0)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "More"}]
    before = health(server)["prompt_tokens_processed"]
    r2 = client.chat.completions.create(model=stories.name, messages=msgs, max_tokens=8, temperature=0)
    processed = health(server)["prompt_tokens_processed"] - before
    assert r2.choices[0].message.content and 0 < processed < r2.usage.prompt_tokens - r1.usage.prompt_tokens + 8


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi " * 400}]}, "messages"),
])
def test_bad_requests_are_4xx_json_errors(server, body, param):
    status, err = post(server, "/v1/chat/completions", body)
    assert 400 <= status < 500 and err["error"]["param"] == param and err["error"]["message"]
    assert health(server)["status"] == "ok"


def test_malformed_json_and_bad_completion(server):
    status, err = post(server, "/v1/chat/completions", b"{not json", raw=True)
    assert status == 400 and "JSON" in err["error"]["message"]
    status, err = post(server, "/v1/completions", {"prompt": 7})
    assert status == 400 and err["error"]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=-5)


def test_two_concurrent_clients_are_both_answered_in_full(client, stories):
    results = {}

    def ask(k):
        r = client.completions.create(model=stories.name, prompt=f"Once upon a time there was a {k}",
                                      max_tokens=24, temperature=0)
        results[k] = r

    threads = [threading.Thread(target=ask, args=(k,)) for k in ("cat", "frog")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == {"cat", "frog"}
    for k, r in results.items():
        assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length", k


def test_disconnect_mid_stream_stops_generation(server, client, stories):
    import http.client

    before = health(server)["cancelled"]
    host, port = server.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 200,
                                                        "stream": True, "temperature": 0}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    conn.close()  # gone mid-stream
    deadline = time.time() + 60
    while health(server)["cancelled"] == before and time.time() < deadline:
        time.sleep(0.2)
    assert health(server)["cancelled"] == before + 1
    r = client.completions.create(model=stories.name, prompt="Once", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_a_taken_port_or_bad_flag_is_one_line(server, stories):
    port = server.rsplit(":", 1)[1]
    for args in (["--port", port], ["--port", "70000"]):
        r = subprocess.run([sys.executable, "-m", "sparserun.cli", "serve", str(stories), *args], capture_output=True,
                           text=True, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
