"""Load test of the HTTP service: starts `model.service` over a bundle as a subprocess on
127.0.0.1 at a free port, then an asyncio httpx client sends bounded load (at most
--requests requests and --seconds seconds per cell) to `/users/{id}/recommendations` at 1,
8 and 32 concurrent clients, recall only and recall + ranking (when the bundle has a
ranker), and prints a markdown table. A last cell triggers `/admin/reload` once a third of
its requests are done and reports the requests that failed across the swap.

    .venv/bin/python -m bench.loadtest --bundle DIR [--requests N] [--seconds S] [--swap-to DIR]

The server and the client share this machine: figures are indicative, never assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
START = ("import sys; from model.service import serve; "
         "serve(sys.argv[1], port=int(sys.argv[2]), threads=int(sys.argv[3]))")
START_TIMEOUT = 180  # seconds for the server to load and warm the bundle


@dataclass
class Cell:
    """What one bounded run of load measured."""
    concurrency: int
    mode: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    bundles: set[str] = field(default_factory=set)

    def row(self) -> str:
        p50, p95, p99 = np.percentile(np.array(self.latencies) * 1000, [50, 95, 99]) \
            if self.latencies else (float("nan"),) * 3
        rate = len(self.latencies) / self.seconds if self.seconds else 0.0
        return (f"| {self.concurrency} | {self.mode} | {len(self.latencies)} | {self.errors} | "
                f"{rate:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} |")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(bundle: Path, token: str, threads: int = 0) -> Iterator[str]:
    """The service in a subprocess; its base URL once /ready answers; stopped on exit."""
    port = free_port()
    log = tempfile.TemporaryFile()
    env = {**os.environ, "RECSYS_ADMIN_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", START, str(bundle), str(port),
                                str(threads)], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_ready(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited:\n{log.read().decode(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {START_TIMEOUT} s")


async def load(url: str, users: list[str], cell: Cell, rank: bool, k: int, requests: int,
               seconds: float, during=None) -> Cell:
    """`cell.concurrency` clients share a budget of `requests` requests and `seconds`."""
    issued, deadline = 0, time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=cell.concurrency,
                          max_keepalive_connections=cell.concurrency)
    params = {"k": k, "rank": str(rank).lower()}

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            started = time.perf_counter()
            try:
                answer = await client.get(f"/users/{random.choice(users)}/recommendations",
                                          params=params)
                ok = answer.status_code == 200
                if ok and during is not None:  # only the swap cell reads who answered
                    cell.bundles.add(answer.json()["bundle"])
            except httpx.HTTPError:
                ok = False
            cell.latencies.append(time.perf_counter() - started)
            cell.errors += not ok

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for user in users[:20]:  # warm-up, not measured
            await client.get(f"/users/{user}/recommendations", params=params)
        started = time.perf_counter()
        extra = [during(client, lambda: issued, lambda: time.perf_counter() >= deadline)] \
            if during else []
        await asyncio.gather(*(client_loop(client) for _ in range(cell.concurrency)), *extra)
        cell.seconds = time.perf_counter() - started
    return cell


def reload_midway(target: Path, token: str, requests: int, report: dict):
    """A `during` task: POST /admin/reload once a third of the requests were issued."""
    async def task(client: httpx.AsyncClient, issued, over) -> None:
        while issued() < requests // 3 and not over():
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        answer = await client.post("/admin/reload", json={"bundle": str(target)},
                                   headers={"Authorization": f"Bearer {token}"}, timeout=300)
        report.update(status=answer.status_code, seconds=time.perf_counter() - started,
                      body=answer.json())
    return task


async def benchmark(args: argparse.Namespace, url: str, token: str) -> None:
    folder = args.bundle / "current" if (args.bundle / "current").is_dir() else args.bundle
    users = pd.read_parquet(folder / "users.parquet")["id"].astype(str).tolist()
    ready = httpx.get(f"{url}/ready").json()
    modes = [("recall", False)] + ([("recall + ranking", True)] if ready["ranker"] else [])
    print(f"bundle {ready['bundle']} ({args.bundle}); k={args.k}; at most {args.requests} "
          f"requests and {args.seconds:g} s per cell; server and client on this machine\n")
    print("| concurrency | mode | requests | errors | requests/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, rank in modes:
        for concurrency in args.concurrency:
            cell = await load(url, users, Cell(concurrency, mode), rank, args.k, args.requests,
                              args.seconds)
            print(cell.row(), flush=True)
    report: dict = {}
    swap = await load(url, users, Cell(8, "recall, reload midway"), False, args.k,
                      args.requests, args.seconds,
                      reload_midway(args.swap_to or args.bundle, token, args.requests, report))
    print(swap.row())
    detail = report.get("body", {}).get("detail") or report.get("body", {}).get("bundle")
    print(f"\nreload during load: HTTP {report.get('status', 'not sent')} in "
          f"{report.get('seconds', float('nan')):.2f} s ({detail}); {swap.errors} of "
          f"{len(swap.latencies)} requests failed across the swap; answers came from "
          f"{', '.join(sorted(swap.bundles)) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--requests", type=int, default=2000, help="Per cell (at most).")
    parser.add_argument("--seconds", type=float, default=30.0, help="Per cell (at most).")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")],
                        default=[1, 8, 32], help="Comma-separated client counts.")
    parser.add_argument("-k", "--k", type=int, default=20)
    parser.add_argument("--swap-to", type=Path, default=None,
                        help="Bundle the reload cell swaps to [default: --bundle again].")
    parser.add_argument("--server-threads", type=int, default=0,
                        help="The service's --threads (0: the libraries' default).")
    args = parser.parse_args()
    random.seed(0)
    token = secrets.token_hex(16)
    with running_server(args.bundle, token, args.server_threads) as url:
        asyncio.run(benchmark(args, url, token))


if __name__ == "__main__":
    main()
