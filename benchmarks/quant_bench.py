"""Quantized inference: size, memory, speed and quality of every `--quantization` option.

For each run (a `small` model trained on MovieLens 100K with posters, and the quickstart's model on
the default domain) and each option, a fresh process loads the run with that option and reports:

- weight bytes as stored (and as a fraction of fp32), and the process's peak RSS;
- output tokens/s through the engine for 1 request and for 16 concurrent requests (random 128-token
  prompts, 64 output tokens each, ignore_eos);
- NDCG@10 / HR@10 of next-item prediction (leave-one-out test, full ranking, history masked, the
  first --users test users (default: all), seen template) through `recfm eval`'s code path, with a
  paired sign-flip test of each user's NDCG@10 against the fp32 model's;
- ROUGE-L of explanation generation on the first --text-users test users (default domain;
  MovieLens 100K has no review text);
- the fraction of greedy answers (24 tokens, next-item and explanation prompts of the test users)
  token-identical to the unquantized model's.

    python benchmarks/quant_bench.py --runs ~/.cache/recfm/bench/ml-100k/early-atomic-s0 runs/quickstart/run

Writes benchmarks/results/quant_bench.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write  # noqa: E402

from recfm.eval.metrics import ndcg_per_user, paired_test  # noqa: E402


def measure(run: str, option: str, users: int, text_users: int, out: str) -> None:
    """One option, in this (fresh) process; writes a JSON line to `out`. users = 0: size, memory,
    speed and greedy agreement only (no ranking/ROUGE evaluation)."""

    from recfm.data import leave_one_out, load_domain
    from recfm.eval.runner import evaluate
    from recfm.instructions.examples import build_eval_examples
    from recfm.serving import EngineConfig, Prompt, SamplingParams, Service
    from recfm.serving.quantization import weight_bytes

    res: dict = {"run": run, "option": option}
    svc = Service(run, engine_config=EngineConfig(kv_cache_bytes=128 * 2**20), quantization=option)
    res["weight_bytes"] = weight_bytes(svc.model)
    eng = svc.engine
    rng = random.Random(0)
    vocab = svc.tok.text.vocab_size
    prompts = [Prompt([rng.randrange(32, vocab) for _ in range(128)]) for _ in range(16)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    eng.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    for n in (1, 16):
        speeds = []
        for _ in range(3):  # median of 3: single runs drift by +-30 % on the benchmark machine
            t0 = time.perf_counter()
            eng.generate(prompts[:n], params)
            speeds.append(n * 64 / (time.perf_counter() - t0))
        res[f"tok_s_{n}"] = sorted(speeds)[1]
    # greedy answers on real prompts
    domain = load_domain(svc.domain.path)
    split = leave_one_out(domain)
    rows = [r for r in build_eval_examples(domain, split, stage="test", seed=0, max_users=12,
                                           tasks=("next_item", "explanation"))
            if r["template_id"] in ("next-1", "expl-1")]
    prompts = [svc.prompt(json.loads(r["messages"])[:1])[0] for r in rows]
    res["greedy"] = [o[0] for o in eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0))]
    del svc, eng
    if users == 0:
        return _finish(res, out)
    report = evaluate(run, domain.path, tasks=["next_item"], max_users=users, seed=0, progress=False, quantization=option)
    seen = report["tasks"]["next_item"]["seen"]
    res["ndcg@10"], res["hr@10"], res["users"] = seen["ndcg@10"], seen["hr@10"], report["users"]
    res["ranks"] = [int(r["rank"]) for r in report["per_example"]["next_item"] if not r["held_out"]]
    if any(r["task"] == "explanation" for r in rows):
        report = evaluate(run, domain.path, tasks=["explanation"], max_users=text_users, seed=0, progress=False,
                          quantization=option)
        res["rougeL"] = report["tasks"]["explanation"]["seen"]["rougeL"]
    _finish(res, out)


def _finish(res: dict, out: str) -> None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            res["peak_rss_mib"] = int(line.split()[1]) / 1024
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path,
                    default=[Path.home() / ".cache/recfm/bench/ml-100k/early-atomic-s0", ROOT / "runs/quickstart/run"])
    ap.add_argument("--options", default="none,bf16,int8,nf4,fp4")
    ap.add_argument("--users", type=int, default=100_000, help="test users for NDCG/HR (default: all)")
    ap.add_argument("--text-users", type=int, default=150, help="test users for explanation ROUGE-L")
    ap.add_argument("--no-quality", default="bf16", help="options measured without the NDCG/ROUGE evaluation (bf16: "
                    "emulated on CPUs without bf16 units, its batched evaluation takes ~10x longer)")
    ap.add_argument("--name", default="quant_bench", help="result file stem")
    ap.add_argument("--measure", nargs=5, metavar=("RUN", "OPTION", "USERS", "TEXT_USERS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        run, option, users, text_users, out = args.measure
        measure(run, option, int(users), int(text_users), out)
        return
    from recfm.serving.quantization import QuantizationError, check

    options = []
    for o in args.options.split(","):
        try:
            check(o)
            options.append(o)
        except QuantizationError as e:
            print(f"skipping {o}: {e}")
    tmp = ROOT / f"benchmarks/results/.{args.name}.jsonl"
    tmp.unlink(missing_ok=True)
    runs = [r for r in args.runs if (r / "config.json").exists()]
    for run in runs:
        for o in options:
            print(f"{run.name} {o} ...", flush=True)
            users = 0 if o in args.no_quality.split(",") else args.users
            subprocess.run([sys.executable, __file__, "--measure", str(run), o, str(users), str(args.text_users), str(tmp)],
                           check=True)
    results = [json.loads(line) for line in tmp.read_text().splitlines()]
    tmp.unlink()
    rows = []
    for run in runs:
        base = next(r for r in results if r["run"] == str(run) and r["option"] == "none")
        for r in (r for r in results if r["run"] == str(run)):
            same = sum(a == b for a, b in zip(r["greedy"], base["greedy"])) / len(base["greedy"])
            r["greedy_identical"] = same
            r["weight_fraction"] = r["weight_bytes"] / base["weight_bytes"]
            r["ndcg_rel_change"] = r["ndcg@10"] / base["ndcg@10"] - 1 if "ndcg@10" in r and base["ndcg@10"] else float("nan")
            r["ndcg_paired"] = (paired_test(ndcg_per_user(r["ranks"]), ndcg_per_user(base["ranks"]))
                                if "ranks" in r and "ranks" in base else None)
            r["tok_s_1_vs_fp32"] = r["tok_s_1"] / base["tok_s_1"]
            rows.append([run.name, r["option"], r["weight_bytes"] / 2**20, r["weight_fraction"], r["peak_rss_mib"],
                         r["tok_s_1"], r["tok_s_1_vs_fp32"], r["tok_s_16"], r.get("ndcg@10", "not run"),
                         r["ndcg_rel_change"] * 100, r["ndcg_paired"]["p_value"] if r["ndcg_paired"] else "n/a",
                         r.get("hr@10", "not run"), r.get("rougeL", "n/a"), same])
    header = ["run", "weights", "weight MiB", "of fp32", "peak RSS MiB", "tok/s batch 1", "vs fp32", "tok/s 16 concurrent",
              "NDCG@10", "NDCG change %", "paired p", "HR@10", "ROUGE-L", "greedy identical"]
    n_users = {r["run"]: r.get("users") for r in results if r["option"] == "none"}
    m = machine()
    md = [f"# Quantized inference ({time.strftime('%Y-%m-%d')})", "",
          f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_cpu_capability']}). Speed: random "
          f"128-token prompts, 64 output tokens, through the engine, median of 3. Quality: leave-one-out test, "
          f"{', '.join(f'{Path(k).name}: {v} users' for k, v in n_users.items())}, seen template, full ranking with the "
          "history masked; paired p: sign-flip test of per-user NDCG@10 against fp32 (10,000 resamples, seed 0); ROUGE-L "
          f"on the first {args.text_users} users. Greedy identical: share of 24-token greedy answers "
          "(next-item and explanation prompts) equal to the fp32 model's. int8 = weight-only int8 (one scale per output "
          "row, fp32 activations, recfm's kernel up to 32 rows) for every linear layer in the decoder, output head, "
          "vision tower and projector, token embeddings as int8 rows; nf4/fp4 = bitsandbytes 4-bit decoder linear layers except the first layer's "
          "attention projections (int8), 4-bit embedding rows, the rest as for int8; norms and the vision tower's patch/position embeddings stay fp32.",
          "", markdown_table(header, rows), "",
          "Targets: int8 <= 30 % of fp32 weight bytes with <= 1 % relative NDCG@10 loss; 4-bit <= 18 % with <= 3 %; "
          "neither slower than fp32 at batch 1."]
    path = write(args.name, "\n".join(md), {"machine": m, "settings": {"users": args.users, "text_users": args.text_users,
                                                                        "options": options, "no_quality": args.no_quality},
                                                "results": results})
    plot(results, runs, path.with_suffix(".png"))
    print("\n".join(md))


def plot(results, runs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for run in runs:
        rs = [r for r in results if r["run"] == str(run)]
        names = [r["option"] for r in rs]
        axes[0].plot(names, [r["weight_fraction"] for r in rs], "o-", label=run.name)
        axes[1].plot(names, [r["tok_s_1"] for r in rs], "o-", label=f"{run.name} batch 1")
        axes[1].plot(names, [r["tok_s_16"] for r in rs], "s--", label=f"{run.name} 16 concurrent")
        q = [r for r in rs if "ndcg@10" in r]
        axes[2].plot([r["option"] for r in q], [r["ndcg@10"] for r in q], "o-", label=run.name)
    axes[0].set_title("weight bytes / fp32")
    axes[1].set_title("output tokens/s")
    axes[2].set_title("NDCG@10")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
