"""Decode attention in the engine: the native kernel (read in place from the paged KV cache) against
gathered blocks + SDPA, same engine, same weights, same process, alternating.

The engine runs in this process (no HTTP), all requests added at once, `max_num_seqs` 16 and 64, the
serve benchmark's random workload (128 prompt tokens, 128 output tokens with ignore_eos, 64 requests)
and its mixed one (prompts and outputs 32-256 tokens). Each number is the median of --repeats runs;
the two attention paths alternate run by run so drift on a shared machine hits both. Greedy answers
of the two are compared token for token.

    python benchmarks/attention_bench.py [--run RUN] [--repeats 3]

Prints a table and writes benchmarks/results/attention_bench.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write  # noqa: E402
from serve_bench import DEFAULT_RUN, mixed_workload, random_workload  # noqa: E402


def run_once(model, tok, work, max_seqs: int, native: bool) -> tuple[float, list[list[int]]]:
    from recfm.serving.engine import Engine, EngineConfig
    from recfm.serving.sequence import Prompt, SamplingParams

    eng = Engine(model, tok, EngineConfig(max_num_seqs=max_seqs, native_attention=native))
    assert (eng.runner.native is not None) == native, "the native kernel did not load"
    for k, r in enumerate(work):
        eng.add_request(str(k), Prompt(r["prompt"]),
                        SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
    wall = time.perf_counter() - t0
    tokens = sum(len(v) for v in outs.values())
    return tokens / wall, [outs[str(k)] for k in range(len(work))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16 (weights and KV cache)")
    ap.add_argument("--name", default="attention_bench")
    args = ap.parse_args()

    import torch

    from recfm.foundation import RecFMForCausalLM
    from recfm.serving import native
    from recfm.tokenizers.text import load_text_tokenizer

    if native.paged_decode() is None:
        raise SystemExit(f"the native kernel could not be built: {native.error()}")
    dtypes = args.dtypes.split(",")
    models = {dt: RecFMForCausalLM.from_pretrained(args.run, dtype=getattr(torch, dt)).eval() for dt in dtypes}
    tok = load_text_tokenizer(args.run)
    vocab = (32, tok.vocab_size)  # plain BPE tokens, as serve_bench
    workloads = {"random": random_workload(vocab, args.requests, 128, 128, 0), "mixed": mixed_workload(vocab, args.requests, 0)}
    configs = [(dt, nat) for dt in dtypes for nat in (False, True)]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    label = {c: f"{short[c[0]]} {'native' if c[1] else 'gather+SDPA'}" for c in configs}
    rows, data = [], []
    for wname, work in workloads.items():
        for max_seqs in (16, 64):
            speeds: dict = {c: [] for c in configs}
            answers = {}
            for rep in range(args.repeats):
                for c in (configs if rep % 2 == 0 else configs[::-1]):  # alternate the order so drift hits all alike
                    tps, ans = run_once(models[c[0]], tok, work, max_seqs, c[1])
                    speeds[c].append(tps)
                    answers[c] = ans
                    print(f"{wname} max_num_seqs={max_seqs} {label[c]}: {tps:.0f} tok/s", flush=True)
            med = {c: statistics.median(v) for c, v in speeds.items()}
            base = med[configs[0]]
            same = {dt: sum(a == b for a, b in zip(answers[(dt, True)], answers[(dt, False)])) / len(work) for dt in dtypes}
            rows.append([wname, max_seqs, *[med[c] for c in configs], *[med[c] / base for c in configs[1:]],
                         *[same[dt] for dt in dtypes]])
            data.append({"workload": wname, "max_num_seqs": max_seqs, "tok_s": {label[c]: speeds[c] for c in configs},
                         "identical_greedy_native_vs_gather": same})
    header = ["workload", "max_num_seqs", *[f"{label[c]} tok/s" for c in configs],
              *[f"{label[c]} / {label[configs[0]]}" for c in configs[1:]],
              *[f"greedy identical ({short[dt]}, native vs gather)" for dt in dtypes]]
    table = markdown_table(header, rows)
    info = machine()
    md = (f"# Decode attention: native kernel vs gather + SDPA ({args.run.name}, {time.strftime('%Y-%m-%d')})\n\n"
          f"Machine: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']} ({info['torch_cpu_capability']}), "
          f"{info['torch_threads']} threads. The engine in process, weights and KV cache in {', '.join(dtypes)}, "
          f"{args.requests} requests added at once; random: 128 prompt / 128 output tokens; mixed: 32-256 / 32-256. "
          f"Output tokens/s over the whole run (prefill included), median of {args.repeats}, the configurations "
          f"alternating.\n\n{table}\n")
    print(md)
    write(args.name, md, {"machine": info, "settings": vars(args) | {"run": str(args.run)}, "rows": data})


if __name__ == "__main__":
    main()
