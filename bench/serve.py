"""Benchmark: `qprompt serve` under load, batched against one request at a time.

Two servers of the same export run on loopback, one per serving mode (--max-batch 16: batched;
--max-batch 1: one request at a time); for each load level, one and then the other gets 1, 4, 16
or 64 concurrent clients, each sending --requests-per-client requests back to back (a closed
loop). Every request is a real Rotten Tomatoes review in the export's template, greedy, with
--max-tokens new tokens; it counts as an error unless it returns 200 with a completion. Reports
requests/s, generated tokens/s, p50/p95 latency, errors, and each server's resident memory before
and after the load. Bounded: a level stops sending after --level-timeout seconds.

    python bench/serve.py --export EXPORT_DIR [--max-tokens 16] [--requests-per-client 2]
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes" / "test.jsonl"
LEVELS = (1, 4, 16, 64)
MODES = {"batched": 16, "one-at-a-time": 1}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def post(port: int, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def start(export: str, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, str(ROOT / "cli.py"), "serve", export, "--port", "0", "--max-batch", str(max_batch),
               "--log-level", "warning"] + (["--threads", str(threads)] if threads else [])
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    banner = server.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
    if not match:
        server.kill()
        raise click.ClickException(f"the server did not start: {banner}{server.stderr.read()[-2000:]}")
    port = int(match.group(1))
    for _ in range(300):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise click.ClickException("the server did not answer /health")


def load(port: int, prompts: list[str], clients: int, per_client: int, max_tokens: int, timeout: float) -> dict:
    """`clients` threads, each sending `per_client` requests one after another."""
    deadline = time.perf_counter() + timeout
    latencies, tokens, errors = [], 0, 0

    def client(c: int):
        nonlocal tokens, errors
        for k in range(per_client):
            if time.perf_counter() > deadline:
                return
            text = prompts[(c * per_client + k) % len(prompts)]
            start = time.perf_counter()
            try:
                status, body = post(port, {"prompt": text, "max_tokens": max_tokens})
            except OSError:
                status, body = 0, {}
            if status == 200 and body.get("choices"):
                latencies.append(time.perf_counter() - start)
                tokens += body["usage"]["completion_tokens"]
            else:
                errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None}


@click.command()
@click.option("--export", "export_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="An export folder (a classification or generation recipe's).")
@click.option("--max-tokens", default=16, show_default=True, help="New tokens per request (greedy).")
@click.option("--requests-per-client", default=2, show_default=True, help="Requests each client sends in turn.")
@click.option("--levels", default=",".join(map(str, LEVELS)), show_default=True, help="Concurrent clients.")
@click.option("--level-timeout", default=300.0, show_default=True, help="Seconds before a level stops sending.")
@click.option("--threads", type=int, default=None, help="The server's ONNX Runtime threads [default: all cores].")
@click.option("--data", default=str(DATA), show_default=True, help="Rows whose `text` the requests send.")
@click.option("--out", "json_out", default=str(ROOT / "bench" / "results" / "serve.json"), show_default=True)
def main(export_dir, max_tokens, requests_per_client, levels, level_timeout, threads, data, json_out):
    sys.path.insert(0, str(ROOT))
    from qprompt.data import read_rows

    prompts = [r["text"] for r in read_rows(data)[:256]]
    results = {"command": " ".join(sys.argv), "export": Path(export_dir).name, "max_tokens": max_tokens,
               "requests_per_client": requests_per_client, "modes": {}}
    # Both servers run from the start, and each level loads one, then the other: a slower stretch of this shared
    # machine hits both modes alike instead of whichever ran second.
    servers = {mode: start(export_dir, max_batch, threads) for mode, max_batch in MODES.items()}
    try:
        for mode, (server, port) in servers.items():
            post(port, {"prompt": prompts[0], "max_tokens": 2})  # warm-up: first-call allocations
            results["modes"][mode] = {"max_batch": MODES[mode], "rss_mb_before": rss_mb(server.pid), "levels": []}
        for clients in map(int, levels.split(",")):
            for mode, (_, port) in servers.items():
                row = load(port, prompts, clients, requests_per_client, max_tokens, level_timeout)
                results["modes"][mode]["levels"].append(row)
                click.echo(f"{mode:>14} {clients:>3} clients: {row['requests_per_s']:6.2f} req/s "
                           f"{row['tokens_per_s']:7.1f} tok/s  p50 {row['p50_s']} s  p95 {row['p95_s']} s  "
                           f"errors {row['errors']}", err=True)
        for mode, (server, port) in servers.items():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/metrics")
            results["modes"][mode]["server_metrics"] = json.loads(conn.getresponse().read())
            results["modes"][mode]["rss_mb_after"] = rss_mb(server.pid)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=30)
    show(results)
    from machine import describe

    results["machine"] = describe()
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(results, indent=1) + "\n")
    click.echo(f"wrote {json_out}")


def show(results: dict) -> None:
    click.echo(f"\n{results['export']}: {results['max_tokens']} new tokens per request, "
               f"{results['requests_per_client']} requests per client")
    click.echo("| mode | clients | requests | errors | req/s | tokens/s | p50 s | p95 s |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for mode, data in results["modes"].items():
        for r in data["levels"]:
            click.echo(f"| {mode} | {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']} | "
                       f"{r['tokens_per_s']} | {r['p50_s']} | {r['p95_s']} |")
    for mode, data in results["modes"].items():
        m = data["server_metrics"]
        click.echo(f"{mode}: server RSS {data['rss_mb_before']} MB before, {data['rss_mb_after']} MB after; "
                   f"{m['forward_passes']} forward passes, {m['mean_pass_rows']} rows per pass on average, "
                   f"largest {m['largest_pass_rows']}")


if __name__ == "__main__":
    main()
