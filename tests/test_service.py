"""The HTTP service: a real uvicorn server on 127.0.0.1 (random free port) over demo bundles;
answers equal the bundle's (and the CLI's), bad requests are clear 4xx, the admin reload
swaps bundles without failing a request and refuses a broken one."""
from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from click.testing import CliRunner

from main import cli
from model.bundle import Bundle
from model.service import MAX_BATCH, RankBatcher, create_app

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _run_and_export(root: Path, variant: str, *options: str) -> Path:
    output = _cli("run", "--dataset", "demo", "--model", variant, "--data-root",
                  str(root / "data"), "--runs-dir", str(root / "runs"), "--cache-dir",
                  str(root / "cache"), "--epochs", "4", *options)
    run_dir = [line for line in output.splitlines() if line.startswith("run written to ")][-1][15:]
    _cli("export", "--run", run_dir, "--variant", variant, "--out", str(root / variant))
    return root / variant


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_roberta) -> tuple[Path, Path]:
    """(fused bundle with text encoder and ranker, LightGCN bundle with neither)."""
    root = tmp_path_factory.mktemp("service")
    fused = _run_and_export(root, "fused", "--fuse-parts", "text,lightgcn", "--base-model",
                            str(tiny_roberta), "--layers", "2", "--no-quantize", "--rank",
                            "widedeep", "--rank-epochs", "2")
    return fused, _run_and_export(root, "lightgcn")


