"""Next-item quality on one leave-one-out split: recfm vs popularity vs RecBole's SASRec (vs the oracle
on the default domain), full ranking over all items with the history masked, per seed.

    python benchmarks/recommend_bench.py --domain DIR --seeds 0 1 2 [--pretrain-steps N --tune-steps N]
        [--variants early-atomic no-images ...] [--sasrec-epochs 50]

Converted domains and runs go under --work (default ~/.cache/recfm/bench), never into the repository.
Writes benchmarks/results/recommend_<domain>.md/.json (+ .png) with the machine and every setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine as machine_info  # noqa: E402
from common import write as write_result  # noqa: E402
from sasrec_recbole import DEFAULT_PATIENCE  # noqa: E402

CONTENT_TOKENS = dict(item_text="tokens", item_id_residual=True, item_image=True)
VARIANTS = {  # name -> training config overrides
    "early-atomic": dict(fusion="early", item_mode="atomic"),
    "early-atomic-idfirst": dict(fusion="early", item_mode="atomic", item_layout="id_first"),
    "early-atomic-noidseq": dict(fusion="early", item_mode="atomic", id_sequence=0),
    "early-atomic-idx5": dict(fusion="early", item_mode="atomic", id_readings=5),  # 5 shifted id-view readings
    "cross-atomic": dict(fusion="cross_attention", item_mode="atomic"),
    "early-semantic": dict(fusion="early", item_mode="semantic"),
    # content ids as first built (the item vector reads the title's tokens, a per-item residual and the image)
    "early-content": dict(fusion="early", item_mode="content", **CONTENT_TOKENS),
    "early-content-dropout": dict(fusion="early", item_mode="content", **CONTENT_TOKENS, item_residual_dropout=0.5),
    "early-content-nores": dict(fusion="early", item_mode="content", **{**CONTENT_TOKENS, "item_id_residual": False}),
    "early-content-words": dict(fusion="early", item_mode="content", item_id_residual=False, item_text="words",
                                item_image=True),
    "early-content-words-noimg": dict(fusion="early", item_mode="content", item_id_residual=False, item_text="words",
                                      vision=None),
    # TrainConfig's content default: words, no residual, images in the prompts but not in the item vectors
    "early-content-words-noitemimg": dict(fusion="early", item_mode="content", item_id_residual=False, item_text="words",
                                          item_image=False),
    "no-images": dict(fusion="early", item_mode="atomic", vision=None),
}
# variant -> (the variant whose pretraining run it continues, for the same seed; an identifier-only stage
# run between that pretraining and tuning: many cheap passes over the sequences, as SASRec trains; the
# tuning stage's overrides). idstage-e3: three passes, then tuning at lr 3e-4, chosen on the validation
# split of seed 0 (identifier view 0.098 after 2 and 3 passes; tuning at lr 1e-3 / 3e-4 / 1e-4 kept it
# at 0.081 / 0.092 / 0.091, prompted 0.038 / 0.041 / 0.032)
ID_STAGES = {
    "early-atomic-idstage": ("early-atomic", dict(id_readings=5, epochs=1.0, batch_size=32, lr=1e-3), {}),
    "early-atomic-idstage-e3": ("early-atomic", dict(id_readings=5, epochs=3.0, batch_size=32, lr=1e-3), dict(lr=3e-4)),
    # idstage-e3 with SASRec's regularisation: hidden_dropout 0.2 on the decoder's input and each residual
    # branch. Its length is idstage-e3's: on the validation split of seed 0 a 6-pass stage with this dropout gave
    # the identifier view 0.099 / 0.101 / 0.102 / 0.098 / 0.096 / 0.092 after passes 1-6 (idstage-e3 without
    # dropout: 0.093 / 0.093 / 0.088 after its passes 1-3, the same evaluation: id_stage_curve_ml-100k_nodropout.md)
    "early-atomic-idstage-e3-drop": ("early-atomic", dict(id_readings=5, epochs=3.0, batch_size=32, lr=1e-3,
                                                          hidden_dropout=0.2), dict(lr=3e-4)),
    # idstage-e3-drop stopped as SASRec stops: up to 6 passes, the identifier view ranked on the validation split
    # after each (TrainConfig.validation), the stage ending with the best pass's weights (keep_best) per seed
    "early-atomic-idstage-e6-drop-best": ("early-atomic", dict(id_readings=5, epochs=6.0, batch_size=32, lr=1e-3,
                                                               hidden_dropout=0.2, validation="epoch", keep_best=True),
                                          dict(lr=3e-4)),
    # the same stages without any image (the images ablation of the current recipe)
    "no-images-idstage-e3": ("no-images", dict(id_readings=5, epochs=3.0, batch_size=32, lr=1e-3), dict(lr=3e-4)),
}
# variant -> (the variant whose pretraining and identifier-only runs it continues, for the same seed; its tuning
# stage's further overrides): the same stages up to tuning, so the two tuned runs differ in one setting
TUNE_VARIANTS = {
    # the prompt's answer position also learns the identifier view's distribution (KL, weight 1)
    "early-atomic-idstage-e3-distill": ("early-atomic-idstage-e3", dict(answer_distill=1.0)),
    "early-atomic-idstage-e3-distill5": ("early-atomic-idstage-e3", dict(answer_distill=5.0)),  # weight 5
    # without and with it (weight 1, chosen on the validation split of seed 0) at tuning seed 1 (data order and
    # example draws; the earlier stages are seed 0's)
    "early-atomic-idstage-e3-t1": ("early-atomic-idstage-e3", dict(seed=1)),
    "early-atomic-idstage-e3-distill-t1": ("early-atomic-idstage-e3", dict(answer_distill=1.0, seed=1)),
    "no-images-idstage-e3-distill": ("no-images-idstage-e3", dict(answer_distill=1.0)),
    "early-atomic-idstage-e3-drop-distill": ("early-atomic-idstage-e3-drop", dict(answer_distill=1.0)),
    "early-atomic-idstage-e6-drop-best-distill": ("early-atomic-idstage-e6-drop-best", dict(answer_distill=1.0)),
}
for _v, (_base, _, _) in ID_STAGES.items():
    VARIANTS[_v] = VARIANTS[_base]
for _v, (_base, _) in TUNE_VARIANTS.items():
    VARIANTS[_v] = VARIANTS[_base]
METRICS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr")


def run_recfm(domain_dir: Path, tok_dir: Path, work: Path, variant: str, seed: int, args) -> dict:
    from recfm.eval.runner import evaluate
    from recfm.training import TrainConfig, train

    common = dict(domain=str(domain_dir), preset=args.preset, seed=seed, batch_size=8, logging_steps=20,
                  save_steps=10_000, max_history=args.max_history, max_tokens=1024, split=args.split,
                  cold_fraction=args.cold_fraction, cold_seed=args.cold_seed, **VARIANTS[variant])
    cold = ("-cold" + (str(args.cold_seed) if args.cold_seed else "")) if args.split == "cold_items" else ""
    name = f"{variant}-s{seed}{cold}"
    final = work / name
    staged, tune_extra = TUNE_VARIANTS.get(variant, (variant, {}))  # whose stages before tuning this run shares
    stages = [work / f"{staged}-s{seed}{cold}-pre"] + ([work / f"{staged}-s{seed}{cold}-ids"] if staged in ID_STAGES else [])
    if staged in ID_STAGES:  # continue the base variant's pretraining run of this seed
        stages[0] = work / f"{ID_STAGES[staged][0]}-s{seed}{cold}-pre"
    if args.reuse and (final / "run.json").exists():  # evaluate a run this script trained before
        for flag, folder, wanted in (("pretrain", stages[0], args.pretrain_steps), ("tune", final, args.tune_steps)):
            done = json.loads((folder / "run.json").read_text())["steps"]  # the table states the step counts
            if done != wanted:
                raise SystemExit(f"{folder} ran {done} steps, not the {wanted} this command states (pass --{flag}-steps {done})")
        runtime = sum(json.loads((d / "run.json").read_text())["train_runtime_s"] for d in [final, *stages])
        report = evaluate(final, domain_dir, tasks=["next_item"], seed=seed, progress=True, split=args.split,
                          stage=args.stage, id_view_weight=args.id_view_weights)
        return result(report, runtime)
    t0 = time.perf_counter()
    if (stages[0] / "run.json").exists() and (staged in ID_STAGES or staged != variant):
        pre, info = stages[0], json.loads((stages[0] / "run.json").read_text())
        if info["steps"] != args.pretrain_steps:
            raise SystemExit(f"{pre} pretrained {info['steps']} steps, not --pretrain-steps {args.pretrain_steps}")
        t0 -= info["train_runtime_s"]
    else:
        pre = train(TrainConfig(stage="pretrain", tokenizers=str(tok_dir), output=str(stages[0]),
                                max_steps=args.pretrain_steps, lr=2e-3, **common), progress=False)
    for k in ("vision", "fusion", "item_mode", "item_layout", "item_id_residual"):  # the model's own, from the pretrained run
        common.pop(k, None)
    if staged in ID_STAGES and (stages[1] / "run.json").exists():  # a finished identifier-only stage of this seed
        pre = stages[1]
        t0 -= json.loads((pre / "run.json").read_text())["train_runtime_s"]
    elif staged in ID_STAGES:
        pre = train(TrainConfig(stage="pretrain", init_from=str(pre), output=str(stages[1]), pretrain_history=False,
                                **{**common, **ID_STAGES[staged][1]}), progress=False)
    # answer_distill off unless a variant sets it: the tables committed before it existed ran without it
    tune = {**common, "max_steps": args.tune_steps, "lr": 1e-3, "tasks": {"next_item": 2.0, "pick_candidate": 1.0, "id_sequence": 1.0},
            "answer_distill": 0.0,
            **(ID_STAGES[staged][2] if staged in ID_STAGES else {}), **tune_extra}
    run = train(TrainConfig(stage="tune", init_from=str(pre), output=str(final), **tune), progress=False)
    train_s = time.perf_counter() - t0
    report = evaluate(run, domain_dir, tasks=["next_item"], seed=seed, progress=True, split=args.split,
                      stage=args.stage, id_view_weight=args.id_view_weights)
    return result(report, train_s)


def hit_summary(hits: Counter) -> dict:
    """How many top-10 hits, on how many distinct target items, and the most-hit item's share."""
    top, n = max(hits.items(), key=lambda kv: (kv[1], kv[0])) if hits else (None, 0)
    return {"hits": sum(hits.values()), "distinct_items": len(hits), "most_hit_item": top, "most_hit_count": n}


