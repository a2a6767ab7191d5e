"""Load test of ``segscope serve``: N concurrent clients for a bounded time, batching on and off.

Starts the server (``python -m segscope.cli serve``) on 127.0.0.1 in a subprocess for each mode,
waits for ``/healthz``, then runs ``--clients`` threads that POST the image in a loop for
``--duration`` seconds. Reports per mode: requests answered, errors (non-200), lost requests
(sent but never answered: connection errors and client timeouts), p50/p99 latency, throughput
and the server's mean batch size.

    python benchmarks/bench_serve.py --duration 20 --json bench_serve.json
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAX_DURATION_S = 120.0
MAX_CLIENTS = 64
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, batch_size: int, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "segscope.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
        "--port", str(port), "--batch-size", str(batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--queue-size", str(args.queue_size), "--timeout-s", str(args.timeout_s),
    ]
    if args.device:
        command += ["--device", args.device]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /healthz within {STARTUP_TIMEOUT_S:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(5)


def run_clients(url: str, image: bytes, clients: int, duration_s: float, timeout_s: float) -> dict[str, Any]:
    """``clients`` threads posting ``image`` until ``duration_s`` has passed; the counts and latencies."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lost = 0
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def client() -> None:
        nonlocal lost
        with httpx.Client(timeout=timeout_s) as session:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    response = session.post(url + "/v1/segment", content=image)
                except httpx.HTTPError:
                    with lock:
                        lost += 1
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code == 200:
                        latencies.append(elapsed)

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ok = statuses.get(200, 0)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "ok": ok,
        "errors": sum(count for status, count in statuses.items() if status != 200),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "lost": lost,
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "throughput_rps": round(ok / wall, 2),
        "wall_s": round(wall, 1),
    }


def bench_mode(args: argparse.Namespace, name: str, batch_size: int, image: bytes) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, batch_size, port)
    try:
        wait_healthy(url, server)
        httpx.post(url + "/v1/segment", content=image, timeout=args.timeout_s)  # warm-up, not counted
        figures = run_clients(url, image, args.clients, args.duration, args.timeout_s + 5)
        health = httpx.get(url + "/healthz", timeout=5).json()
        figures["mean_batch_size"] = health["mean_batch_size"]
    finally:
        stop_server(server)
    return {"mode": name, "batch_size": batch_size, **figures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--image", default=str(ROOT / "examples" / "shapes.png"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help=f"seconds per mode (at most {MAX_DURATION_S:.0f})")
    parser.add_argument("--batch-size", type=int, default=8, help="the batching-on mode's batch size")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--modes", default="on,off", help="on (batching), off (batch size 1), or both")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not 0 < args.duration <= MAX_DURATION_S or not 0 < args.clients <= MAX_CLIENTS:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:.0f}] and --clients in [1, {MAX_CLIENTS}]")
    image = Path(args.image).read_bytes()
    sizes = {"on": args.batch_size, "off": 1}
    rows = [bench_mode(args, mode, sizes[mode], image) for mode in args.modes.split(",")]
    print(f"{args.clients} clients, {args.duration:g} s per mode, model {args.model} on {args.device}")
    print(f"{'mode':<5} {'batch':>5} {'ok':>6} {'errors':>6} {'lost':>5} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'req/s':>7} {'mean batch':>10}")
    for row in rows:
        print(f"{row['mode']:<5} {row['batch_size']:>5} {row['ok']:>6} {row['errors']:>6} {row['lost']:>5} "
              f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row['throughput_rps']:>7} {row['mean_batch_size']:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"clients": args.clients, "duration_s": args.duration, "modes": rows}))
    return 0 if all(row["lost"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
