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


# --- edge cases of the service -------------------------------------------------------------------


def _post(client, body: bytes):
    return client.post("/recommend", content=body, headers={"content-type": "application/json"})


def _strict_json(text: str):
    """JSON as RFC 8259 has it: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"{constant} in a response")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "body, status",
    [
        (b'{"user_id": NaN}', 422),
        (b'{"user_id": Infinity}', 422),
        (b'{"k": -Infinity}', 422),
        (b'{"k": 5.5}', 422),
        (b'{"history_actions": ["a"]}', 422),
        (b'{"features": {"segment": {"a": 1}}}', 422),
        (b'{"features": {"segment": ["s1", "s2"]}}', 422),
        (b'{"user_id": 7, "features": {"segment": NaN}}', 200),
        (b'{"features": {"segment": Infinity}}', 200),
        (b'{"filters": {"year": [NaN]}}', 200),
        (b'{"user_id": "\\u00fc\\u00f1\\u00ed\\ud83d\\ude00"}', 200),
        (b'{"user_id": 100000000000000000000000000000, "history": [-1, 3]}', 200),
        (b'{"history": [3.0]}', 422),  # ids are strings or integers (strictly: no float, no bool)
        (b'{"history": [1e300]}', 422),
        (b'{"user_id": 7, "k": 1000}', 200),
        (b'{"user_id": 7, "k": 1001}', 422),
    ],
)
def test_odd_json_is_answered_with_strict_json_never_a_5xx(client, body, status):
    answer = _post(client, body)
    assert answer.status_code == status, answer.text
    _strict_json(answer.text)


def test_unicode_ids_and_feature_names_round_trip(client):
    answer = client.post("/recommend", json={"user_id": "ünï-😀", "history": ["😀"], "exclude_items": ["é"]})
    assert answer.status_code == 200 and answer.json()["user_id"] == "ünï-😀"
    assert answer.json()["path"] == "cold_start" and answer.json()["ignored_history"] == ["😀"]
    bad = client.post("/recommend", json={"features": {"ségment": "s1"}})
    assert bad.status_code == 422 and "ségment" in bad.json()["detail"]


def _samples(client) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    answer = client.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_metrics_parse_and_count_requests_by_route_and_status(client):
    def count(route, status):
        return before.get(("twotower_requests_total", (("route", route), ("status", status))), 0.0)

    before = _samples(client)
    want = {
        ("/recommend", "200"): 2,
        ("/recommend", "422"): 3,
        ("unmatched", "404"): 1,
        ("/healthz", "200"): 1,
    }
    want = {key: count(*key) + n for key, n in want.items()}
    latency = before.get(("twotower_request_latency_seconds_count", (("route", "/recommend"),)), 0.0)
    client.post("/recommend", json={"user_id": 7})
    client.post("/recommend", json={"user_id": "new", "k": 3})
    client.post("/recommend", json={"k": 0})
    _post(client, b"{not json")
    client.post("/recommend", json={"filters": {"colour": ["red"]}})
    client.get("/no/such/route")
    client.get("/healthz")
    before = _samples(client)
    assert {key: count(*key) for key in want} == want
    assert before[("twotower_request_latency_seconds_count", (("route", "/recommend"),))] == latency + 5


def test_the_model_loads_once_at_start_up(runs, monkeypatch):
    import twotower.serve as serve

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return load_pipeline(*args, **kwargs)

    monkeypatch.setattr(serve, "load_pipeline", counting)
    with TestClient(create_app(runs[0], allow_reload=True)) as c:
        assert len(calls) == 1
        for body in ({"user_id": 7}, {"user_id": "new"}, {"k": 0}):
            c.post("/recommend", json=body)
        c.get("/healthz"), c.get("/metrics")
        assert len(calls) == 1
        assert c.post("/admin/reload", json={}).status_code == 200
        assert len(calls) == 2 and calls[1] == runs[0]  # a reload, and only a reload, loads again


def test_a_reload_without_a_path_exports_a_changed_run_again(runs, tmp_path):
    import shutil

    from twotower.storage import load_tensors, save_tensors

    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir)
    with TestClient(create_app(run_dir, allow_reload=True)) as c:
        before = c.get("/healthz").json()["model"]
        answer = c.post("/recommend", json={"user_id": 7}).json()
        # the run is trained again in place (here: its item tower's weights change)
        weights = load_tensors(run_dir / "model.safetensors")
        name = next(k for k in weights if "item" in k and weights[k].is_floating_point())
        weights[name] = -weights[name]
        save_tensors(run_dir / "model.safetensors", weights)
        assert c.post("/admin/reload", json={}).status_code == 200
        assert c.get("/healthz").json()["model"] != before  # a new export, not the old one again
        want = [i.item_id for i in load_pipeline(run_dir).recommend(RecommendRequest(user_id=7)).items]
        after = c.post("/recommend", json={"user_id": 7}).json()
        assert [i["item_id"] for i in after["items"]] == want != [i["item_id"] for i in answer["items"]]


def test_cli_recommend_answers_what_the_service_answers(client, runs):
    from typer.testing import CliRunner

    from twotower.cli import app

    cases = [
        (["--user", "7", "-k", "5", "--filter", "genres=g2"], {"k": 5, "filters": {"genres": ["g2"]}}),
        (["--user", "new", "--feature", "segment=s1", "--history", "3", "--history", "x"],
         {"user_id": "new", "features": {"segment": "s1"}, "history": ["3", "x"]}),
        (["--user", "7", "--include-seen", "--no-rerank"], {"exclude_seen": False, "rerank": False}),
    ]  # fmt: skip
    for args, body in cases:
        body = {"user_id": "7", **body}
        result = CliRunner().invoke(app, ["recommend", str(runs[0]), *args, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == client.post("/recommend", json=body).json()


@pytest.fixture(scope="module")
def routed(runs):
    """The app with the fast path taken out: POST /recommend then reaches the declared FastAPI route."""
    from twotower.serve import _Measure

    app = create_app(runs[0], allow_reload=False)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not _Measure]
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id": 7, "k": 3}',
        b'{"user_id": "u", "features": {"segment": "s1"}, "history": [3, "x"], "filters": {"year": [1974]}}',
        b'{"user_id": 7, "k": 0}',
        b'{"user_id": 7, "k": "ten"}',
        b'{"user_id": 7, "kk": 3}',
        b'{"user_id": Infinity}',
        b'{"features": {"segmnt": "s1"}}',
        b'{"filters": {"colour": ["red"]}}',
    ],
)
def test_fast_path_and_fastapi_route_agree(client, routed, body):
    fast, slow = _post(client, body), _post(routed, body)
    assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"{not json", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"[]", {"content-type": "application/json"}),
        (b'{"user_id": ' + b"1" * 5000 + b"}", {"content-type": "application/json"}),
        (b'{"user_id": 7}', {}),
        (b'{"user_id": 7}', {"content-type": "text/plain"}),
        (b'{"features": {"segmnt": "s1"}}', {"content-type": "application/json"}),
    ],
    ids=["bad-json", "empty", "array", "5000-digit-int", "no-content-type", "text-plain", "request-error"],
)
def test_fast_path_hands_everything_it_does_not_answer_to_the_route_byte_for_byte(
    client, routed, body, headers
):
    """Errors and other content types are the declared route's answers, not a look-alike."""
    fast = client.post("/recommend", content=body, headers=headers)
    slow = routed.post("/recommend", content=body, headers=headers)
    assert (fast.status_code, fast.content) == (slow.status_code, slow.content)


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "--7"},
        {"user_id": "1" * 5000},  # int() refuses more than 4300 digits
        {"user_id": 7, "history": ["--3"]},
        {"user_id": 7, "exclude_items": ["--3"]},
    ],
)
def test_malformed_numeric_ids_are_unknown_ids_never_a_5xx(client, body):
    answer = client.post("/recommend", json=body)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "body", [{"user_id": True}, {"history": [True]}, {"exclude_items": [False]}, {"k": True}, {"k": "5"}]
)
def test_json_booleans_and_quoted_numbers_are_wrong_types_not_ids_or_counts(client, body):
    # lax validation made true user 1 and k=true one item
    assert client.post("/recommend", json=body).status_code == 422