def hit_line(name: str, h: dict, titles: dict) -> str:
    if not h["hits"]:
        return f"- {name}: no hit"
    top = titles.get(h["most_hit_item"], h["most_hit_item"])
    return (f"- {name}: {h['hits']} hits on {h['distinct_items']} distinct items; most hit: {top} "
            f"({h['most_hit_count']}, {h['most_hit_count'] / h['hits']:.0%})")


def result(report: dict, train_s: float) -> dict:
    """One recfm run's row: metrics by template, baselines, each user's NDCG@10 (seen template, for
    paired tests between variants) and a paired test against popularity on the same users."""
    from recfm.eval.metrics import ndcg_per_user, paired_test

    ours = [r for r in report["per_example"]["next_item"] if not r["held_out"]]
    users = [r["user_id"] for r in ours]
    per_user = dict(zip(users, ndcg_per_user([r["rank"] for r in ours]).tolist()))
    pop_rank = {r["user_id"]: r["rank"] for r in report["per_example"]["popularity"]}
    pop = ndcg_per_user([pop_rank[u] for u in users])
    # which targets the top-10 hits fell on (a few popular new items can carry a cold-split HR@10)
    hits = Counter(r["target"] for r in ours if r["rank"] < 10 and "target" in r)
    profile_hits = Counter(r["target"] for r in report["per_example"]["content_profile"] if r["rank"] < 10 and "target" in r)
    return {"distinct_targets": len({r["target"] for r in ours if "target" in r}),
            "hits@10_by_item": hit_summary(hits), "content_profile_hits@10_by_item": hit_summary(profile_hits),
            "seen": report["tasks"]["next_item"]["seen"], "held_out": report["tasks"]["next_item"]["held_out"],
            "id_sequence": report["tasks"]["next_item"].get("id_sequence"),
            "among_new": report["tasks"].get("next_item_among_new"), "baselines_among_new": report.get("baselines_among_new"),
            "cold_items": report.get("cold_items"),
            "train_s": train_s, "baselines": report["baselines"], "per_user_ndcg": per_user,
            "vs_popularity": paired_test([per_user[u] for u in users], pop), "users": report["users"],
            "id_view_vs_popularity": _id_view_test(report, pop_rank), **_fused(report, per_user, pop_rank)}


