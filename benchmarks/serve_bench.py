"""Serving speed: `recfm serve` over HTTP against transformers' `generate` on the same weights.

Workloads (seeded, identical for every system):
- random: prompts of --input-len random text tokens, --output-len output tokens each (ignore_eos),
  --requests requests, sent over HTTP at concurrency 1, 16 and unbounded (all at once);
- mixed: prompt lengths uniform in [32, 256] and output lengths uniform in [32, 256], unbounded;
- recommendations: real MovieLens 100K histories (each test user's last 20 training items) to
  POST /v1/recommendations at concurrency 16 (only when the run's domain is MovieLens).

The client streams (`/v1/completions`, token-id prompts, stream_options.include_usage), so time to
first token (TTFT) and time per output token after it (TPOT) are measured per request at the client.
The server runs in its own process (`python -m recfm.cli serve`); its peak RSS comes from
/proc/PID/status. After it stops, the same weights are loaded here for the baselines:
`generate` one request at a time (on the first --hf-requests requests), and static batches of 16 and
64 padded on the left (for the mixed workload, a batch runs until its longest answer is done; only
the tokens each request asked for count).

    python benchmarks/serve_bench.py                       # the MovieLens run if cached, else --run
    python benchmarks/serve_bench.py --run runs/quickstart/run --requests 64

Prints a table and writes benchmarks/results/serve_bench.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write  # noqa: E402

DEFAULT_RUN = Path.home() / ".cache/recfm/bench/ml-100k/early-atomic-s0"
PEERS = ROOT.parent / "shared" / "peers" / "vllm-cpu"


# --- workloads -----------------------------------------------------------------------------------


def random_workload(vocab: tuple[int, int], n: int, input_len: int, output_len: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(*vocab) for _ in range(input_len)], "max_tokens": output_len} for _ in range(n)]


def mixed_workload(vocab: tuple[int, int], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    return [{"prompt": [rng.randrange(*vocab) for _ in range(rng.randint(32, 256))], "max_tokens": rng.randint(32, 256)}
            for _ in range(n)]


# --- the HTTP client -----------------------------------------------------------------------------


async def one_request(client, url: str, model: str, req: dict) -> dict:
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                if first is None:
                    first = time.perf_counter()
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": first - t0, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens, "latency": end - t0}


async def run_load(url: str, model: str, work: list[dict], concurrency: int) -> dict:
    import httpx

    limit = concurrency or len(work)
    sem = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=limit + 4)) as client:
        async def go(req):
            async with sem:
                return await one_request(client, url, model, req)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(go(r) for r in work))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
    def stats(key):
        xs = sorted(r[key] for r in results if r.get(key) is not None)
        if not xs:
            return {}
        return {"mean": statistics.fmean(xs), "median": statistics.median(xs), "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))]}

    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "req_s": len(results) / wall, "ttft_s": stats("ttft"), "tpot_s": stats("tpot"), "latency_s": stats("latency")}


async def run_recs(url: str, model: str, histories: list[list[str]], concurrency: int, extra: dict | None = None) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=None) as client:
        async def go(h):
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/recommendations", json={"model": model, "history": h, "k": 10, **(extra or {})})
                r.raise_for_status()
                return {"latency": time.perf_counter() - t0, "tokens": 0}

        t0 = time.perf_counter()
        res = await asyncio.gather(*(go(h) for h in histories))
        wall = time.perf_counter() - t0
    return summarize(res, wall)


def median_run(rs: list[dict]) -> dict:
    """Of repeated runs of one workload, the run with the median requests/s."""
    return sorted(rs, key=lambda r: r["req_s"])[len(rs) // 2]


# --- the server process --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command started in its own process; ready when GET /health answers 200."""

    def __init__(self, run: Path | None, extra: list[str], command: list[str] | None = None, timeout: float = 600,
                 port: int | None = None, env: dict | None = None):
        import httpx

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = command or [sys.executable, "-m", "recfm.cli", "serve", str(run), "--port", str(self.port), *extra]
        self.log = open(ROOT / "benchmarks/results/.server.log", "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError("the server did not come up:\n" + (ROOT / "benchmarks/results/.server.log").read_text()[-3000:])
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def vllm_bench_client(url: str, model: str, tokenizer_dir: Path, args) -> dict:
    """vLLM's own benchmark client (`vllm bench serve`, random 128/128, 64 prompts, unbounded) against
    a server; returns its result JSON, or the error it ended with."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(args.peer_venv) / "bin/python"), str(PEERS / "vllm_cli.py"), "bench", "serve", "--backend", "openai",
               "--base-url", url, "--endpoint", "/v1/completions", "--model", str(tokenizer_dir), "--served-model-name", model,
               "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
               str(args.output_len), "--ignore-eos", "--num-prompts", str(args.requests), "--request-rate", "inf",
               "--save-result", "--result-dir", out]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        files = list(Path(out).glob("*.json"))
        if r.returncode != 0 or not files:
            return {"ok": False, "error": (r.stdout + r.stderr)[-2000:]}
        res = json.loads(files[0].read_text())
        keep = ("completed", "total_output_tokens", "output_throughput", "request_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms")
        return {"ok": True, **{k: res.get(k) for k in keep}}


# --- transformers baselines ----------------------------------------------------------------------


def hf_one_at_a_time(model, work: list[dict]) -> dict:
    import torch

    results = []
    t0 = time.perf_counter()
    for req in work:
        ids = torch.tensor([req["prompt"]])
        s = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_tokens"],
                             min_new_tokens=req["max_tokens"], do_sample=False, pad_token_id=0)
        lat = time.perf_counter() - s
        results.append({"tokens": out.shape[1] - ids.shape[1], "latency": lat})
    return summarize(results, time.perf_counter() - t0)


def hf_static(model, work: list[dict], batch: int) -> dict:
    import torch

    results = []
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        chunk = work[i : i + batch]
        width = max(len(r["prompt"]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, width - len(r["prompt"]) :] = torch.tensor(r["prompt"])
            mask[b, width - len(r["prompt"]) :] = 1
        longest = max(r["max_tokens"] for r in chunk)
        s = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=0)
        lat = time.perf_counter() - s
        results += [{"tokens": r["max_tokens"], "latency": lat} for r in chunk]
    return summarize(results, time.perf_counter() - t0)


# --- main ----------------------------------------------------------------------------------------


def movielens_histories(run: Path, n: int) -> list[list[str]]:
    from recfm.data import leave_one_out
    from recfm.data.domain import Domain

    info = json.loads((run / "run.json").read_text())
    domain = Domain(info["domain"])
    if "movielens" not in json.dumps(domain.meta).lower():
        return []
    split = leave_one_out(domain)
    return [list(s["item_ids"][-20:]) for s in split.train.select(range(min(n, len(split.train))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN, help="a trained run folder")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", default="1,16,0", help="comma-separated; 0 = unbounded")
    ap.add_argument("--hf-requests", type=int, default=16, help="requests for one-at-a-time generate")
    ap.add_argument("--rec-requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="each number is the median run of this many")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights and KV cache for recfm serve and the generate baselines alike")
    ap.add_argument("--server-args", default="", help="extra arguments for recfm serve")
    ap.add_argument("--name", default="serve_bench")
    ap.add_argument("--quantizations", default="none", help="recfm serve runs, comma-separated --quantization values")
    ap.add_argument("--peer", choices=["vllm"], default=None, help="also run vLLM (CPU) on a Llama export of the same weights")
    ap.add_argument("--peer-venv", default=str(Path.home() / ".cache/recfm-peers/vllm-cpu"),
                    help="the virtualenv ../shared/peers/vllm-cpu/setup.sh made")
    ap.add_argument("--peer-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="vLLM's weights: bfloat16 through ../shared/peers/vllm-cpu/serve.sh as it is, or float32 "
                         "(the same launcher and environment with --dtype float32)")
    ap.add_argument("--no-mixed", action="store_true", help="skip the mixed-length workload")
    ap.add_argument("--recommendations-only", type=float, nargs="+", default=None, metavar="W",
                    help="only the recommendations workload, once per id_view_weight W (0: the prompt alone; "
                         "above 0: the prompt fused with the identifier view, two engine requests each)")
    ap.add_argument("--startup-only", type=int, default=0, metavar="N",
                    help="only start `recfm serve` N times and report the start-up time (until /health answers)")
    args = ap.parse_args()
    if not (args.run / "config.json").exists():
        sys.exit(f"{args.run} is not a run folder; train one (recfm quickstart) and pass --run")

    if args.startup_only:
        return startup_only(args)
    if args.recommendations_only:
        return recommendations_only(args)
    from recfm.tokenizers.text import load_text_tokenizer

    tok = load_text_tokenizer(args.run)
    vocab = (32, tok.vocab_size)  # plain BPE tokens, no special or item tokens
    rand = random_workload(vocab, args.requests, args.input_len, args.output_len, args.seed)
    mixed = mixed_workload(vocab, args.requests, args.seed)
    conc = [int(c) for c in args.concurrency.split(",")]
    rows, data = [], {"settings": vars(args) | {"run": str(args.run)}, "machine": machine(), "results": {}}

    runs: dict[str, list[dict]] = {}

    def record(key: str, r: dict) -> None:
        runs.setdefault(key, []).append(r)
        print(f"{key:>45}: {r['output_tok_s']:8.1f} tok/s  {r['req_s']:6.2f} req/s", flush=True)

    import torch

    import recfm.foundation  # noqa: F401
    from recfm.foundation import RecFMForCausalLM

    histories = movielens_histories(args.run, args.rec_requests)
    startups, peaks, peer_startups, peer_peaks = [], [], [], []
    export = None
    if args.peer == "vllm":
        from recfm.foundation.export import export_text_model

        export = Path.home() / ".cache/recfm/bench/export" / args.run.name
        if not (export / "config.json").exists():
            export_text_model(args.run, export)
    for rep in range(args.repeats):  # each repeat: the server, then the baselines, so drift hits both alike
        print(f"--- repeat {rep + 1}/{args.repeats}", flush=True)
        for q in args.quantizations.split(","):
            label = "recfm serve" + ("" if q == "none" else f" {q}")
            server = ServerProcess(args.run, [*args.server_args.split(), "--dtype", args.dtype, "--quantization", q])
            startups.append(server.startup_s)
            print(f"{label} started in {server.startup_s:.1f} s", flush=True)
            try:
                asyncio.run(run_load(server.url, server.model, rand[:4], 4))  # warm-up
                for c in conc:
                    record(f"{label}|random|{c or 'unbounded'}", asyncio.run(run_load(server.url, server.model, rand, c)))
                if not args.no_mixed:
                    record(f"{label}|mixed|16", asyncio.run(run_load(server.url, server.model, mixed, 16)))
                    record(f"{label}|mixed|unbounded", asyncio.run(run_load(server.url, server.model, mixed, 0)))
                if histories and q == "none":
                    record("recfm serve|recommendations|16", asyncio.run(run_recs(server.url, server.model, histories, 16)))
                if q == "none":
                    peaks.append(server.peak_rss_mib())
                if args.peer == "vllm" and rep == args.repeats - 1 and q == "none":
                    data["vllm_bench_client_on_recfm"] = vllm_bench_client(server.url, server.model, export, args)
            finally:
                server.stop()
        if args.peer == "vllm":
            port = free_port()
            peer = ServerProcess(None, [], command=vllm_command(export, port, args), timeout=900, port=port,
                                 env=vllm_env(args))
            peer_startups.append(peer.startup_s)
            print(f"vLLM started in {peer.startup_s:.1f} s", flush=True)
            try:
                asyncio.run(run_load(peer.url, peer.model, rand[:4], 4))
                for c in conc:
                    record(f"vLLM|random|{c or 'unbounded'}", asyncio.run(run_load(peer.url, peer.model, rand, c)))
                if not args.no_mixed:
                    record("vLLM|mixed|16", asyncio.run(run_load(peer.url, peer.model, mixed, 16)))
                    record("vLLM|mixed|unbounded", asyncio.run(run_load(peer.url, peer.model, mixed, 0)))
                peer_peaks.append(peer.peak_rss_mib())
                if rep == args.repeats - 1:
                    data["vllm_bench_client_on_vllm"] = vllm_bench_client(peer.url, peer.model, export, args)
            finally:
                peer.stop()
        # transformers generate on the same weights, in this process (the server has stopped)
        model = RecFMForCausalLM.from_pretrained(args.run, dtype=getattr(torch, args.dtype)).eval()
        with torch.no_grad():
            model.generate(input_ids=torch.tensor([rand[0]["prompt"][:8]]), max_new_tokens=2, pad_token_id=0)  # warm-up
            record("generate one-at-a-time|random|1", hf_one_at_a_time(model, rand[: args.hf_requests]))
            for b in (16, 64):
                record(f"generate static batch {b}|random|{b}", hf_static(model, rand, b))
                if not args.no_mixed:
                    record(f"generate static batch {b}|mixed|{b}", hf_static(model, mixed, b))
        del model

    data["server"] = {"startup_s": statistics.median(startups), "peak_rss_mib": max(peaks) if peaks else float("nan")}
    if peer_startups:
        data["vllm"] = {"startup_s": statistics.median(peer_startups), "peak_rss_mib": max(peer_peaks)}
    for key, rs in runs.items():
        r = median_run(rs) | {"repeats_output_tok_s": [x["output_tok_s"] for x in rs]}
        data["results"][key] = r
        system, workload, c = key.split("|")
        if workload == "recommendations":
            continue
        rows.append([system, workload, c, r["requests"], r["output_tok_s"], r["req_s"],
                     r["ttft_s"]["mean"] * 1e3 if r["ttft_s"] else "n/a", r["ttft_s"]["p99"] * 1e3 if r["ttft_s"] else "n/a",
                     r["tpot_s"]["mean"] * 1e3 if r["tpot_s"] else "n/a", r["latency_s"]["median"]])

    res = data["results"]
    base = res["generate one-at-a-time|random|1"]["output_tok_s"]
    ratios = {k: v["output_tok_s"] / base for k, v in res.items() if v["output_tokens"]}
    data["ratio_to_one_at_a_time"] = ratios
    header = ["system", "workload", "concurrency", "requests", "output tok/s", "req/s", "TTFT mean ms", "TTFT p99 ms",
              "TPOT mean ms", "latency median s"]
    md = [f"# Serving speed ({args.run.name}, {time.strftime('%Y-%m-%d')})", "",
          f"Machine: {data['machine']['cpu']}, {data['machine']['cpu_count']} cores, torch {data['machine']['torch']} "
          f"({data['machine']['torch_cpu_capability']}), {data['machine']['torch_threads']} threads. {'fp32' if args.dtype == 'float32' else 'bf16'} weights and KV cache "
          "(recfm serve and generate alike).",
          f"Random workload: {args.requests} requests, {args.input_len} prompt tokens, {args.output_len} output tokens "
          f"(ignore_eos); mixed: prompts 32-256, outputs 32-256 tokens. One-at-a-time generate ran the first "
          f"{args.hf_requests} requests. Each row is the median of {args.repeats} runs (server and baselines alternate). "
          f"recfm serve started in {data['server']['startup_s']:.1f} s, peak RSS "
          f"{data['server']['peak_rss_mib']:.0f} MiB.", "", markdown_table(header, rows), "",
          "Output tokens/s as a multiple of one-at-a-time generate:", ""]
    md += [f"- {k.replace('|', ' / ')}: {v:.1f}x" for k, v in ratios.items()]
    if "vllm" in data:
        md += ["", f"vLLM (vllm-cpu 0.32.0, {args.peer_dtype}, launched as ../shared/peers/vllm-cpu/serve.sh does) on `recfm export llama` of the "
               f"same weights started in {data['vllm']['startup_s']:.0f} s (recfm serve: {data['server']['startup_s']:.1f} s). "
               "recfm output tokens/s as a multiple of vLLM's, and TTFT as a multiple of vLLM's:", ""]
        vs = {}
        for k, v in res.items():
            system, workload, c = k.split("|")
            peer = res.get(f"vLLM|{workload}|{c}")
            if system.startswith("recfm serve") and peer and v["output_tokens"]:
                vs[k] = {"tok_s": v["output_tok_s"] / peer["output_tok_s"], "ttft": v["ttft_s"]["mean"] / peer["ttft_s"]["mean"]}
                md.append(f"- {k.replace('|', ' / ')}: {vs[k]['tok_s']:.2f}x tokens/s, {vs[k]['ttft']:.2f}x TTFT")
        data["ratio_to_vllm"] = vs
        for who in ("recfm", "vllm"):
            b = data.get(f"vllm_bench_client_on_{who}")
            if b:
                md.append(f"- `vllm bench serve` against {who}: " + (
                    f"{b['completed']} requests, {b['output_throughput']:.0f} output tok/s, TTFT mean {b['mean_ttft_ms']:.0f} ms, "
                    f"TPOT mean {b['mean_tpot_ms']:.1f} ms" if b["ok"] else f"failed: {b['error'][-300:]}"))
    if "recfm serve|recommendations|16" in res:
        r = res["recfm serve|recommendations|16"]
        md += ["", f"Recommendations (real MovieLens histories of 20 items, full ranking over the catalogue, concurrency 16): "
               f"{r['req_s']:.1f} req/s, latency median {r['latency_s']['median'] * 1e3:.0f} ms, p99 {r['latency_s']['p99'] * 1e3:.0f} ms."]
    path = write(args.name, "\n".join(md), data)
    plot(data, path.with_suffix(".png"))
    print("\n".join(md))


def vllm_command(export: Path, port: int, args) -> list[str]:
    """serve.sh as it is for bf16; for fp32 the same launcher with --dtype float32 (serve.sh pins bf16)."""
    if args.peer_dtype == "bfloat16":
        return ["bash", str(PEERS / "serve.sh"), str(export), str(port), args.peer_venv]
    return [str(Path(args.peer_venv) / "bin/python"), str(PEERS / "vllm_cli.py"), "serve", str(export), "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]


def vllm_env(args) -> dict:
    """The environment serve.sh sets (used when vLLM is started without it)."""
    if args.peer_dtype == "bfloat16":
        return {}
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
    iomp = Path(args.peer_venv) / "lib/libiomp5.so"
    if iomp.exists():
        env["LD_PRELOAD"] += f":{iomp}"
    return env


def startup_only(args) -> None:
    """Start and stop `recfm serve` N times; report each start-up (process start to /health 200)."""
    times = []
    for i in range(args.startup_only):
        server = ServerProcess(args.run, args.server_args.split())
        times.append(server.startup_s)
        server.stop()
        print(f"start {i + 1}/{args.startup_only}: {server.startup_s:.2f} s", flush=True)
    data = {"settings": vars(args) | {"run": str(args.run)}, "machine": machine(), "startup_s": times,
            "median_s": statistics.median(times)}
    md = [f"# recfm serve start-up ({args.run.name}, {time.strftime('%Y-%m-%d')})", "",
          f"Machine: {data['machine']['cpu']}, {data['machine']['cpu_count']} cores, torch {data['machine']['torch']}. "
          f"From process start to the first 200 from /health (imports, weights, catalogue, KV-cache allocation), "
          f"{args.startup_only} starts, extra arguments `{args.server_args}`.", "",
          markdown_table(["start", "seconds"], [[i + 1, t] for i, t in enumerate(times)]), "",
          f"Median {data['median_s']:.2f} s, min {min(times):.2f} s, max {max(times):.2f} s."]
    write(args.name, "\n".join(md), data)
    print("\n".join(md))


def recommendations_only(args) -> None:
    """POST /v1/recommendations at concurrency 16 with each asked id_view_weight, the weights
    alternating within each repeat; the median run of each."""
    histories = movielens_histories(args.run, args.rec_requests)
    if not histories:
        sys.exit(f"{args.run} was not trained on MovieLens: the recommendations workload reads its histories")
    runs: dict[float, list[dict]] = {}
    server = ServerProcess(args.run, [*args.server_args.split(), "--dtype", args.dtype])
    try:
        asyncio.run(run_recs(server.url, server.model, histories[:16], 16))  # warm-up
        for rep in range(args.repeats):
            for w in args.recommendations_only:
                r = asyncio.run(run_recs(server.url, server.model, histories, 16, {"id_view_weight": w}))
                runs.setdefault(w, []).append(r)
                print(f"repeat {rep + 1}/{args.repeats}, id_view_weight {w:g}: {r['req_s']:.2f} req/s", flush=True)
        peak = server.peak_rss_mib()
    finally:
        server.stop()
    res = {f"{w:g}": median_run(rs) for w, rs in runs.items()}
    base = res.get("0")
    rows = [[w, r["requests"], r["req_s"], r["latency_s"]["median"] * 1e3, r["latency_s"]["p99"] * 1e3,
             r["req_s"] / base["req_s"] if base else float("nan")] for w, r in res.items()]
    data = {"settings": vars(args) | {"run": str(args.run)}, "machine": machine(), "results": res,
            "server": {"startup_s": server.startup_s, "peak_rss_mib": peak}}
    md = [f"# Recommendations with and without the identifier view ({args.run.name}, {time.strftime('%Y-%m-%d')})", "",
          f"Machine: {data['machine']['cpu']}, {data['machine']['cpu_count']} cores, torch {data['machine']['torch']}. "
          f"`recfm serve` ({'fp32' if args.dtype == 'float32' else 'bf16'}), POST /v1/recommendations at concurrency 16, "
          f"{len(histories)} real MovieLens histories (each user's last 20 training items), k 10, full ranking over the "
          f"catalogue. id_view_weight 0 asks the prompt alone (one engine request); above 0 the server also asks the "
          f"identifier view of the same history and fuses the two (two engine requests). Each row is the median of "
          f"{args.repeats} runs, the weights alternating within each. Server arguments: `{args.server_args or 'none'}` "
          "(with prefix caching on, a repeat finds the previous repeat's prompts cached; `--no-prefix-caching` "
          "measures the computation).", "",
          markdown_table(["id_view_weight", "requests", "req/s", "latency median ms", "latency p99 ms", "req/s vs weight 0"], rows)]
    write(args.name, "\n".join(md), data)
    print("\n".join(md))


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k.replace("|", "\n"), v["output_tok_s"]) for k, v in data["results"].items() if v.get("output_tokens")]
    fig, ax = plt.subplots(figsize=(max(6, len(items) * 1.1), 4))
    ax.bar(range(len(items)), [v for _, v in items], color=["tab:blue" if k.startswith("recfm") else "tab:gray" for k, _ in items])
    ax.set_xticks(range(len(items)), [k for k, _ in items], fontsize=6)
    ax.set_ylabel("output tokens / s")
    ax.set_title("recfm serve vs transformers generate (same weights, same machine)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
