"""`recfm eval`: every task of a trained run on a domain's leave-one-out split, against baselines.

Next-item prediction is full ranking over the whole catalogue with the user's history masked (one
forward pass per prompt through the ranking head; semantic ids by each item's exact code-sequence
log-probability, one more pass over the code trie's inner nodes). Pick-
from-candidates, yes/no, image preference and rating read the answer position's logits; explanation
and review generation decode greedily and are scored by BLEU-4 and ROUGE; image generation samples a
code grid, the VQ decoder draws it, and (default domain) the pixel checker says whether it shows the
user's preferred colour, shape and pattern. Every metric is reported for seen and held-out templates.
Per-example results are kept for paired tests and seed averages.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..foundation.generation import fused_scores
from . import metrics as M
from .baselines import (bias_rating_baseline, content_profile_ranks, latest_item_review_baseline, popularity_ranks,
                        popularity_yes_no, similar_review_baseline)


class LoadedRun:
    """A trained run folder, ready to answer prompts about a domain."""

    def __init__(self, run_dir: str | Path, domain, max_tokens: int = 1024, dtype: torch.dtype | None = None,
                 quantization: str = "none"):
        from ..serving.quantization import load_quantized
        from ..tokenizers.bundle import Tokenizers
        from ..training.collate import Collator, ItemImages, render_context

        self.run_dir = Path(run_dir)
        self.domain = domain
        self.tok = Tokenizers(self.run_dir)
        self.model = load_quantized(self.run_dir, quantization, dtype=dtype or torch.float32)
        cfg = self.model.config
        self.images = ItemImages(domain, cfg.vision_config.image_size) if cfg.vision_config is not None else None
        self.ctx = render_context(self.tok, domain, cfg, max_tokens)
        self.collator = Collator(self.ctx, self.images, cfg)

    def prompt(self, messages_json: str):
        from ..instructions.chat import render

        return render(json.loads(messages_json)[:1], self.ctx, add_generation_prompt=True)

    def batch(self, encoded, left: bool = False) -> dict[str, torch.Tensor]:
        b = self.collator.batch(encoded)
        if left:  # generation wants the prompts to end at the same column
            ids, mask = b["input_ids"], b["attention_mask"]
            lengths = mask.sum(1)
            for r in range(len(ids)):
                n = int(lengths[r])
                ids[r] = torch.cat([ids[r, n:], ids[r, :n]])
                mask[r] = torch.cat([mask[r, n:], mask[r, :n]])
        b.pop("labels", None)
        return b

    @torch.no_grad()
    def answer_logits(self, encoded) -> torch.Tensor:
        b = self.batch(encoded)
        out = self.model(**b)
        last = b["attention_mask"].sum(1) - 1
        return out.logits[torch.arange(len(last)), last].float()

    def first_token(self, text: str) -> int:
        return self.tok.text.encode(text, add_special_tokens=False)[0]


def score_catalogue(run: LoadedRun, enc: list, exclude: list[list[int]] | None = None) -> torch.Tensor:
    """(B, n_items) scores of every item as the answer to each encoded prompt: atomic and content ids
    through the ranking head in one pass; semantic ids as each item's exact code-sequence log-probability."""
    if run.model.config.item_mode == "semantic":
        from ..foundation.generation import score_semantic_items

        b = run.batch(enc, left=True)
        return score_semantic_items(run.model, run.tok.items, b["input_ids"], b["attention_mask"], b.get("pixel_values"),
                                    exclude=exclude)
    b = run.batch(enc)
    return run.model.score_items(b["input_ids"], b["attention_mask"], b.get("pixel_values"), b.get("content_item_ids"),
                                 exclude=exclude)


def _batches(rows, size):
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def ranking_scores(run: LoadedRun, rows: list[dict], masked: dict[str, list[str]], batch_size: int = 16,
                   progress: bool = True, id_sequence: int = 0):
    """For each batch of rows: (rows, (B, n_items) scores of the full catalogue with every item of the
    user's history (`masked[user_id]`, not only the items the prompt shows) at -inf, target item
    indices). With `id_sequence` > 0, each row is asked in the identifier-only view instead: the
    newest `id_sequence` history items."""
    from ..instructions.chat import id_sequence_prompt

    items = run.tok.items
    for chunk in tqdm(list(_batches(rows, batch_size)), desc="next item", disable=not progress):
        if id_sequence:
            enc = [id_sequence_prompt(masked[r["user_id"]][-id_sequence:], run.ctx) for r in chunk]
        else:
            enc = [run.prompt(r["messages"]) for r in chunk]
        histories = [masked[r["user_id"]] for r in chunk]
        exclude = [[items.index(i) for i in h if i in items] for h in histories]
        yield chunk, score_catalogue(run, enc, exclude), np.asarray([items.index(r["target"]) for r in chunk])


