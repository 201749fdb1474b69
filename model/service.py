"""HTTP recommendation service over one production bundle (FastAPI + uvicorn).

The bundle is loaded, verified and warmed once at start; `POST /admin/reload` loads and
verifies another (or the same path again, e.g. a re-pointed `current` symlink) in a worker
thread and swaps it in with one reference assignment: requests in flight keep the bundle
they started with, and a bundle that fails to load is refused while the old one serves on.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from pydantic import BaseModel, Field

from model.bundle import MANIFEST_DIGEST, Bundle, BundleError

MAX_BODY = 64 * 1024  # bytes; a larger request body is refused with 413
MAX_BATCH = 256  # users per batch request
MAX_IDS = 1000  # ids in `items` or `exclude`
MAX_PROFILE = 10_000  # characters of profile text
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
log = logging.getLogger("recsys.service")


@dataclass
class Served:
    """A warmed bundle and its name; `no_text_reason` says why profiles cannot be embedded."""
    bundle: Bundle
    name: str
    fingerprint: str
    no_text_reason: str
    loaded_at: float = field(default_factory=time.time)

    @property
    def has_text(self) -> bool:
        return not self.no_text_reason

    def embed(self, text: str) -> np.ndarray:
        if not self.has_text:
            raise HTTPException(409, f"this bundle cannot embed a profile: {self.no_text_reason}")
        return self.bundle.embed_profile(text)


def load_served(folder: str | Path) -> Served:
    """Load and verify a bundle (checksums), then warm it: ranker, encoder, both indexes."""
    bundle = Bundle(folder)
    if bundle.manifest.get("ranker") is not None:
        bundle.recommend(bundle.user_ids[0], 1, rank=True)
    bundle.recommend(bundle.user_ids[0], 1)
    bundle.lookalike_users(bundle.user_ids[0], 1)  # builds the user index once, here
    try:
        bundle.encoder  # noqa: B018 - loads it once, now
        reason = ""
    except BundleError as error:  # the rest of the bundle still serves; profiles get the reason
        reason = str(error)
    fingerprint = (bundle.folder / MANIFEST_DIGEST).read_text().strip()
    where = f"{bundle.store.root.resolve().name}/{bundle.version}" if bundle.store \
        else bundle.folder.resolve().name
    name = f"{where}@{fingerprint[:12]}"
    return Served(bundle, name, fingerprint, reason)


class Metrics:
    """Prometheus metrics in a registry of this app's own (two apps never share counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("recsys_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("recsys_request_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("recsys_errors", "Responses with status >= 400",
                              ["endpoint", "kind"], registry=self.registry)
        self.reloads = Counter("recsys_reloads", "Bundle reloads by outcome", ["outcome"],
                               registry=self.registry)
        self.bundle = Gauge("recsys_bundle_info", "The bundle being served (value 1)",
                            ["bundle", "variant", "fingerprint", "created"],
                            registry=self.registry)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, "client" if status < 500 else "server").inc()

    def serving(self, served: Served) -> None:
        self.bundle.clear()
        manifest = served.bundle.manifest
        self.bundle.labels(served.name, manifest["variant"], served.fingerprint,
                           manifest.get("created", "")).set(1)


