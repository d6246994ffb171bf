"""The identifier-only stage's validation curve: how the identifier view ranks (NDCG@10, HR@10 on the
leave-one-out validation split, full ranking, history masked) after each pass, per `hidden_dropout`.

    python benchmarks/id_stage_curve.py --domain DIR --init PRETRAINED_RUN --dropouts 0 0.2 --epochs 6 [--seed 0]

Each dropout trains one stage (the settings of recommend_bench's idstage variants: 5 shifted readings
per sequence, batch 32, lr 1e-3) from the same pretrained run, validated after each pass by the stage
itself (`validation: epoch`); runs go under --work, never into the repository. Writes
benchmarks/results/<name>.md/.json/.png with the machine and every setting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write  # noqa: E402


def curve(domain_dir: Path, init: Path, out: Path, dropout: float, epochs: float, seed: int) -> dict:
    """One identifier-only stage, validated after each pass by the stage itself (TrainConfig.validation,
    the identifier view ranked on the validation split); its points come back from the run's run.json."""
    import json

    from recfm.training import TrainConfig, train

    t0 = time.perf_counter()
    run = train(TrainConfig(stage="pretrain", init_from=str(init), output=str(out), pretrain_history=False, id_readings=5,
                            epochs=epochs, batch_size=32, lr=1e-3, hidden_dropout=dropout, domain=str(domain_dir),
                            seed=seed, max_history=20, max_tokens=1024, logging_steps=20, save_steps=10_000,
                            validation="epoch"),
                progress=False)
    info = json.loads((run / "run.json").read_text())
    points = [{"pass": round(p["epoch"], 2), "ndcg@10": p["ndcg@10"], "hr@10": p["hr@10"]} for p in info["validation"]]
    for p in points:
        print(f"hidden_dropout {dropout}: pass {p['pass']:g}, validation NDCG@10 {p['ndcg@10']:.4f} "
              f"HR@10 {p['hr@10']:.4f}", flush=True)
    return {"hidden_dropout": dropout, "points": points, "train_s": time.perf_counter() - t0,
            "users": info["validation"][0]["users"] if info["validation"] else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", type=Path, required=True, help="a prepared domain folder")
    ap.add_argument("--init", type=Path, required=True, help="the pretrained run each stage continues")
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.2])
    ap.add_argument("--epochs", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "recfm" / "bench" / "id-curve")
    ap.add_argument("--name", default=None, help="result file stem (default id_stage_curve_<domain>)")
    args = ap.parse_args()
    import json

    from recfm.foundation import RecFMConfig

    length = RecFMConfig.from_pretrained(args.init).id_view_length or 50
    runs = [curve(args.domain, args.init, args.work / f"drop{d:g}-s{args.seed}", d, args.epochs, args.seed)
            for d in args.dropouts]
    from recfm.data import load_domain

    name = args.name or f"id_stage_curve_{load_domain(args.domain).name}"
    passes = sorted({p["pass"] for r in runs for p in r["points"]})
    rows = []
    for r in runs:
        by = {p["pass"]: p for p in r["points"]}
        rows.append([f"hidden_dropout {r['hidden_dropout']:g}", *[f"{by[k]['ndcg@10']:.4f}" if k in by else "" for k in passes],
                     f"{r['train_s']:.0f}"])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    md = (f"# Identifier-only stage, validation curve\n\nThe identifier view (newest {length} history items) after each "
          f"pass of an identifier-only stage from `{args.init.name}`: NDCG@10 on the leave-one-out validation split "
          f"(each user's second-to-last item), full ranking, history masked, {runs[0]['users']} users; "
          f"learning rate 1e-3 (5 % warm-up, then linear decay to 0) over {args.epochs:g} passes, seed {args.seed}. "
          f"The stage validates itself (`validation: epoch`, recfm.training.validation); train (s) includes it.\n\n"
          + markdown_table(["stage", *[f"pass {k:g}" for k in passes], "train (s)"], rows)
          + f"\n\nMachine: {json.dumps(machine())}\nSettings: {json.dumps(settings)}\n")
    path = write(name, md, {"runs": runs, "machine": machine(), "settings": settings})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot([p["pass"] for p in r["points"]], [p["ndcg@10"] for p in r["points"]], marker="o",
                label=f"hidden_dropout {r['hidden_dropout']:g}")
    ax.set_xlabel("pass over the sequences")
    ax.set_ylabel("validation NDCG@10 (identifier view)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(md)


if __name__ == "__main__":
    main()
