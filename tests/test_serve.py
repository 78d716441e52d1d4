"""The HTTP service: routes, validation, metrics, a real uvicorn process, hot swap, fuzzing."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from twotower.experiment import train_run
from twotower.export import export_run
from twotower.pipeline import RecommendRequest, RecommendResponse
from twotower.serve import create_app, load_pipeline


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same data with different seeds: a model and its replacement."""
    out = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"run{seed}")
        train_run(tiny_config(epochs=1, seed=seed), path, progress=False)
        export_run(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(runs[0])) as c:
        yield c


def test_recommend_known_and_unknown_users(client):
    answer = client.post("/recommend", json={"user_id": 7, "k": 5})
    assert answer.status_code == 200, answer.text
    body = RecommendResponse.model_validate(answer.json())
    assert body.path == "known" and len(body.items) == 5 and body.items[0].metadata["title"]
    cold = client.post("/recommend", json={"user_id": "someone-new", "features": {"segment": "s1"}})
    assert cold.status_code == 200 and cold.json()["path"] == "cold_start"
    assert client.post("/recommend", json={"user_id": -5}).status_code == 200


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "json"),
        (b'{"user_id": 7, "k": "ten"}', "k"),
        (b'{"user_id": 7, "kk": 3}', "kk"),
        (b'{"user_id": 7, "k": 0}', "k"),
        (b'{"user_id": 7, "k": 100000}', "k"),
        (b'{"user_id": [1, 2]}', "user_id"),
        (b'{"features": {"segmnt": "s1"}}', "segmnt"),
        (b'{"filters": {"colour": ["red"]}}', "colour"),
        (b"[]", "object"),
    ],
)
def test_bad_requests_are_4xx_with_a_reason(client, body, needle):
    answer = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert needle.lower() in answer.text.lower()


def test_healthz_and_metrics(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["items"] == 150 and health["similarity"] == "cosine"
    client.post("/recommend", json={"user_id": 7})
    client.post("/recommend", json={"k": -1})
    text = client.get("/metrics").text
    assert 'twotower_requests_total{route="/recommend",status="200"}' in text
    assert 'twotower_requests_total{route="/recommend",status="422"}' in text
    assert 'twotower_request_latency_seconds_bucket{le="0.02",route="/recommend"}' in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(run_dir, *extra):
    """``twotower serve`` in its own process on a free loopback port: (process, base url)."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "twotower.cli", "serve", str(run_dir), "--port", str(port), *extra]
    process = subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            pytest.fail(f"the server exited: {process.stdout.read().decode()}")
    else:
        process.kill()
        pytest.fail("the server did not come up in 90 s")
    return process, base


@pytest.fixture
def server(runs):
    process, base = _start(runs[0])
    yield base
    process.terminate()
    process.wait(timeout=10)


def test_two_workers_follow_a_swap_and_sum_their_metrics(runs):
    process, base = _start(runs[0], "--workers", "2")
    try:
        want_new = [i.item_id for i in load_pipeline(runs[1]).recommend(RecommendRequest(user_id=7)).items]
        for _ in range(20):
            assert httpx.post(f"{base}/recommend", json={"user_id": 7}).status_code == 200
        assert httpx.post(f"{base}/admin/reload", json={"path": str(runs[1])}, timeout=60).status_code == 200
        time.sleep(2.5)  # the other worker polls the shared control file every 0.5 s
        answers = [httpx.post(f"{base}/recommend", json={"user_id": 7}).json() for _ in range(30)]
        assert all([i["item_id"] for i in a["items"]] == want_new for a in answers)
        text = httpx.get(f"{base}/metrics").text
        line = next(
            x for x in text.splitlines() if x.startswith('twotower_requests_total{route="/recommend"')
        )
        assert float(line.split()[-1]) >= 50  # both workers' requests, summed
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_real_server_end_to_end_and_hot_swap_without_dropping_requests(server, runs):
    def ids(path):
        return [i.item_id for i in load_pipeline(path).recommend(RecommendRequest(user_id=7)).items]

    want_old, want_new = ids(runs[0]), ids(runs[1])
    assert want_old != want_new  # the two models disagree, so a swap is visible
    first = httpx.post(f"{server}/recommend", json={"user_id": 7}).json()
    assert [i["item_id"] for i in first["items"]] == want_old

    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=server, timeout=10) as session:
            while not stop.is_set():
                statuses.append(session.post("/recommend", json={"user_id": 7, "k": 10}).status_code)

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    swap = httpx.post(f"{server}/admin/reload", json={"path": str(runs[1])}, timeout=60)
    time.sleep(0.3)
    stop.set()
    for worker in workers:
        worker.join()
    assert swap.status_code == 200, swap.text
    assert len(statuses) > 20 and set(statuses) == {200}  # nothing dropped during the swap
    after = httpx.post(f"{server}/recommend", json={"user_id": 7}).json()
    assert [i["item_id"] for i in after["items"]] == want_new
    assert str(runs[1]) in httpx.get(f"{server}/healthz").json()["model"]
    bad = httpx.post(f"{server}/admin/reload", json={"path": "/no/such/run"}, timeout=60)
    assert bad.status_code == 409 and "not swapped" in bad.text
    assert str(runs[1]) in httpx.get(f"{server}/healthz").json()["model"]  # still the last good one


def test_fuzz_openapi_no_server_errors(runs):
    """schemathesis draws requests for every operation of the OpenAPI spec; none may get a 5xx.

    The strategy API rather than schemathesis's pytest plugin: the plugin's fixture support reaches
    into pytest internals that pytest 9.2 changed."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(runs[0], allow_reload=False))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/recommend", "/healthz", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case):
            response = case.call()
            assert response.status_code < 500, (case, response.text)

        no_server_error()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.sampled_from(
    [
        "user_id",
        "features",
        "history",
        "history_actions",
        "k",
        "exclude_seen",
        "exclude_items",
        "filters",
        "rerank",
    ]
)


@given(st.dictionaries(_fields, _json, max_size=5))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_request_bodies_no_server_errors(client, body):
    answer = client.post("/recommend", content=json.dumps(body), headers={"content-type": "application/json"})
    assert answer.status_code in (200, 422), (body, answer.text)


def test_export_is_created_on_first_serve(tmp_path):
    run_dir = tmp_path / "run"
    train_run(tiny_config(epochs=1), run_dir, progress=False)
    assert not (run_dir / "export").exists()
    with TestClient(create_app(run_dir)) as c:
        assert c.get("/healthz").status_code == 200
    assert (Path(run_dir) / "export" / "manifest.json").exists()