class MetricsMiddleware:
    """Counts every response (413s and 500s included) under its route template."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            # a route's template, never a raw path that a client could vary without end
            endpoint = getattr(scope.get("route"), "path", None) or (
                scope["path"] if status[0] < 400 else "other")
            self.metrics.observe(endpoint, scope["method"], status[0],
                                 time.perf_counter() - started)


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413 (reading at most that much)."""

    def __init__(self, app, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                refusal = JSONResponse({"detail": f"request body over {self.limit:,} bytes"}, 413)
                return await refusal(scope, receive, send)
        replayed = [False]

        async def replay():
            if replayed[0]:
                return await receive()
            replayed[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)


class ProfileRequest(BaseModel):
    profile: str | None = Field(None, max_length=MAX_PROFILE, description="New user's text")
    items: list[str] | None = Field(None, min_length=1, max_length=MAX_IDS)  # recent items
    k: int = Field(20, ge=1)
    exclude: list[str] = Field(default_factory=list, max_length=MAX_IDS)


class BatchRequest(BaseModel):
    users: list[str] = Field(min_length=1, max_length=MAX_BATCH)
    k: int = Field(20, ge=1)
    rank: bool = False


class RankBatcher:
    """Ranked requests that arrive while others are being ranked are answered together:
    one thread takes every waiting request (up to `max_batch`) and ranks those of the same
    bundle with one search per recall channel and one Wide&Deep call, about half the work
    per request of ranking them one by one. Nothing waits on purpose: a request that finds
    the thread idle is ranked at once. Lists are those of `Bundle.recommend` (with HNSW
    channels a batch searches as deep as its most active user, which can change a list where
    the shallower search missed an item); a batch that fails is retried one request at a
    time, so an error reaches only its own request."""

    WAIT = 60.0  # seconds a request waits for its answer at most

    def __init__(self, max_batch: int = 32) -> None:
        self.max_batch, self.jobs = max_batch, queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def rank(self, served: Served, user: str, depth: int) -> list[tuple[str, float]]:
        with self._starting:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="rank-batcher")
                self._thread.start()
            job = (served, user, depth, Future())
            self.jobs.put(job)
        return job[3].result(self.WAIT)

    def stop(self) -> None:
        with self._starting:
            if self._thread is not None:
                self.jobs.put(None)
                self._thread.join()
                self._thread = None

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            jobs = [self.jobs.get()]
            while len(jobs) < self.max_batch and not self.jobs.empty():
                jobs.append(self.jobs.get())
            stopping = None in jobs  # answer the others, then end
            jobs = [job for job in jobs if job is not None]
            try:
                self._answer(jobs)
            except BaseException as error:  # never leave a request waiting
                for job in jobs:
                    if not job[3].done():
                        job[3].set_exception(error)

    @staticmethod
    def _answer(jobs: list) -> None:
        groups: dict[tuple, list] = {}
        for job in jobs:  # one ranker call per bundle (a swap may be under way); a list
            served, _, depth, _ = job  # deeper than the candidates changes the union
            limit = served.bundle.ranker.candidates
            groups.setdefault((id(served), depth if depth > limit else 0), []).append(job)
        for group in groups.values():
            depth = max(job[2] for job in group)
            try:
                lists = group[0][0].bundle.recommend_many([job[1] for job in group], depth,
                                                          rank=True)
            except Exception as error:
                if len(group) == 1:
                    group[0][3].set_exception(error)
                    continue
                RankBatcher._answer_one_by_one(group)
                continue
            for (_, _, asked, answer), pairs in zip(group, lists):
                answer.set_result(pairs[:asked])

    @staticmethod
    def _answer_one_by_one(group: list) -> None:
        for served, user, depth, answer in group:
            try:
                answer.set_result(served.bundle.recommend_many([user], depth, rank=True)[0])
            except Exception as error:
                answer.set_exception(error)


class State:
    """The served bundle; replaced by one assignment, so a reader sees old or new, whole."""

    def __init__(self, folder: Path, served: Served) -> None:
        self.folder, self.served = folder, served
        self.reloading = threading.Lock()
        self.batcher = RankBatcher()

    def current(self) -> Served:
        return self.served  # the reference taken here serves the whole request


def _rows(pairs: list[tuple[str, float]]) -> list[dict]:
    return [{"id": identifier, "score": score} for identifier, score in pairs]


def _answer(served: Served, pairs: list[tuple[str, float]], kind: str = "item") -> dict:
    return {"items": _rows(pairs), "kind": kind, "bundle": served.name}