def id_view_logprobs(run: LoadedRun, rows: list[dict], masked: dict[str, list[str]], length: int,
                     batch_size: int = 16, progress: bool = True) -> dict[str, torch.Tensor]:
    """user_id -> (n_items,) log-probabilities of the next item in the identifier-only view (the newest
    `length` history items), the user's history at -inf: one pass per user of `rows`."""
    first = list({r["user_id"]: r for r in rows}.values())
    out = {}
    for chunk, scores, _ in ranking_scores(run, first, masked, batch_size, progress, id_sequence=length):
        for r, s in zip(chunk, torch.log_softmax(scores.float(), -1)):
            out[r["user_id"]] = s
    return out


def eval_ranking(run: LoadedRun, rows: list[dict], masked: dict[str, list[str]], batch_size: int = 16,
                 progress: bool = True, id_sequence: int = 0, among: list[int] | None = None,
                 id_view: dict[str, torch.Tensor] | None = None, weights=None):
    """0-based rank of each row's target in the full catalogue ranking (`ranking_scores`). With `among`
    (catalogue indices, each target one of them), the pair (those ranks, the ranks among these items
    alone) from the same pass. With `id_view` (`id_view_logprobs`) and `weights`: {weight: that result
    for the prompt fused with the identifier view at that weight (`fused_scores`; 0: the prompt alone)},
    every weight from one pass over the prompts."""
    subset = np.asarray(among if among is not None else [], dtype=np.int64)
    ws = list(weights) if id_view is not None and weights is not None else [0.0]
    ranks, within = {w: [] for w in ws}, {w: [] for w in ws}
    for chunk, scores, targets in ranking_scores(run, rows, masked, batch_size, progress, id_sequence):
        view = torch.stack([id_view[r["user_id"]] for r in chunk]) if id_view is not None and weights is not None else None
        for w in ws:
            s = (fused_scores(scores, view, w) if view is not None and w else scores).numpy()
            ranks[w] += M.target_ranks(s, targets).tolist()
            if among is not None:
                within[w] += M.ranks_within(s, targets, subset).tolist()
    out = {w: ((ranks[w], within[w]) if among is not None else ranks[w]) for w in ws}
    return out if id_view is not None and weights is not None else out[0.0]


def eval_options(run: LoadedRun, rows: list[dict], options: list[str], batch_size: int = 16) -> np.ndarray:
    """(n, len(options)) answer-position logits of each option's first token."""
    ids = [run.first_token(o) for o in options]
    out = []
    for chunk in _batches(rows, batch_size):
        logits = run.answer_logits([run.prompt(r["messages"]) for r in chunk])
        out.append(logits[:, ids].numpy())
    return np.concatenate(out) if out else np.zeros((0, len(options)))


def eval_candidates(run: LoadedRun, rows: list[dict], batch_size: int = 16) -> list[bool]:
    """Is the best-scored candidate the target? (scored as in full ranking, over the candidates alone)"""
    items = run.tok.items
    hits = []
    for chunk in _batches(rows, batch_size):
        enc = [run.prompt(r["messages"]) for r in chunk]
        cands = [[p["item_id"] for p in json.loads(r["messages"])[0]["content"] if p.get("view") == "full"] for r in chunk]
        scores = score_catalogue(run, enc)
        for k, (r, cs) in enumerate(zip(chunk, cands)):
            s = [float(scores[k, items.index(c)]) for c in cs]
            hits.append(cs[int(np.argmax(s))] == r["target"])
    return hits


