#!/usr/bin/env python3
"""Load generator for OpenAI-compatible chat servers (persona-gate serve, llama-server).

Each of C clients sends R chat requests one after another (greedy, exactly max_tokens new
tokens each via ignore_eos, prompts from a fixed list), for every C given; prints one JSON line per concurrency level: wall time,
generated tokens per second (usage.completion_tokens summed over all requests / wall time),
requests per second and request latency (p50, p90, max). With --steer DIRECTION each client
steers with its own intervention (a different coefficient and layer per client), which only
persona-gate understands. Standard library only, so the same generator drives both servers.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

PROMPTS = [
    "Give me three tips for staying healthy.",
    "Describe the water cycle in a few sentences.",
    "Write a short poem about the sea.",
    "Explain what a binary search does.",
    "What are the primary colours?",
    "Suggest a name for a pet turtle and say why.",
    "How do airplanes stay in the air?",
    "List four uses of a paperclip.",
]


def request(url, body):
    u = urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    data = json.dumps(body)
    c.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read()
    c.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {text[:200]!r}")
    return json.loads(text)


def run_level(args, clients):
    lat, toks, errors = [], [], []
    lock = threading.Lock()

    def client(i):
        for k in range(args.requests):
            body = {
                "model": args.model,
                "messages": [{"role": "user", "content": PROMPTS[(i * args.requests + k) % len(PROMPTS)]}],
                "temperature": 0,
                "max_tokens": args.max_tokens,
                # Every request generates exactly max_tokens on both servers (llama-server's
                # field, which persona-gate also reads), so steering that changes completion
                # lengths does not change the work.
                "ignore_eos": True,
            }
            if args.steer:
                layer = args.layers[i % len(args.layers)]
                coef = 0.5 + 0.25 * (i % 4)
                body["steering"] = [{"direction": args.steer, "op": "add", "layers": layer,
                                     "coefficient": coef, "scale": "resid"}]
            t0 = time.perf_counter()
            try:
                v = request(args.url, body)
            except Exception as e:  # noqa: BLE001 - report every failure
                with lock:
                    errors.append(str(e))
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                toks.append(v["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
    return {
        "label": args.label,
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "wall_s": round(wall, 2),
        "tokens": sum(toks),
        "tok_per_s": round(sum(toks) / wall, 1),
        "req_per_s": round(len(lat) / wall, 2),
        "latency_p50_s": round(q(0.5), 2),
        "latency_p90_s": round(q(0.9), 2),
        "latency_max_s": round(lat[-1], 2) if lat else None,
        "mean_tokens": round(statistics.mean(toks), 1) if toks else 0,
        "first_error": errors[0] if errors else None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--model", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steer", help="direction name: each client steers with its own intervention")
    p.add_argument("--layers", default="8,10,12,14", help="layers the clients' steering cycles through")
    args = p.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    # One warm-up request (page cache, first-call allocations).
    request(args.url, {"model": args.model, "messages": [{"role": "user", "content": "Hi"}],
                       "temperature": 0, "max_tokens": 4})
    for c in [int(x) for x in args.clients.split(",")]:
        print(json.dumps(run_level(args, c)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