def _known(bundle: Bundle, users: list[str] = (), items: list[str] = ()) -> None:
    try:
        for user in users:
            bundle.user_row(user)
        for item in items:
            bundle.item_row(item)
    except BundleError as error:
        raise HTTPException(404, str(error)) from error


def _check_k(k: int, max_k: int) -> None:
    if k > max_k:
        raise HTTPException(422, f"k: at most {max_k} (got {k})")


def _without(fetch, k: int, exclude: set[str]) -> list[tuple[str, float]]:
    """The top k of `fetch(depth)` once `exclude` is dropped (fetched deeper to fill k)."""
    if not exclude:
        return fetch(k)
    return [pair for pair in fetch(k + len(exclude)) if pair[0] not in exclude][:k]


def _has_ranker(bundle: Bundle) -> None:
    if bundle.manifest.get("ranker") is None:
        raise HTTPException(409, f"this '{bundle.manifest['variant']}' bundle has no ranker")


def _for_user(served: Served, user: str, k: int, rank: bool,
              exclude: set[str] = frozenset(), where: dict | None = None,
              batcher: RankBatcher | None = None) -> list[tuple[str, float]]:
    bundle = served.bundle
    _known(bundle, users=[user], items=sorted(exclude))
    if rank:
        _has_ranker(bundle)
    if where and set(where) - set(bundle._attribute_index):
        unknown = ", ".join(sorted(set(where) - set(bundle._attribute_index)))
        raise HTTPException(422, f"where: unknown item attribute(s) {unknown}; this bundle can "
                            f"filter by {', '.join(sorted(bundle._attribute_index)) or 'none'}")

    def fetch(depth: int) -> list[tuple[str, float]]:
        if rank and not where and batcher is not None:
            return batcher.rank(served, user, depth)
        return bundle.recommend(user, depth, rank, where)
    try:
        return _without(fetch, k, exclude)
    except BundleError as error:  # e.g. ranking a user who joined after the ranker
        raise HTTPException(409, str(error)) from None


def _filters(where: list[str]) -> dict[str, str]:
    pairs = [w.split("=", 1) for w in where]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise HTTPException(422, "where: NAME=VALUE with both parts, e.g. where=city=Tucson")
    names = [name.strip() for name, _ in pairs]
    if len(set(names)) != len(names):
        raise HTTPException(422, "where: each attribute at most once")
    return dict(zip(names, (value for _, value in pairs)))


def _fold_in(served: Served, request: ProfileRequest) -> list[tuple[str, float]]:
    """Cold start: the profile's text vector, or the mean of the recent items' vectors."""
    bundle = served.bundle
    if (request.profile is None) == (request.items is None):
        raise HTTPException(422, "give exactly one of 'profile' (text) or 'items' (ids)")
    _known(bundle, items=[*(request.items or []), *request.exclude])
    if request.profile is not None:
        if not request.profile.strip():
            raise HTTPException(422, "'profile' is empty: give the new user's profile text")
        vector, seen = served.embed(request.profile), set()
    else:
        vector = bundle.items[[bundle.item_row(i) for i in request.items]].mean(axis=0)
        seen = set(request.items)
    return _without(lambda depth: bundle.recommend_for_vector(vector, depth), request.k,
                    seen | set(request.exclude))


def _problem(error: dict) -> str:
    if error["type"] == "json_invalid":
        return f"malformed JSON body ({error.get('ctx', {}).get('error', error['msg'])})"
    return f"{'.'.join(str(p) for p in error['loc'] if p != 'body') or 'body'}: {error['msg']}"


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with one readable line in `detail` (FastAPI's error list under `errors`)."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    return JSONResponse({"detail": "; ".join(_problem(e) for e in error.errors()),
                         "errors": errors}, 422)