def _fused(report: dict, per_user: dict, pop_rank: dict) -> dict:
    """The prompts fused with the identifier view, at each weight evaluated: metrics by template, each
    user's NDCG@10 (seen template) and paired tests against the prompt alone and against popularity;
    and the identifier view's own NDCG@10 per user (for paired tests against other rankers)."""
    from recfm.eval.metrics import ndcg_per_user, paired_test

    out = {}
    ids = report["per_example"].get("next_item_id_sequence")
    if ids:
        out["per_user_ndcg_id_view"] = dict(zip([r["user_id"] for r in ids], ndcg_per_user([r["rank"] for r in ids]).tolist()))
    fused = report["tasks"].get("next_item_fused")
    if not fused:
        return out
    out["fused"], out["per_user_ndcg_fused"], out["fused_vs_prompt"], out["fused_vs_popularity"] = fused, {}, {}, {}
    for w, examples in report["per_example"]["next_item_fused"].items():
        seen = [r for r in examples if not r["held_out"]]
        users = [r["user_id"] for r in seen]
        ndcg = ndcg_per_user([r["rank"] for r in seen]).tolist()
        out["per_user_ndcg_fused"][w] = dict(zip(users, ndcg))
        out["fused_vs_prompt"][w] = paired_test(ndcg, [per_user[u] for u in users])
        out["fused_vs_popularity"][w] = paired_test(ndcg, ndcg_per_user([pop_rank[u] for u in users]))
    return out