@torch.no_grad()
def eval_generate(run: LoadedRun, rows: list[dict], max_new_tokens: int = 48, batch_size: int = 16,
                  progress: bool = True) -> list[str]:
    end = run.tok.text.convert_tokens_to_ids("<|end|>")
    texts = []
    for chunk in tqdm(list(_batches(rows, batch_size)), desc="generate", disable=not progress):
        b = run.batch([run.prompt(r["messages"]) for r in chunk], left=True)
        out = run.model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                                 pad_token_id=run.tok.text.pad_token_id)
        texts += run.tok.text.batch_decode(out[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


@torch.no_grad()
def eval_images(run: LoadedRun, rows: list[dict], seed: int = 0, batch_size: int = 16) -> list[dict]:
    """Sampled images' attributes (pixel checker) for each row."""
    from ..data.synthetic import check_image
    from ..foundation.generation import generate_image_codes

    out = []
    for k, chunk in enumerate(_batches(rows, batch_size)):
        b = run.batch([run.prompt(r["messages"]) for r in chunk], left=True)
        codes = generate_image_codes(run.model, b["input_ids"], attention_mask=b["attention_mask"],
                                     pixel_values=b.get("pixel_values"), seed=seed + k)
        out += [check_image(im) for im in run.tok.vq.decode_to_pil(codes)]
    return out


def _by_template(rows, values, fn) -> dict:
    out = {}
    for flag, name in ((False, "seen"), (True, "held_out")):
        sel = [v for r, v in zip(rows, values) if r["held_out"] == flag]
        if sel:
            out[name] = fn(sel)
    return out


def _id_sequence_length(run_dir: Path) -> int:
    """The id_sequence chunk length the run (or the run it was tuned from) trained with; 0 if none."""
    import yaml

    for _ in range(4):
        cfg_file = run_dir / "train_config.yaml"
        if not cfg_file.is_file():
            return 0
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        if cfg.get("id_sequence"):
            return int(cfg["id_sequence"])
        if not cfg.get("init_from"):
            return 0
        run_dir = Path(cfg["init_from"])
    return 0


def _fusion_weights(asked, config) -> list[float]:
    """The identifier-view weights to report fused rankings at: those asked for, else the run's own."""
    if asked is None:
        asked = getattr(config, "id_view_weight", 0.0) or []
    weights = [float(w) for w in (asked if isinstance(asked, (list, tuple)) else [asked])]
    if any(w < 0 for w in weights):
        raise ValueError(f"id_view_weight must be 0 or more, got {weights}")
    return sorted({w for w in weights if w > 0})


def _cold_settings(run_dir: Path) -> dict:
    """The cold draw a run was trained without, from its run.json; an error if it trained on them."""
    info = run_dir / "run.json"
    trained = json.loads(info.read_text()).get("split", {}) if info.is_file() else {}
    if trained.get("name") != "cold_items":
        raise ValueError(f"{run_dir} was trained on split {trained.get('name', 'leave_one_out')!r}, so the cold items "
                         "were in its training data; evaluate the cold-item split on a run trained with split cold_items")
    return trained


def eval_rows(domain, split, stage: str, tasks, max_users: int | None, seed: int, templates: str = "first"):
    """The evaluation prompts by task (`build_eval_examples`); templates "first": the first seen and the first
    held-out template of each task only."""
    from ..instructions.examples import build_eval_examples

    rows = list(build_eval_examples(domain, split, stage=stage, tasks=tasks, max_users=max_users, seed=seed))
    if templates == "first":
        keep = {}
        for r in rows:
            keep.setdefault((r["task"], r["held_out"]), r["template_id"])
        rows = [r for r in rows if keep[(r["task"], r["held_out"])] == r["template_id"]]
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    return by_task


def text_baselines(split, by_task: dict) -> dict:
    """The untrained baselines of the rating and text tasks in `by_task`: `rating_user_item_mean` (RMSE, MAE),
    and BLEU-4 and ROUGE of the two retrieval baselines, `<task>_retrieval` (the most similar training review)
    and `<task>_item_latest` (the item's latest). Each retrieval runs once over every text task's requests."""
    out = {}
    if by_task.get("rating"):
        rs = by_task["rating"]
        base, truth = bias_rating_baseline(split, rs), [float(r["answer"]) for r in rs]
        out["rating_user_item_mean"] = {"rmse": M.rmse(base, truth), "mae": M.mae(base, truth)}
    tasks = [t for t in ("explanation", "review") if by_task.get(t)]
    rows = [r for t in tasks for r in by_task[t]]
    for name, baseline in (("retrieval", similar_review_baseline), ("item_latest", latest_item_review_baseline)):
        answers = iter(baseline(split, rows) if rows else [])
        for t in tasks:
            base = [next(answers) for _ in by_task[t]]
            refs = [r["answer"] for r in by_task[t]]
            out[f"{t}_{name}"] = {"bleu4": M.bleu4(base, refs), **M.rouge(base, refs)}
    return out


def _rating_metrics(values) -> dict:
    """RMSE and MAE at each answer distribution's mean, and MAE at its median."""
    mean, median, truth = (list(c) for c in zip(*values))
    return {"rmse": M.rmse(mean, truth), "mae": M.mae(mean, truth), "mae_median": M.mae(median, truth)}


def evaluate(run_dir: str | Path, domain_dir: str | Path, tasks=None, stage: str = "test", max_users: int | None = None,
             templates: str = "first", batch_size: int = 16, seed: int = 0, progress: bool = True,
             quantization: str = "none", split: str = "leave_one_out", id_view_weight=None) -> dict:
    """Metrics of every task (seen vs held-out templates) and the baselines, as a dict. With split
    "cold_items" (a run trained with that split): next-item prediction of each user's first cold item
    from the warm items before it, full ranking over every item, against a random ranking.

    A run with an identifier view (`id_sequence` > 0) also reports that view, and the prompts' ranking
    fused with it (`fused_scores`) at `id_view_weight` (a number or a list; None: the run's own
    `id_view_weight`, where it is above 0) under `next_item_fused`."""
    from ..data import load_domain, make_split
    from ..instructions.examples import TASKS

    domain = load_domain(domain_dir)
    split_name = split
    if split_name == "cold_items":
        cold = _cold_settings(Path(run_dir))
        split = make_split(domain, "cold_items", cold["cold_fraction"], cold["cold_seed"])
        if tasks and set(tasks) - {"next_item"}:
            raise ValueError("the cold-item split evaluates next_item only")
        tasks, stage = ["next_item"], "test"
    else:
        split = make_split(domain, split_name)
    run = LoadedRun(run_dir, domain, quantization=quantization)
    tasks = list(tasks or TASKS)
    if run.tok.vq is None or run.model.config.image_codebook_size == 0:
        tasks = [t for t in tasks if t != "image_generation"]
    if run.model.config.vision_config is None:
        tasks = [t for t in tasks if t != "which_image"]
    by_task = eval_rows(domain, split, stage, tasks, max_users, seed, templates)
    examples = split.valid if stage == "valid" else split.test
    if max_users is not None:
        examples = examples.select(range(min(max_users, len(examples))))
    report: dict = {"run": str(run_dir), "domain": domain.name, "split": split_name, "stage": stage,
                    "users": len(examples), "seed": seed,
                    "item_mode": run.model.config.item_mode, "fusion": run.model.config.fusion,
                    "vision": run.model.config.vision_config is not None, "tasks": {}, "baselines": {}, "per_example": {}}
    T = report["tasks"]
    if "next_item" in by_task:
        rs = by_task["next_item"]
        masked = {e["user_id"]: list(e["history"]) for e in examples}
        cold = split_name == "cold_items"
        # new items: also each target's rank among the new items alone (the item cold-start protocol)
        among = [run.tok.items.index(i) for i in split.cold_items] if cold else None
        length = _id_sequence_length(Path(run_dir))
        weights = _fusion_weights(id_view_weight, run.model.config) if length else []
        # the identifier view of each user's history, once: reported on its own and fused with the prompts
        id_view = id_view_logprobs(run, rs, masked, length, batch_size, progress) if length else None
        if weights:
            by_weight = eval_ranking(run, rs, masked, batch_size, progress, among=among, id_view=id_view,
                                     weights=[0.0, *weights])
            ranks = by_weight.pop(0.0)
        else:
            ranks, by_weight = eval_ranking(run, rs, masked, batch_size, progress, among=among), {}
        if cold:
            ranks, ranks_new = ranks
            T["next_item_among_new"] = _by_template(rs, ranks_new, M.ranking_metrics)
            report["per_example"]["next_item_among_new"] = [
                {"user_id": r["user_id"], "held_out": r["held_out"], "rank": k} for r, k in zip(rs, ranks_new)]
        T["next_item"] = _by_template(rs, ranks, M.ranking_metrics)
        report["per_example"]["next_item"] = [{"user_id": r["user_id"], "held_out": r["held_out"], "target": r["target"],
                                               "rank": k} for r, k in zip(rs, ranks)]
        for w, fused in by_weight.items():  # the prompt's ranking fused with the identifier view (`fused_scores`)
            key = f"{w:g}"
            if cold:
                fused, fused_new = fused
                T.setdefault("next_item_among_new_fused", {})[key] = _by_template(rs, fused_new, M.ranking_metrics)
            T.setdefault("next_item_fused", {})[key] = _by_template(rs, fused, M.ranking_metrics)
            report["per_example"].setdefault("next_item_fused", {})[key] = [
                {"user_id": r["user_id"], "held_out": r["held_out"], "rank": k} for r, k in zip(rs, fused)]
        if id_view is not None:  # the view pretraining taught, one row per user
            first = [r for r in rs if r["template_id"] == rs[0]["template_id"]]
            seq_ranks, seq_new = [], []
            for chunk in _batches(first, 256):  # a few users at a time: users x items would not fit for a large catalogue
                view = torch.stack([id_view[r["user_id"]] for r in chunk]).numpy()
                targets = np.asarray([run.tok.items.index(r["target"]) for r in chunk])
                seq_ranks += M.target_ranks(view, targets).tolist()
                if cold:
                    seq_new += M.ranks_within(view, targets, np.asarray(among, dtype=np.int64)).tolist()
            if cold:
                T["next_item_among_new"]["id_sequence"] = M.ranking_metrics(seq_new)
            T["next_item"]["id_sequence"] = M.ranking_metrics(seq_ranks)
            report["per_example"]["next_item_id_sequence"] = [{"user_id": r["user_id"], "rank": k}
                                                              for r, k in zip(first, seq_ranks)]
        catalogue = domain.item_ids  # read once: each read of the property materialises the column
        pop = popularity_ranks(split, list(examples), catalogue)
        report["baselines"]["popularity"] = M.ranking_metrics(pop)
        report["per_example"]["popularity"] = [{"user_id": e["user_id"], "rank": k} for e, k in zip(examples, pop)]
        position = {i: k for k, i in enumerate(catalogue)}
        profile = content_profile_ranks(domain, list(examples), catalogue,
                                        among=[position[i] for i in split.cold_items] if cold else None)
        if cold:
            profile, profile_new = profile
            report["baselines_among_new"] = {
                "content_profile": M.ranking_metrics(profile_new),
                "random": M.random_ranking_metrics([len(split.cold_items)] * len(examples))}
            report["cold_items"] = len(split.cold_items)
            report["baselines"]["random"] = M.random_ranking_metrics(
                [len(catalogue) - len(set(e["history"])) for e in examples])
        report["baselines"]["content_profile"] = M.ranking_metrics(profile)
        report["per_example"]["content_profile"] = [{"user_id": e["user_id"], "target": e["target"], "rank": k}
                                                    for e, k in zip(examples, profile)]
        if domain.generator is not None:  # the oracle on exactly these examples
            from ..data.oracle import oracle_metrics

            report["baselines"]["oracle"] = oracle_metrics(domain.generator, examples)
            report["baselines"]["text_only_oracle"] = oracle_metrics(domain.generator, examples, text_only=True)
    if "pick_candidate" in by_task:
        rs = by_task["pick_candidate"]
        hits = eval_candidates(run, rs, batch_size)
        T["pick_candidate"] = _by_template(rs, hits, lambda v: {"accuracy": float(np.mean(v))})
        report["baselines"]["pick_candidate_random"] = {"accuracy": 1.0 / 10}
    if "yes_no" in by_task:
        rs = by_task["yes_no"]
        logits = eval_options(run, rs, ["yes", "no"], batch_size)
        vals = list(zip(logits[:, 0] - logits[:, 1], [r["answer"] == "yes" for r in rs]))
        T["yes_no"] = _by_template(rs, vals, lambda v: {
            "accuracy": M.accuracy([s > 0 for s, _ in v], [y for _, y in v]), "auc": M.auc([s for s, _ in v], [y for _, y in v])})
        report["baselines"]["yes_no_popularity"] = popularity_yes_no(split, rs)
    if "which_image" in by_task:
        rs = by_task["which_image"]
        logits = eval_options(run, rs, ["A", "B"], batch_size)
        hits = [("A" if a > b else "B") == r["answer"] for (a, b), r in zip(logits, rs)]
        T["which_image"] = _by_template(rs, hits, lambda v: {"accuracy": float(np.mean(v))})
    if "rating" in by_task:
        rs = by_task["rating"]
        logits = torch.tensor(eval_options(run, rs, ["1", "2", "3", "4", "5"], batch_size))
        probs = logits.softmax(-1).numpy()
        expected = probs @ np.arange(1, 6)
        median = M.distribution_median(probs, np.arange(1, 6))  # the point of least expected absolute error
        vals = list(zip(expected, median, [float(r["answer"]) for r in rs]))
        T["rating"] = _by_template(rs, vals, _rating_metrics)
    for task in ("explanation", "review"):
        if task in by_task:
            rs = by_task[task]
            preds = eval_generate(run, rs, batch_size=batch_size, progress=progress)
            vals = list(zip(preds, [r["answer"] for r in rs]))
            T[task] = _by_template(rs, vals, lambda v: {"bleu4": M.bleu4(*map(list, zip(*v))), **M.rouge(*map(list, zip(*v)))})
            report["per_example"][task] = [{"user_id": r["user_id"], "held_out": r["held_out"], "prediction": p,
                                            "reference": r["answer"]} for r, p in zip(rs, preds)]
    report["baselines"].update(text_baselines(split, by_task))
    if "image_generation" in by_task and domain.generator is not None:
        rs = by_task["image_generation"]
        seen_attrs = eval_images(run, rs, seed=seed, batch_size=batch_size)
        gen = domain.generator
        rng = np.random.default_rng(seed)
        train_items = sorted({i for s in split.train["item_ids"] for i in s})
        random_attrs = [_item_image_attrs(gen, train_items[int(rng.integers(len(train_items)))]) for _ in rs]
        T["image_generation"] = _by_template(rs, [(r, a) for r, a in zip(rs, seen_attrs)],
                                             lambda v: _preference_hits(gen, v))
        report["baselines"]["image_generation_unpersonalized"] = _preference_hits(gen, list(zip(rs, random_attrs)))
    return report


def _item_image_attrs(gen: dict, item_id: str) -> dict:
    return {a: gen["attribute_values"][a][gen["item_attributes"][a][int(item_id)]] for a in gen["image_attributes"]}


def _preference_hits(gen: dict, pairs) -> dict[str, float]:
    """Share of images whose colour/shape/pattern is one of the user's persona's favourites."""
    out = {}
    for a in gen["image_attributes"]:
        hits = []
        for r, attrs in pairs:
            k = gen["user_persona"][int(r["user_id"])]
            fav = {gen["attribute_values"][a][v] for v, w in enumerate(gen["persona_weights"][a][k]) if w > 0}
            hits.append(attrs.get(a) in fav)
        out[f"{a}_hit"] = float(np.mean(hits)) if hits else float("nan")
    out["drawable"] = float(np.mean([attrs.get("colour") is not None for _, attrs in pairs])) if pairs else float("nan")
    return out


def save_report(report: dict, out_dir: str | Path) -> Path:
    """eval.json + eval.png (next-item metrics against baselines) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    nxt = report["tasks"].get("next_item")
    if nxt:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names, hr, nd = [], [], []
        for name, m in [(f"recfm ({k})", v) for k, v in nxt.items()] + list(
                (k, v) for k, v in report["baselines"].items() if isinstance(v, dict) and "hr@10" in v):
            names.append(name.replace("_", " "))
            hr.append(m["hr@10"])
            nd.append(m["ndcg@10"])
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(x - 0.2, hr, 0.4, label="HR@10")
        ax.bar(x + 0.2, nd, 0.4, label="NDCG@10")
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_title(f"next item, full ranking ({report['domain']}, {report['stage']})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "eval.png", dpi=120)
        plt.close(fig)
    return out