def create_app(bundle_dir: str | Path, admin_token: str | None = None,
               max_k: int = 1000, watch_seconds: float = 2.0) -> FastAPI:
    """The service over `bundle_dir` (loaded and warmed now: a bad bundle raises
    BundleError here). `/admin/reload` exists only when `admin_token` is given. When
    `bundle_dir` is a store, its `current` pointer is checked every `watch_seconds` (0: never)
    and a new current version is swapped in as a reload would."""
    metrics = Metrics()
    state = State(Path(bundle_dir), load_served(bundle_dir))
    metrics.serving(state.served)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        stop = threading.Event()
        if watch_seconds > 0 and state.served.bundle.store is not None:
            threading.Thread(target=_watch_current, args=(state, metrics, watch_seconds, stop),
                             daemon=True, name="watch-current").start()
        yield
        stop.set()
        state.batcher.stop()

    app = FastAPI(title="recsys", summary="Recall + Wide&Deep recommendations from a bundle",
                  lifespan=lifespan)
    app.state.served = state
    app.add_exception_handler(RequestValidationError, _validation_error)
    _ops_routes(app, state, metrics)
    _recommendation_routes(app, state, max_k)
    if admin_token:
        _admin_routes(app, state, metrics, admin_token)
    app.add_middleware(BodyLimit)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _ops_routes(app: FastAPI, state: State, metrics: Metrics) -> None:
    @app.get("/health", tags=["ops"])
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    def ready() -> dict:
        served = state.current()
        manifest = served.bundle.manifest
        return {"status": "ready", "bundle": served.name, "variant": manifest["variant"],
                "ranker": manifest.get("ranker") is not None, "text": served.has_text,
                "loaded_at": served.loaded_at, "reloading": state.reloading.locked()}

    @app.get("/metrics", tags=["ops"])
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _recommendation_routes(app: FastAPI, state: State, max_k: int) -> None:
    K = Query(20, ge=1, le=max_k, description=f"List length (1..{max_k})")

    @app.get("/users/{user_id}/recommendations", tags=["recommend"])
    def for_user(user_id: str, k: int = K, rank: bool = False,
                 exclude: str = Query("", description="Item ids to leave out, comma-separated"),
                 where: list[str] = Query([], description="Item attribute filters NAME=VALUE "
                                          "(city, state, categories), repeatable")) -> dict:
        """Top-k items for a known user (training items always excluded); `rank=true`
        re-orders with the bundle's Wide&Deep ranker (409 when it has none); `where`
        keeps only items with those attributes."""
        excluded = {i.strip() for i in exclude.split(",") if i.strip()}
        if len(excluded) > MAX_IDS:
            raise HTTPException(422, f"exclude: at most {MAX_IDS} ids")
        served = state.current()
        return _answer(served, _for_user(served, user_id, k, rank, excluded, _filters(where),
                                         state.batcher))

    @app.post("/recommendations", tags=["recommend"])
    def for_new_user(request: ProfileRequest) -> dict:
        """Cold start: `profile` text (bundles with an encoder) or recent `items`."""
        _check_k(request.k, max_k)
        served = state.current()
        return _answer(served, _fold_in(served, request))

    @app.get("/items/{item_id}/similar", tags=["recommend"])
    def similar(item_id: str, k: int = K) -> dict:
        served = state.current()
        _known(served.bundle, items=[item_id])
        return _answer(served, served.bundle.similar_items(item_id, k))

    @app.get("/users/{user_id}/lookalikes", tags=["recommend"])
    def lookalikes(user_id: str, k: int = K) -> dict:
        """The most similar users (`items` holds user ids here; `kind` is 'user')."""
        served = state.current()
        _known(served.bundle, users=[user_id])
        return _answer(served, served.bundle.lookalike_users(user_id, k), "user")

    @app.post("/batch/recommendations", tags=["recommend"])
    def batch(request: BatchRequest) -> dict:
        """Top-k items for each of up to 256 known users (MAX_BATCH)."""
        _check_k(request.k, max_k)
        served = state.current()
        _known(served.bundle, users=request.users)
        if request.rank:
            _has_ranker(served.bundle)
        try:  # one search (and one ranker call) for all of them
            lists = served.bundle.recommend_many(request.users, request.k, request.rank)
        except BundleError as error:  # e.g. ranking a user who joined after the ranker
            raise HTTPException(409, str(error)) from None
        results = [{"user": user, "items": _rows(pairs)}
                   for user, pairs in zip(request.users, lists)]
        return {"results": results, "bundle": served.name}


