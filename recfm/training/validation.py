"""Ranking the validation split while a stage trains, to choose its weights there (SASRec's early stopping).

Each validation asks the model for every validation user's next item in the identifier view (the user's
newest training items as identifiers only, `id_sequence_prompt`), ranks the whole catalogue with the
user's training items masked, and returns NDCG@10 and HR@10 over those users. The stage's trainer logs
them as `eval_ndcg@10` / `eval_hr@10`; with `keep_best`, transformers' Trainer keeps the checkpoint of the
best NDCG@10 and ends with its weights. The test split is never read.
"""

from __future__ import annotations

import random

import torch

from ..eval.metrics import ranking_metrics
from ..instructions.chat import id_sequence_prompt


class IdViewValidation:
    """Callable on a model: {"ndcg@10", "hr@10", "users"} on the validation rows (`Split.valid`)."""

    def __init__(self, rows, collator, items, length: int, users: int = 0, seed: int = 0, batch_size: int = 32):
        if length < 1:
            raise ValueError("validation ranks in the identifier view, and this model has none: train it with "
                             "id_sequence > 0, or start from a run that did")
        rows = [r for r in rows if r["target"] in items]
        if users and users < len(rows):  # the same seeded sample at every validation of the run
            rows = sorted(random.Random(seed).sample(rows, users), key=lambda r: r["user_id"])
        if not rows:
            raise ValueError("the validation split has no user to rank (users need 3 or more interactions)")
        self.histories = [list(r["history"]) for r in rows]
        self.targets = [items.index(r["target"]) for r in rows]
        self.exclude = [[items.index(i) for i in h if i in items] for h in self.histories]
        self.collator, self.length, self.batch_size = collator, length, batch_size

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        ranks = []
        try:
            for i in range(0, len(self.targets), self.batch_size):
                sl = slice(i, i + self.batch_size)
                b = self.collator.batch([id_sequence_prompt(h[-self.length:], self.collator.ctx) for h in self.histories[sl]])
                content = b.get("content_item_ids")
                scores = model.score_items(b["input_ids"].to(device), b["attention_mask"].to(device), None,
                                           None if content is None else content.to(device), exclude=self.exclude[sl])
                t = torch.as_tensor(self.targets[sl], device=scores.device)
                target = scores[torch.arange(len(t), device=scores.device), t]
                ranks += (scores > target[:, None]).sum(1).tolist()  # ties count in the target's favour, as recfm eval
        finally:
            model.train(was_training)
        m = ranking_metrics(ranks)  # recfm eval's definitions
        return {"ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"], "users": len(ranks)}