def _id_view_test(report: dict, pop_rank: dict) -> dict | None:
    """The identifier view's NDCG@10 per user against popularity's on the same users (None without that view)."""
    from recfm.eval.metrics import ndcg_per_user, paired_test

    ids = report["per_example"].get("next_item_id_sequence")
    if not ids:
        return None
    return paired_test(ndcg_per_user([r["rank"] for r in ids]), ndcg_per_user([pop_rank[r["user_id"]] for r in ids]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True, help="a prepared domain folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="*", default=["early-atomic"], choices=sorted(VARIANTS),
                    help="recfm variants to train; none (a bare --variants) runs only SASRec")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--tune-steps", type=int, default=300)
    ap.add_argument("--max-history", type=int, default=20)
    ap.add_argument("--vq-steps", type=int, default=800)
    ap.add_argument("--sasrec-epochs", type=int, default=50)
    ap.add_argument("--sasrec-patience", type=int, default=DEFAULT_PATIENCE,
                    help="SASRec stops after this many epochs without a better validation NDCG@10 (RecBole's stopping_step)")
    ap.add_argument("--no-sasrec", action="store_true")
    ap.add_argument("--split", default="leave_one_out", choices=["leave_one_out", "cold_items"],
                    help="cold_items: train without a seeded share of the items and rank each user's first of them "
                         "(content/semantic variants; SASRec is not run)")
    ap.add_argument("--cold-fraction", type=float, default=0.05)
    ap.add_argument("--cold-seed", type=int, default=0, help="which draw of cold items")
    ap.add_argument("--stage", default="test", choices=["test", "valid"],
                    help="valid: rank each user's validation item instead (the one before the test item), to choose "
                         "settings without looking at the test split")
    ap.add_argument("--id-view-weights", type=float, nargs="*", default=None, metavar="W",
                    help="also rank from the prompts fused with the identifier view at these weights (default: each "
                         "run's own id_view_weight; with no value, none)")
    ap.add_argument("--reuse", action="store_true", help="evaluate runs already trained under --work instead of training")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "recfm" / "bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default=None, help="result file stem (default recommend_<domain>)")
    ap.add_argument("--collect", type=Path, nargs="+", default=None, metavar="JSON",
                    help="build the table from results this script saved before (each run's entry from the last file "
                         "given that holds it; their settings must match these) instead of training or evaluating")
    args = ap.parse_args()
    collected = _collect(args) if args.collect else None

    from recfm.data import load_domain
    from recfm.eval.metrics import paired_test
    from recfm.tokenizers.build import tokenize_domain

    domain_dir = Path(args.domain).resolve()
    domain = load_domain(domain_dir)
    work = args.work / domain.name
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizers"
    if not (tok_dir / "tokenizers.json").exists():
        tokenize_domain(domain_dir, tok_dir, vocab_size=4096, vq_steps=args.vq_steps, vq_codebook=256, vq_channels=32,
                        vq_batch_size=32, progress=False)
    rows, new_rows, raw = [], [], {"settings": {k: ([str(p) for p in v] if k == "collect" and v else str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items()}}
    baselines = new_baselines = None
    for seed in args.seeds:
        for variant in args.variants:
            r = collected[f"recfm/{variant}/seed{seed}"] if collected else run_recfm(domain_dir, tok_dir, work, variant, seed, args)
            baselines = r["baselines"]
            raw[f"recfm/{variant}/seed{seed}"] = r
            rows.append((f"recfm {variant} (seen template)", seed, r["seen"], r["train_s"]))
            rows.append((f"recfm {variant} (held-out template)", seed, r["held_out"], r["train_s"]))
            if r["id_sequence"]:
                rows.append((f"recfm {variant} (identifier-sequence view)", seed, r["id_sequence"], r["train_s"]))
            for w, by in (r.get("fused") or {}).items():
                for view, label in (("seen", "seen template"), ("held_out", "held-out template")):
                    rows.append((f"recfm {variant} ({label} + identifier view ×{w})", seed, by[view], r["train_s"]))
            for view, label in (("seen", "seen template"), ("held_out", "held-out template"),
                                ("id_sequence", "identifier-sequence view")):
                if (r.get("among_new") or {}).get(view):
                    new_rows.append((f"recfm {variant} ({label})", seed, r["among_new"][view], r["train_s"]))
            new_baselines = r.get("baselines_among_new") or new_baselines
        if collected and f"sasrec/seed{seed}" in collected:
            s = collected[f"sasrec/seed{seed}"]
            raw[f"sasrec/seed{seed}"] = s
            rows.append(("SASRec (RecBole 1.2.1)", seed, {**s["recfm_names"], "mrr": s["metrics"]["mrr@20"]}, s.get("train_s", float("nan"))))
        elif not args.no_sasrec and args.split == "leave_one_out" and not collected:
            from sasrec_recbole import run_sasrec

            # kept under the work folder, so a killed SASRec run resumes from its last epoch when rerun;
            # train_s is its training time summed over the epochs, across resumes
            # a patience other than the default trains apart: a run that stopped early is not the start of a longer one
            p = "" if args.sasrec_patience == DEFAULT_PATIENCE else f"-p{args.sasrec_patience}"
            s = run_sasrec(domain_dir, seed=seed, epochs=args.sasrec_epochs, patience=args.sasrec_patience,
                           work=work / f"sasrec-e{args.sasrec_epochs}-s{seed}{p}")
            raw[f"sasrec/seed{seed}"] = s
            rows.append(("SASRec (RecBole 1.2.1)", seed, {**s["recfm_names"], "mrr": s["metrics"]["mrr@20"]}, s["train_s"]))
    for name, m in (baselines or {}).items():
        if isinstance(m, dict) and "hr@10" in m:
            rows.append((name.replace("_", " "), "-", m, 0.0))
    for name, m in (new_baselines or {}).items():
        new_rows.append((name.replace("_", " "), "-", m, 0.0))
    # mean +- std over seeds of every ranker that ran with more than one seed
    by_name: dict[str, list] = {}
    for name, seed, m, secs in rows:
        if seed != "-":
            by_name.setdefault(name, []).append(m)
    summary = {name: {k: (float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))) for k in METRICS if k in ms[0]}
               for name, ms in by_name.items() if len(ms) > 1}
    raw["mean_std_over_seeds"] = summary
    machine = machine_info()
    raw["machine"] = machine
    stem_name = args.name or f"recommend_{domain.name}"
    shown = METRICS + (("median_rank",) if args.split == "cold_items" else ())  # HR@K is often 0 for new items
    header = ["ranker", "seed", *shown, "train (s)"]
    n_eval = next((v["users"] for k, v in raw.items() if k.startswith("recfm/")), len(domain.sequences))
    asked = "validation (each user's second-to-last item)" if args.stage == "valid" else "test"
    def sasrec_setting(key, default) -> str:  # each value the table's SASRec runs used, "15/200" where they differ
        return "/".join(str(v) for v in sorted({r.get(key, default) for k, r in raw.items() if k.startswith("sasrec/")}))

    lines = [f"# Next-item prediction on {domain.name}", "",
             (f"Leave-one-out {asked}, full ranking over {len(domain.item_ids)} items, history masked, "
              f"{len(domain.sequences)} users." if args.split == "leave_one_out" else
              f"Cold items: {args.cold_fraction:.0%} of the items (seeded draw, cold_seed {args.cold_seed}) never in training; each user "
              f"who later consumed one is asked for the first of them from the warm items before it, full ranking over "
              f"all {len(domain.item_ids)} items, history masked; {n_eval} users.")
             + (f" recfm: `{args.preset}` preset, {args.pretrain_steps} pretraining + "
                f"{args.tune_steps} tuning steps of batch 8, history {args.max_history} items. " if args.variants else " recfm not run. ")
             + ("SASRec not run." if not any(k.startswith("sasrec/") for k in raw) else
                f"SASRec: RecBole 1.2.1 defaults except CE loss, 2 layers, hidden 64, "
                f"{sasrec_setting('epochs', args.sasrec_epochs)} epochs max with early stopping on validation NDCG@10 "
                f"(patience {sasrec_setting('patience', DEFAULT_PATIENCE)} epochs); its test (user, item) pairs were "
                "checked equal to recfm's.")
             + " train (s): wall-clock seconds of pretraining + tuning as recorded when the run was trained.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def table_row(name, seed, m, secs) -> str:
        cells = (f"{m.get(k, float('nan')):.{1 if k == 'median_rank' else 4}f}" for k in shown)
        return "| " + " | ".join([name, str(seed), *cells, f"{secs:.0f}"]) + " |"

    lines += [table_row(*r) for r in rows]
    if new_rows:  # the item cold-start protocol: the target ranked against the other new items only
        n_new = next(v["cold_items"] for k, v in raw.items() if k.startswith("recfm/") and v.get("cold_items"))
        lines += ["", f"The same targets ranked among the {n_new} new items alone (the item cold-start protocol, as "
                  "DropoutNet and CLCRec report it): does the model tell the new items apart by their content?", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += [table_row(*r) for r in new_rows]
        raw["among_new_rows"] = [{"ranker": n, "seed": sd, **m} for n, sd, m, _ in new_rows]
    if args.split == "cold_items":  # a few popular new items can carry a full-ranking HR@10: show where hits fell
        titles = {r["item_id"]: r["title"] for r in domain.items.select_columns(["item_id", "title"])}
        lines += ["", "Full-ranking top-10 hits by target item (seen template; targets: "
                  f"{next((v['distinct_targets'] for k, v in raw.items() if k.startswith('recfm/') and 'distinct_targets' in v), '?')} "
                  "distinct new items):", ""]
        last = {}
        for k, v in raw.items():
            if k.startswith("recfm/") and "hits@10_by_item" in v:
                lines.append(hit_line(k, v["hits@10_by_item"], titles))
                last = v
        if "content_profile_hits@10_by_item" in last:
            lines.append(hit_line("content profile", last["content_profile_hits@10_by_item"], titles))
    if summary:
        lines += ["", f"Mean ± std over seeds {args.seeds}:", "",
                  "| ranker | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
        lines += ["| " + " | ".join([name, *(f"{v[k][0]:.4f} ± {v[k][1]:.4f}" if k in v else "" for k in METRICS)]) + " |"
                  for name, v in summary.items()]
    tests = [(k, v["vs_popularity"]) for k, v in raw.items() if isinstance(v, dict) and "vs_popularity" in v]
    if tests:
        lines += ["", "Per-user NDCG@10 of recfm (seen template) minus popularity's, paired sign-flip test (10,000 resamples):", ""]
        lines += [f"- {k}: mean difference {t['mean_diff']:+.4f} over {t['n']} users, p = {t['p_value']:.4f}" for k, t in tests]
    fused = [(k, w, v["fused_vs_prompt"][w], v["fused_vs_popularity"][w]) for k, v in raw.items()
             if isinstance(v, dict) and v.get("fused_vs_prompt") for w in v["fused_vs_prompt"]]
    if fused:
        lines += ["", "Per-user NDCG@10 of the seen-template prompt fused with the identifier view (`fused_scores`: the "
                  "prompt's log-probabilities plus the weight times the view's), minus the prompt alone's and minus "
                  "popularity's and minus the identifier view alone's (paired sign-flip test):", ""]
        for k, w, a, b in fused:
            line = (f"- {k} ×{w}: vs the prompt alone {a['mean_diff']:+.4f} (p = {a['p_value']:.4f}); vs popularity "
                    f"{b['mean_diff']:+.4f} (p = {b['p_value']:.4f})")
            ours, view = raw[k]["per_user_ndcg_fused"][w], raw[k].get("per_user_ndcg_id_view")
            if view:  # and against the identifier view alone: does the prompt add to it?
                users = sorted(set(ours) & set(view))
                c = raw[k].setdefault("fused_vs_id_view", {})[w] = paired_test([ours[u] for u in users], [view[u] for u in users])
                line += f"; vs the identifier view alone {c['mean_diff']:+.4f} (p = {c['p_value']:.4f})"
            lines.append(line + f", {a['n']} users")
    vs_sasrec = [(seed, raw[f"sasrec/seed{seed}"]) for seed in args.seeds if "per_user_ndcg" in raw.get(f"sasrec/seed{seed}", {})]
    if vs_sasrec and args.variants:  # SASRec runs that kept each user's rank
        lines += ["", "Per-user NDCG@10 of recfm minus SASRec's at the same seed, on the same test users (paired "
                  "sign-flip test):", ""]
        for seed, sas in vs_sasrec:
            for variant in args.variants:
                r = raw[f"recfm/{variant}/seed{seed}"]
                views = [("prompt, seen template", r["per_user_ndcg"]), ("identifier view", r.get("per_user_ndcg_id_view"))]
                views += [(f"prompt + identifier view ×{w}", d) for w, d in (r.get("per_user_ndcg_fused") or {}).items()]
                for label, ndcg in views:
                    if not ndcg:
                        continue
                    users = sorted(set(ndcg) & set(sas["per_user_ndcg"]))
                    t = paired_test([ndcg[u] for u in users], [sas["per_user_ndcg"][u] for u in users])
                    r.setdefault("vs_sasrec", {})[label] = t
                    lines.append(f"- {variant}, seed {seed}, {label}: mean difference {t['mean_diff']:+.4f} over "
                                 f"{t['n']} users, p = {t['p_value']:.4f}")
    curves = {seed: raw[f"sasrec/seed{seed}"] for seed in args.seeds if raw.get(f"sasrec/seed{seed}", {}).get("valid_ndcg@10_by_epoch")}
    if curves:  # did the epoch budget let SASRec converge? RecBole tests the best validation epoch's model
        lines += ["", "SASRec's validation NDCG@10 by epoch (RecBole tests the model of the best epoch; "
                  f"`{stem_name}_sasrec_valid.png`):", ""]
        for seed, s in curves.items():
            h = s["valid_ndcg@10_by_epoch"]
            best = int(np.argmax(h))
            tail = f"; the last 5 epochs added {h[-1] - h[-6]:+.4f}" if len(h) > 5 else ""
            mean = s.get("per_user_ndcg@10_mean")
            check = f"; mean of its per-user test NDCG@10 {mean:.4f} vs RecBole's {s['recfm_names']['ndcg@10']:.4f}" if mean else ""
            lines.append(f"- seed {seed}: best epoch {best + 1} of {len(h)} ({h[best]:.4f}; epoch 1: {h[0]:.4f}){tail}; "
                         f"{s.get('torch_threads', '?')} torch thread(s){check}")
    if len(args.variants) > 1:  # every variant against the first, same seed, same users
        lines += ["", f"Per-user NDCG@10 of each variant minus {args.variants[0]}'s (seen template, and the identifier view "
                  "and the fusion where both have them; same seed, paired sign-flip test):", ""]
        for seed in args.seeds:
            first = raw[f"recfm/{args.variants[0]}/seed{seed}"]
            for v in args.variants[1:]:
                r = raw[f"recfm/{v}/seed{seed}"]
                pairs = [("", first["per_user_ndcg"], r["per_user_ndcg"]),
                         (" (identifier view)", first.get("per_user_ndcg_id_view"), r.get("per_user_ndcg_id_view"))]
                pairs += [(f" (prompt + identifier view ×{w})", d, (r.get("per_user_ndcg_fused") or {}).get(w))
                          for w, d in (first.get("per_user_ndcg_fused") or {}).items()]
                for label, ref, other in pairs:
                    if not ref or not other:
                        continue
                    users = sorted(set(ref) & set(other))
                    t = paired_test([other[u] for u in users], [ref[u] for u in users])
                    r.setdefault("vs_first_variant_by_view", {})[label.strip(" ()") or "prompt"] = t
                    if not label:
                        r["vs_first_variant"] = t
                    lines.append(f"- {v}, seed {seed}{label}: mean difference {t['mean_diff']:+.4f} over {t['n']} users, "
                                 f"p = {t['p_value']:.4f}")
    if collected:
        lines += ["", "Collected from earlier runs of this script (nothing retrained or re-evaluated):", ""]
        lines += [f"- {k}: `{collected['_from'][k]}`" for k in raw if k in collected["_from"]]
    lines += ["", f"Machine: {json.dumps(machine)}", f"Settings: {json.dumps(raw['settings'])}"]
    stem = write_result(stem_name, "\n".join(lines), raw, args.out)
    plot(rows, stem.with_suffix(".png"), domain.name, args.split)
    if curves:
        plot_sasrec_curves(curves, stem.with_name(stem.stem + "_sasrec_valid.png"), domain.name)
    print("\n".join(lines))


def _collect(args) -> dict:
    """Saved per-run results by key (`recfm/<variant>/seed<N>`, `sasrec/seed<N>`), checked against
    this invocation's settings; `_from` says which file each came from."""
    found: dict = {"_from": {}}
    same = ("preset", "pretrain_steps", "tune_steps", "max_history", "split", "cold_fraction", "cold_seed", "stage")
    wanted = [f"recfm/{v}/seed{s}" for s in args.seeds for v in args.variants]
    for path in args.collect:
        data = json.loads(path.read_text())
        # files from before --cold-seed drew seed 0, from before --stage ranked the test items
        settings = {"cold_seed": 0, "stage": "test", **data.get("settings", {})}
        for key, entry in data.items():  # a file may also hold runs this table does not show (other settings)
            if not (key in wanted or key.startswith("sasrec/")):
                continue
            if key.startswith("recfm/"):
                differ = [k for k in same if k in settings and settings[k] != getattr(args, k)]
                if differ:
                    raise SystemExit(f"{path}: {key} was run with other settings ({', '.join(f'{k}={settings[k]}' for k in differ)})")
            found[key], found["_from"][key] = entry, path.name
    missing = [k for k in wanted if k not in found]
    if missing:
        raise SystemExit(f"not in {[p.name for p in args.collect]}: {missing}")
    return found


def plot(rows, out: Path, name: str, split: str = "leave_one_out") -> None:
    """NDCG@10 and HR@10 of every ranker, one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    for ax, metric in zip(axes, ("ndcg@10", "hr@10")):
        for y, n in enumerate(names):
            xs = [m[metric] for ranker, _, m, _ in rows if ranker == n and metric in m]
            ax.scatter(xs, [y] * len(xs), color="tab:blue" if n.startswith("recfm") else "tab:gray")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel(metric)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"next-item prediction on {name} (full ranking, {'new items' if split == 'cold_items' else 'leave-one-out'})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_sasrec_curves(curves: dict, out: Path, name: str) -> None:
    """SASRec's validation NDCG@10 after each epoch, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for seed, s in curves.items():
        h = s["valid_ndcg@10_by_epoch"]
        ax.plot(range(1, len(h) + 1), h, marker=".", label=f"seed {seed}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(f"RecBole SASRec on {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