def _authorised(request: Request, token: str) -> None:
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer "):
        raise HTTPException(401, "missing 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given[7:].encode(), token.encode()):
        raise HTTPException(403, "wrong admin token")


async def _reload_folder(request: Request, default: Path) -> Path:
    raw = await request.body()
    try:
        asked = json.loads(raw) if raw.strip() else {}
        return Path(asked["bundle"]) if asked.get("bundle") else default
    except (ValueError, AttributeError, TypeError) as error:
        raise HTTPException(422, f'body: expected {{"bundle": "folder"}} ({error})') from error


def _admin_routes(app: FastAPI, state: State, metrics: Metrics, token: str) -> None:
    @app.post("/admin/reload", tags=["admin"])
    async def reload(request: Request) -> dict:
        """Load and verify a bundle in a worker thread, then swap it in; on failure the
        current bundle keeps serving. Body (optional): {"bundle": "folder"}; without it,
        the folder served now is read again (e.g. a re-pointed `current` symlink)."""
        _authorised(request, token)
        folder = await _reload_folder(request, state.folder)
        if not state.reloading.acquire(blocking=False):
            raise HTTPException(409, "a reload is already in progress")
        try:
            previous, served = await anyio.to_thread.run_sync(_swap_in, state, metrics, folder)
        except Exception as error:  # whatever a bad bundle raises, the old one serves on
            raise HTTPException(422, f"bundle {folder} refused: {error}") from error
        finally:
            state.reloading.release()
        return {"status": "swapped", "bundle": served.name, "previous": previous}


def _swap_in(state: State, metrics: Metrics, folder: Path) -> tuple[str, Served]:
    """Load and verify `folder`, then serve it (the caller holds `state.reloading`)."""
    try:
        served = load_served(folder)
    except Exception as error:
        metrics.reloads.labels("refused").inc()
        log.warning("reload of %s refused: %s", folder, error)
        raise
    previous, state.served, state.folder = state.served.name, served, folder
    metrics.serving(served)
    metrics.reloads.labels("swapped").inc()
    log.info("now serving %s (was %s)", served.name, previous)
    return previous, served


def _watch_current(state: State, metrics: Metrics, every: float, stop: threading.Event) -> None:
    """Swap in the store's `current` version when it changes (a refused version is not
    tried again until `current` moves on)."""
    refused = None
    while not stop.wait(every):
        store = state.current().bundle.store
        if store is None:  # a reload pointed the service at a single version
            continue
        try:
            current = store.current()
        except ValueError:
            continue
        if current in (state.current().bundle.version, refused):
            continue
        if state.reloading.acquire(blocking=False):
            try:
                _swap_in(state, metrics, store.root)
                refused = None
            except Exception:  # logged and counted; the old version serves on
                refused = current
            finally:
                state.reloading.release()


def serve(bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          admin_token: str | None = None, watch_seconds: float = 2.0, threads: int = 0) -> None:
    """Run the service with uvicorn (admin token: the argument, else $RECSYS_ADMIN_TOKEN).
    `threads`: threads each request's FAISS search and ranker use (0: the libraries'
    default); with many concurrent requests, 1 avoids oversubscribing the cores."""
    token = admin_token or os.environ.get("RECSYS_ADMIN_TOKEN") or None
    if threads:
        import faiss
        import torch

        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
    uvicorn.run(create_app(bundle_dir, token, watch_seconds=watch_seconds), host=host,
                port=port, log_level="warning")