@contextmanager
def serving(app) -> Iterator[httpx.Client]:
    """A real uvicorn server in a thread on a free port; stopped on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def client(bundles) -> Iterator[httpx.Client]:
    with serving(create_app(bundles[0], admin_token=TOKEN, max_k=50)) as client:
        yield client


def _ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [row["id"] for row in response.json()["items"]]


def test_health_ready_docs(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["variant"] == "fused" and ready["ranker"] and ready["text"]
    assert ready["bundle"].startswith("fused/v0001@")
    assert client.get("/docs").status_code == 200
    assert "/users/{user_id}/recommendations" in client.get("/openapi.json").json()["paths"]


def test_user_recommendations_equal_the_bundle_and_the_cli(client, bundles):
    bundle = Bundle(bundles[0])
    for user in ("0", "5", "77"):
        for rank in (False, True):
            got = client.get(f"/users/{user}/recommendations",
                             params={"k": 10, "rank": str(rank).lower()})
            assert _ids(got) == [i for i, _ in bundle.recommend(user, 10, rank=rank)]
            assert got.json()["bundle"].startswith("fused/v0001@")
    shown = _cli("recommend", "--bundle", str(bundles[0]), "--user", "5", "--rank", "-k", "10")
    listed = [line.split("\t")[1] for line in shown.splitlines()[1:]]
    assert _ids(client.get("/users/5/recommendations?k=10&rank=true")) == listed
    seen = {bundle.item_ids[i] for i in bundle.seen[bundle.user_row("5")].indices}
    assert not seen & set(listed)


def test_concurrent_ranked_requests_get_their_own_lists(bundles):
    """Ranked requests that arrive together are ranked in one batch (the first call is
    slowed down so that the others queue behind it): each still gets the list `recommend`
    gives it alone."""
    bundle = Bundle(bundles[0])
    app = create_app(bundles[0])
    served = app.state.served.current().bundle
    batches, recommend_many = [], served.recommend_many

    def slow_first(users, k, rank):
        batches.append(len(users))
        if len(batches) == 1:
            time.sleep(0.5)
        return recommend_many(users, k, rank)
    served.recommend_many = slow_first
    users = [str(u) for u in range(0, 48, 3)]
    with serving(app) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda u: _ids(client.get(
            f"/users/{u}/recommendations", params={"k": 7, "rank": "true"})), users))
    assert answers == [[i for i, _ in bundle.recommend(u, 7, rank=True)] for u in users]
    assert max(batches) > 1 and sum(batches) == len(users)  # some were ranked together


class _SlowBundle:
    """Ranks 'user' as ['user-0', ...]; the first call waits until released; 'bad' fails."""

    def __init__(self) -> None:
        self.calls, self.release = [], threading.Event()
        self.ranker = type("Ranker", (), {"candidates": 200})()

    def recommend_many(self, users, k, rank):
        self.calls.append(list(users))
        if len(self.calls) == 1:
            self.release.wait(10)
        if "bad" in users:
            raise ValueError("bad user")
        return [[(f"{user}-{i}", float(-i)) for i in range(k)] for user in users]


def test_rank_batcher_batches_waiting_requests_and_isolates_errors():
    bundle = _SlowBundle()
    served = type("Served", (), {"bundle": bundle})()
    batcher = RankBatcher()
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(batcher.rank, served, "a", 3)
        while not bundle.calls:
            time.sleep(0.01)
        waiting = {user: pool.submit(batcher.rank, served, user, depth)
                   for user, depth in (("b", 2), ("bad", 2), ("c", 4), ("d", 1))}
        while batcher.jobs.qsize() < 4:
            time.sleep(0.01)
        bundle.release.set()
        assert first.result(10) == [("a-0", 0.0), ("a-1", -1.0), ("a-2", -2.0)]
        assert waiting["c"].result(10) == [(f"c-{i}", float(-i)) for i in range(4)]
        assert waiting["d"].result(10) == [("d-0", 0.0)]
        with pytest.raises(ValueError, match="bad user"):
            waiting["bad"].result(10)
    assert bundle.calls[1] == ["b", "bad", "c", "d"]  # the four that waited: one call
    assert ["b"] in bundle.calls[2:] and ["bad"] in bundle.calls[2:]  # then one by one
    thread = batcher._thread
    batcher.stop()
    assert not thread.is_alive() and batcher._thread is None
    assert batcher.rank(served, "e", 1) == [("e-0", 0.0)]  # a stopped batcher starts again
    batcher.stop()


def test_exclude_drops_items_and_keeps_the_order(client):
    full = _ids(client.get("/users/5/recommendations?k=12"))
    fewer = _ids(client.get(f"/users/5/recommendations?k=10&exclude={full[0]},{full[3]}"))
    assert fewer == [i for i in full if i not in (full[0], full[3])][:10]


def test_cold_start_from_profile_or_recent_items(client, bundles):
    bundle = Bundle(bundles[0])
    text = client.post("/recommendations", json={"profile": "thai curry and coffee", "k": 5})
    expected = bundle.recommend_for_vector(bundle.embed_profile("thai curry and coffee"), 5)
    assert _ids(text) == [i for i, _ in expected]
    recent = _ids(client.post("/recommendations", json={"items": ["1", "2"], "k": 8,
                                                        "exclude": ["3"]}))
    assert len(recent) == 8 and not {"1", "2", "3"} & set(recent)
    assert client.post("/recommendations", json={"k": 5}).status_code == 422
    assert client.post("/recommendations", json={"profile": "  ", "k": 5}).status_code == 422
    missing = client.post("/recommendations", json={"items": ["no-such-item"], "k": 5})
    assert missing.status_code == 404 and "no-such-item" in missing.json()["detail"]


def test_similar_items_lookalikes_and_batch(client, bundles):
    bundle = Bundle(bundles[0])
    assert _ids(client.get("/items/3/similar?k=5")) == [i for i, _ in bundle.similar_items("3", 5)]
    users = client.get("/users/3/lookalikes?k=5")
    assert _ids(users) == [u for u, _ in bundle.lookalike_users("3", 5)]
    assert users.json()["kind"] == "user"
    batch = client.post("/batch/recommendations", json={"users": ["1", "2"], "k": 4,
                                                        "rank": True})
    assert batch.status_code == 200, batch.text
    for result in batch.json()["results"]:
        assert [r["id"] for r in result["items"]] == \
            [i for i, _ in bundle.recommend(result["user"], 4, rank=True)]


def test_client_mistakes_are_clear_4xx(client):
    unknown = client.get("/users/nobody/recommendations")
    assert unknown.status_code == 404 and "unknown user id 'nobody'" in unknown.json()["detail"]
    assert client.get("/items/nothing/similar").status_code == 404
    assert client.get("/users/nobody/lookalikes").status_code == 404
    for k in ("0", "51", "-3", "many"):
        answer = client.get(f"/users/5/recommendations?k={k}")
        assert answer.status_code == 422 and "k" in answer.json()["detail"], k
    assert client.post("/recommendations", json={"items": ["1"], "k": 51}).status_code == 422
    malformed = client.post("/recommendations", content=b'{"k": 3',
                            headers={"content-type": "application/json"})
    assert malformed.status_code == 422 and "malformed JSON" in malformed.json()["detail"]
    huge = client.post("/recommendations", json={"profile": "x" * 70_000})
    assert huge.status_code == 413
    crowd = client.post("/batch/recommendations", json={"users": ["1"] * (MAX_BATCH + 1)})
    assert crowd.status_code == 422
    assert client.post("/batch/recommendations", json={"users": ["1", "??"]}).status_code == 404
    assert client.get("/users/5/recommendations?exclude=nope").status_code == 404


def test_admin_reload_needs_the_token(client, bundles):
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong"}
                       ).status_code == 403
    with serving(create_app(bundles[0])) as closed:  # no token: the endpoint is off
        assert closed.post("/admin/reload", headers=ADMIN).status_code == 404


def test_metrics_count_requests_and_name_the_bundle(client):
    client.get("/users/nobody/recommendations")
    text = client.get("/metrics").text
    assert 'recsys_requests_total{endpoint="/users/{user_id}/recommendations",method="GET",' \
           'status="404"}' in text
    assert "recsys_request_seconds_bucket" in text and "recsys_errors_total" in text
    assert 'recsys_bundle_info{bundle="fused/v0001@' in text


def _hammer(client: httpx.Client, stop: threading.Event, statuses: list[int]) -> None:
    while not stop.is_set():
        statuses.append(client.get("/users/5/recommendations?k=10").status_code)


def test_hot_swap_serves_on_and_refuses_a_broken_bundle(bundles, tmp_path):
    fused, lightgcn = bundles
    with serving(create_app(fused, admin_token=TOKEN)) as client:
        stop, statuses = threading.Event(), []
        worker = threading.Thread(target=_hammer, args=(client, stop, statuses))
        worker.start()
        time.sleep(0.2)
        swapped = client.post("/admin/reload", headers=ADMIN, json={"bundle": str(lightgcn)})
        time.sleep(0.2)
        stop.set()
        worker.join(30)
        assert swapped.status_code == 200, swapped.text
        assert statuses and set(statuses) == {200}
        after = client.get("/users/5/recommendations?k=10")
        assert after.json()["bundle"].startswith("lightgcn/v0001@")
        assert _ids(after) == [i for i, _ in Bundle(lightgcn).recommend("5", 10)]
        assert client.get("/users/5/recommendations?rank=true").status_code == 409
        assert client.post("/recommendations", json={"profile": "tea"}).status_code == 409
        assert 'recsys_bundle_info{bundle="lightgcn/v0001@' in client.get("/metrics").text

        broken = tmp_path / "broken"
        shutil.copytree(lightgcn / "current", broken)  # one version
        (broken / "seen.npz").write_bytes(b"corrupted")
        for folder in (broken, tmp_path / "missing"):
            refused = client.post("/admin/reload", headers=ADMIN, json={"bundle": str(folder)})
            assert refused.status_code == 422 and "refused" in refused.json()["detail"]
        assert client.post("/admin/reload", headers=ADMIN, content=b"[1",
                           ).status_code == 422
        still = client.get("/users/5/recommendations?k=10")
        assert still.json()["bundle"] == after.json()["bundle"] and _ids(still) == _ids(after)


def test_attribute_filters_over_http(client, bundles):
    got = client.get("/users/5/recommendations?k=5&where=city=Tucson&where=categories=Thai")
    wanted = Bundle(bundles[0]).recommend("5", 5, where={"city": "Tucson", "categories": "Thai"})
    assert got.status_code == 200 and _ids(got) == [i for i, _ in wanted] != []
    for bad in ("where=colour=red", "where=nonsense", "where=city=",
                "where=city=Tucson&where=city=Tampa"):
        assert client.get(f"/users/5/recommendations?{bad}").status_code == 422, bad