def _broken_export(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src / "export", dst)
    if how == "manifest_keys":  # an export of the right format whose manifest lacks a section
        manifest = json.loads((dst / "manifest.json").read_text())
        del manifest["files"]
        (dst / "manifest.json").write_text(json.dumps(manifest))
    elif how == "manifest_list":
        (dst / "manifest.json").write_text("[]")
    return dst


@pytest.mark.parametrize("how", ["manifest_keys", "manifest_list", "corrupt_weights"])
def test_a_reload_to_a_broken_run_or_export_is_a_409_with_the_reason_and_the_old_model_serves(
    runs, tmp_path, how
):
    import shutil

    if how == "corrupt_weights":  # a run whose weights file is cut short: safetensors' own error type
        target = tmp_path / "run"
        shutil.copytree(runs[1], target, ignore=shutil.ignore_patterns("export"))
        data = (target / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(data[:100])
    else:
        target = _broken_export(runs[1], tmp_path / "export", how)
    with TestClient(create_app(runs[0]), raise_server_exceptions=False) as c:
        before = c.get("/healthz").json()["model"]
        answer = c.post("/admin/reload", json={"path": str(target)})
        assert answer.status_code == 409, answer.text
        assert answer.json()["detail"].startswith("not swapped: ")
        assert c.get("/healthz").json()["model"] == before
        assert c.post("/recommend", json={"user_id": 7}).status_code == 200


def test_a_worker_keeps_following_swaps_after_one_it_could_not_load(runs, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    broken = _broken_export(runs[1], tmp_path / "broken", "manifest_keys")
    with TestClient(create_app(runs[0], control=control)) as c:
        before = c.get("/healthz").json()["model"]
        (control / "model.json").write_text(json.dumps({"generation": 1, "path": str(broken)}))
        time.sleep(1.5)  # the worker polls every 0.5 s; the broken swap is logged and skipped
        assert c.get("/healthz").json()["model"] == before
        (control / "model.json").write_text(json.dumps({"generation": 2, "path": str(runs[1])}))
        for _ in range(40):
            time.sleep(0.25)
            if str(runs[1]) in c.get("/healthz").json()["model"]:
                break
        assert str(runs[1]) in c.get("/healthz").json()["model"]


def test_healthz_reads_the_served_model_once(runs):
    """Every field of one /healthz answer describes the same model, even across a concurrent swap."""
    app = create_app(runs[0])
    holder = app.state.holder
    first, second = holder.pipeline, load_pipeline(runs[1])

    class Swapping:  # the swap lands between two reads of holder.pipeline
        reads = 0

        def __get__(self, obj, owner):  # type: ignore[no-untyped-def]
            Swapping.reads += 1
            return first if Swapping.reads == 1 else second

        def __set__(self, obj, value):  # type: ignore[no-untyped-def]
            pass

    class Holder(type(holder)):
        pipeline = Swapping()

    holder.__class__ = Holder
    with TestClient(app) as c:
        health = c.get("/healthz").json()
    assert health["model"] == first.model_id and health["users"] == len(first.exported.user_ids)


def test_a_followed_swap_that_waited_behind_a_newer_own_reload_is_skipped(monkeypatch, tmp_path):
    # Worker A reloads X (slow); meanwhile worker B's reload of Y reaches A's follower, which waits for
    # the lock. A's reload then publishes a newer generation: the follower must not land Y after it
    # (A would serve Y while the control file, and so every other worker, says X).
    from twotower import serve

    loading_x, release_x = threading.Event(), threading.Event()

    def load(source, *args):  # type: ignore[no-untyped-def]
        if source.name == "x":
            loading_x.set()
            release_x.wait(10)
        return f"pipeline {source.name}"

    monkeypatch.setattr(serve, "load_pipeline", load)
    holder = serve.ModelHolder(tmp_path / "w", "pipeline w")  # type: ignore[arg-type]
    holder.generation = 5
    published = []

    def publish() -> None:
        holder.generation = 100
        published.append(holder.source.name)

    own = threading.Thread(target=holder.swap, args=(tmp_path / "x", None, None, 0, None, publish))
    own.start()
    assert loading_x.wait(10)
    followed: list = []
    y = tmp_path / "y"
    follower = threading.Thread(target=lambda: followed.append(holder.swap(y, None, None, 0, 50)))
    follower.start()
    time.sleep(0.2)  # the follower now waits for the lock
    release_x.set()
    own.join(10)
    follower.join(10)
    assert published == ["x"] and followed == [None]
    assert holder.pipeline == "pipeline x" and holder.generation == 100
    # A newer generation is followed; one already taken, or older, is not.
    assert holder.swap(tmp_path / "y", None, None, 0, 101) == "pipeline y" and holder.generation == 101
    assert holder.swap(tmp_path / "z", None, None, 0, 101) is None and holder.pipeline == "pipeline y"
