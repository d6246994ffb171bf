"""A trained run, loaded for serving: the model, its tokenizers, the catalogue it talks about, and the
engine. Everything that turns a request's content into engine input lives here, so the HTTP server,
`recfm chat` and Python callers build prompts the same way (through `recfm.instructions.chat.render`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..foundation.generation import fused_scores
from ..instructions.chat import Item, PromptTooLong, id_sequence_prompt, render
from ..instructions.templates import fill, load_templates
from ..tokenizers.images import DEFAULT_MAX_PIXELS, ImageError, to_pixels
from .constraints import ImageGridConstraint, ItemConstraint
from .engine import Engine, EngineConfig
from .sequence import Prompt, SamplingParams

ID_SEQUENCE = "id_sequence"  # the `template` of /v1/recommendations that asks in the identifier-only view


class BadInput(ValueError):
    """Something in a request that cannot be served; `param` names where it is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Service:
    def __init__(self, run_dir: str | Path, data: str | Path | None = None, engine_config: EngineConfig | None = None,
                 dtype: torch.dtype = torch.float32, model_id: str | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 allowed_image_dirs: list[str | Path] = (), quantization: str = "none"):
        from ..data.domain import Domain
        from ..foundation import RecFMForCausalLM
        from ..tokenizers.bundle import Tokenizers
        from ..training.collate import ItemImages, content_catalogue, domain_catalogue, render_context

        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.run_dir} is not a recfm run folder: it has no config.json")
        self.model_id = model_id or self.run_dir.name
        self.tok = Tokenizers(self.run_dir)
        from .quantization import check

        check(quantization)  # before anything is loaded: an option this machine cannot run fails here
        self.model = RecFMForCausalLM.from_pretrained(self.run_dir, dtype=dtype).eval()
        cfg = self.model.config
        if data is None:
            info = self.run_dir / "run.json"
            data = json.loads(info.read_text()).get("domain") if info.is_file() else None
        self.domain = Domain(data) if data and Path(data).exists() else None
        size = cfg.vision_config.image_size if cfg.vision_config is not None else 0
        self.image_size = size
        self.item_images = ItemImages(self.domain, size) if self.domain is not None and size else None
        self.catalogue: dict[str, Item] = domain_catalogue(self.domain) if self.domain is not None else {}
        # item ids the model has identifiers for (the catalogue may hold more)
        self.catalogue = {k: v for k, v in self.catalogue.items() if k in self.tok.items} or self.catalogue
        if cfg.item_mode == "content" and self.domain is not None:
            content_catalogue(self.model, self.tok, self.domain, self.item_images)
        self.quantization = {"option": "none"}
        if quantization != "none":  # after the content catalogue is in: it is read in full precision
            from .quantization import quantize

            self.quantization = quantize(self.model, quantization)
        self.engine = Engine(self.model, self.tok.text, engine_config)
        self.ctx = render_context(self.tok, self.domain, cfg, self.engine.max_model_len - 1) if self.domain is not None \
            else _bare_context(self.tok, cfg, self.engine.max_model_len - 1)
        self.max_image_pixels = max_image_pixels
        self.allowed_image_dirs = [Path(d).resolve() for d in allowed_image_dirs]
        self.end_id = self.tok.text.convert_tokens_to_ids("<|end|>")
        self.templates = {t.id: t for ts in load_templates().values() for t in ts}

    # --- content -> engine input ----------------------------------------------------------------

    def image_pixels(self, url: str, where: str) -> tuple[str, torch.Tensor]:
        """(key, uint8 (3, S, S)) for an image_url: a data URL, or a file under an allow-listed folder."""
        if not self.image_size:
            raise BadInput("this model has no vision tower: send no images", where)
        src = url
        if not url.startswith("data:"):
            path = Path(url.removeprefix("file://")).resolve() if not url.split(":", 1)[0] in ("http", "https", "ftp") else None
            if path is None or not any(path.is_relative_to(d) for d in self.allowed_image_dirs):
                raise BadInput("only data: URLs are accepted for images (no URL is fetched and no file is read unless "
                               "the server was started with --allowed-image-dir for it)", where)
            src = path
        try:
            px = to_pixels(src, self.image_size, self.max_image_pixels)
        except ImageError as e:
            raise BadInput(f"bad image: {e}", where) from None
        return "sha256:" + hashlib.sha256(px.numpy().tobytes()).hexdigest(), px

    def check_item(self, item_id: str, where: str) -> None:
        if item_id not in self.catalogue:
            raise BadInput(f"unknown item {item_id!r}: not in this model's catalogue", where)

    def prompt(self, messages: list[dict], images: dict[str, torch.Tensor] | None = None) -> tuple[Prompt, object]:
        """Render messages (parts: text, item, image with a key into `images`) into engine input."""
        images = images or {}
        try:
            enc = render(messages, self.ctx, add_generation_prompt=True)
        except PromptTooLong as e:
            raise BadInput(f"{e}: this model's context is {self.engine.max_model_len} tokens", "messages") from None
        except KeyError as e:
            raise BadInput(str(e.args[0]) if e.args else str(e), "messages") from None
        except ValueError as e:
            raise BadInput(str(e), "messages") from None
        if enc.image_refs and not self.image_size:
            raise BadInput("this model has no vision tower: send no images", "messages")
        return self.encoded_prompt(enc, images), enc

    def encoded_prompt(self, enc, images: dict[str, torch.Tensor] | None = None) -> Prompt:
        """Engine input from a rendered prompt; item images come from the catalogue (or the cache)."""
        images = images or {}
        prompt_images = []
        for pos, ref in zip(enc.image_positions, enc.image_refs):
            cached = ref in self.engine.runner.image_cache
            if ref.startswith("item:"):
                px = None if cached else self.item_images(ref.removeprefix("item:"))
            else:
                px = images[ref]
            prompt_images.append((pos, ref, px))
        content = sorted(enc.content_positions)
        return Prompt(enc.input_ids, prompt_images, content)

    def item_params(self, params: SamplingParams, allowed: list[str] | None, exclude: list[str]) -> SamplingParams:
        """Constrain an answer to one item identifier (of `allowed`, minus `exclude`)."""
        items = self.tok.items
        if allowed is None and not exclude:
            params.constraint = ItemConstraint(items, self.end_id)
            return params
        pool = allowed if allowed is not None else items.item_ids
        for i in pool:
            self.check_item(i, "allowed_items")
        skip = set(exclude)
        pool = [i for i in pool if i not in skip]
        if not pool:
            raise BadInput("no items left to choose from after excluding the history", "allowed_items")
        params.constraint = ItemConstraint(items, self.end_id, pool)
        return params

    def image_params(self, params: SamplingParams) -> SamplingParams:
        cfg = self.model.config
        if cfg.image_code_offset < 0 or self.tok.vq is None:
            raise BadInput("this model has no image tokenizer: it cannot generate images", "model")
        n = cfg.image_grid ** 2
        params.constraint = ImageGridConstraint(cfg.img_start_id, cfg.img_end_id, cfg.image_code_offset,
                                                cfg.image_codebook_size, n, self.end_id)
        params.max_tokens = n + 3
        params.ignore_eos = False
        return params

    def decode_item(self, token_ids: list[int]) -> str | None:
        ids = [t for t in token_ids if t != self.end_id]
        if self.model.config.item_mode == "content":
            return None
        return self.tok.items.decode(ids) if ids else None

    def decode_image(self, token_ids: list[int]):
        cfg = self.model.config
        n = cfg.image_grid ** 2
        codes = [t - cfg.image_code_offset for t in token_ids if cfg.image_code_offset <= t < cfg.image_code_offset + cfg.image_codebook_size]
        if len(codes) != n:
            raise RuntimeError(f"expected {n} image codes, got {len(codes)}")
        return self.tok.vq.decode_to_pil(torch.tensor([codes]))[0]

    # --- recommendation-native ------------------------------------------------------------------

    def history_messages(self, history: list, template_id: str, query: str | None = None) -> list[dict]:
        tpl = self.templates.get(template_id)
        if tpl is None:
            raise BadInput(f"unknown template {template_id!r}", "template")
        values = {"history": self.checked_history(history), "query": query or "item"}
        return fill(tpl, values, answer=False)

    def checked_history(self, history: list) -> list[tuple[str, float | None]]:
        """[(item_id, rating)] of a request's history (ids or {"item_id", "rating"}), every item known."""
        hist = []
        for k, h in enumerate(history):
            item_id, rating = (h, None) if isinstance(h, str) else (h.get("item_id"), h.get("rating"))
            self.check_item(str(item_id), f"history[{k}]")
            hist.append((str(item_id), rating))
        if not hist:
            raise BadInput("the history is empty", "history")
        return hist

    def recommend_request(self, history: list, k: int = 10, exclude_seen: bool = True,
                          allowed_items: list[str] | None = None, template: str = "next-1",
                          id_view_weight: float | None = None):
        """(requests, finish) for a top-k request that runs through the engine: `requests` is a list of
        (prompt, scorer); when a prompt is computed, its scorer turns the answer position into scores
        of the whole catalogue in the same pass (atomic ids: the item tokens' logits; content ids: the
        ranking head against every item's content vector), and finish(those scores, in order) returns
        [(item_id, score)], best first. A template's prompt is fused with the identifier view of the
        same history at `id_view_weight` (None: the model's own; 0: the prompt alone): two requests,
        the prompt's log-probabilities plus the weight times the view's. Semantic ids need a second
        pass over the code trie, outside the engine (see `recommend`)."""
        cfg, items = self.model.config, self.tok.items
        if cfg.item_mode == "semantic":
            raise ValueError("semantic ids are scored outside the engine: use recommend()")
        weight = self.id_view_weight(id_view_weight, template)
        prompt, excluded, allowed = self._ranking_request(history, exclude_seen, allowed_items, template)
        requests = [(prompt, self._scorer)]
        if weight:
            view, _, _ = self._ranking_request(history, exclude_seen, allowed_items, ID_SEQUENCE)
            requests.append((view, self._scorer))

        def finish(scores: list[torch.Tensor]) -> list[tuple[str, float]]:
            if weight:  # normalised over the items that can be answered, as eval's fusion
                prompt, view = (_masked(s, excluded, allowed) for s in scores)
                return _top_items(items, fused_scores(prompt, view.log_softmax(-1), weight), k, excluded, allowed)
            return _top_items(items, scores[0], k, excluded, allowed)

        return requests, finish

    @torch.no_grad()
    def _scorer(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """A ranking request's answer position as scores of the whole catalogue (atomic ids: the item
        tokens' logits; content ids: the ranking head against every item's content vector)."""
        cfg = self.model.config
        if cfg.item_mode == "atomic":
            return logits[cfg.item_token_offset : cfg.item_token_offset + cfg.n_items].float()
        return (self.model.item_head(hidden) @ self.catalogue_vectors().T).float()

    def item_answer_view(self, mentioned: list[str], allowed_items: list[str] | None, exclude_seen: bool,
                         id_view_weight: float | None = None):
        """For a chat answer constrained to one item: None where nothing is fused (weight 0, no items
        mentioned, or ids other than atomic, where an item is more than one token); else (request,
        to_bias): the identifier view of the items the messages mention (in order) as one engine request
        (prompt, scorer), and to_bias(its scores) -> (token ids, values) for `ItemConstraint.first_bias`:
        the weight times the view's log-probabilities over the items that can be answered. Added to the
        first token's logits, the answer is ranked as /v1/recommendations ranks (`fused_scores`): up to a
        constant, the prompt's log-probabilities plus the weight times the view's."""
        cfg = self.model.config
        if id_view_weight and cfg.item_mode != "atomic":
            raise BadInput(f"fusing the identifier view into a chat answer needs atomic item ids (one token an item); "
                           f"this model has {cfg.item_mode} ids", "id_view_weight")
        weight = self.id_view_weight(id_view_weight, "chat") if cfg.item_mode == "atomic" else 0.0
        if not weight or not mentioned:
            return None
        view, excluded, allowed = self._ranking_request(mentioned, exclude_seen, allowed_items, ID_SEQUENCE)

        def to_bias(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lp = _masked(scores, excluded, allowed).log_softmax(-1)
            keep = torch.isfinite(lp).nonzero().flatten()  # the rest are masked out by the constraint
            return keep + cfg.item_token_offset, weight * lp[keep]

        return (view, self._scorer), to_bias

    def id_view_weight(self, asked: float | None, template: str) -> float:
        """The identifier view's weight in a ranking asked with `template`: 0 for the view itself and
        for models without it; else `asked`, or the model's own `id_view_weight`."""
        cfg = self.model.config
        if template == ID_SEQUENCE or cfg.item_mode == "semantic":
            return 0.0
        weight = cfg.id_view_weight if asked is None else asked
        if weight < 0:
            raise BadInput(f"id_view_weight must be 0 or more, got {weight}", "id_view_weight")
        if weight and not cfg.id_view_length:
            if asked is not None:
                raise BadInput("this model was not trained with an identifier view (id_sequence 0), so id_view_weight "
                               "must be 0", "id_view_weight")
            return 0.0
        return float(weight)

    def catalogue_vectors(self) -> torch.Tensor:
        """Content mode: every item's vector, computed once (the weights do not change while serving)."""
        if getattr(self, "_catalogue_vectors", None) is None:
            with torch.no_grad():
                self._catalogue_vectors = self.model.model.item_embeddings()
        return self._catalogue_vectors

    @torch.no_grad()
    def recommend(self, history: list, k: int = 10, exclude_seen: bool = True, allowed_items: list[str] | None = None,
                  template: str = "next-1", id_view_weight: float | None = None) -> list[tuple[str, float]]:
        """Top-k items for a history, on the calling thread: through the engine (one request) for
        atomic and content ids; for semantic ids, every item's exact code-sequence log-probability
        (`score_semantic_items`: the prompt, then the code trie's inner nodes in one more pass)."""
        from ..foundation.generation import score_semantic_items

        if self.model.config.item_mode != "semantic":
            requests, finish = self.recommend_request(history, k, exclude_seen, allowed_items, template, id_view_weight)
            rids = [f"rec-{id(prompt)}-{n}" for n, (prompt, _) in enumerate(requests)]
            for rid, (prompt, scorer) in zip(rids, requests):
                self.engine.add_request(rid, prompt, SamplingParams(max_tokens=1), scorer=scorer)
            results = {}
            while len(results) < len(rids):
                for out in self.engine.step():
                    if out.request_id in rids and out.finished:
                        results[out.request_id] = out.result
            return finish([results[rid] for rid in rids])
        prompt, excluded, allowed = self._ranking_request(history, exclude_seen, allowed_items, template)
        pix = None
        if prompt.images:
            pix = self.model.model.normalize_pixels(torch.stack([px if px is not None else self.item_images(ref.removeprefix("item:"))
                                                                 for _, ref, px in prompt.images]))
        scores = score_semantic_items(self.model, self.tok.items, torch.tensor([prompt.token_ids]), pixel_values=pix)[0]
        return _top_items(self.tok.items, scores, k, excluded, allowed)

    def _ranking_request(self, history: list, exclude_seen: bool, allowed_items: list[str] | None, template: str):
        """A ranking request's prompt (the template's, or the identifiers alone: the newest
        `id_view_length` of them, the length the view trained on, where the model records it), the item
        indices to leave out (the history) and those allowed (None: all), each item checked."""
        items = self.tok.items
        if template == ID_SEQUENCE:  # identifiers only, as pretraining's id_sequence rows: no template text
            limit = self.model.config.id_view_length
            ids = [i for i, _ in self.checked_history(history)][-limit if limit > 0 else 0 :]
            prompt = self.encoded_prompt(id_sequence_prompt(ids, self.ctx))
        else:
            prompt, _ = self.prompt(self.history_messages(history, template))
        excluded = [items.index(h if isinstance(h, str) else h["item_id"]) for h in history] if exclude_seen else []
        allowed = None
        if allowed_items is not None:
            for i in allowed_items:
                self.check_item(i, "allowed_items")
            allowed = torch.tensor([items.index(i) for i in allowed_items], dtype=torch.long)
        return prompt, excluded, allowed


def _masked(scores: torch.Tensor, excluded: list[int], allowed: torch.Tensor | None) -> torch.Tensor:
    """The scores with `excluded` items and (where `allowed` is given) every item outside it at -inf."""
    scores = scores.float().clone()
    if excluded:
        scores[excluded] = float("-inf")
    if allowed is not None:
        keep = torch.full_like(scores, float("-inf"))
        keep[allowed] = scores[allowed]
        scores = keep
    return scores


def _top_items(items, scores: torch.Tensor, k: int, excluded: list[int], allowed: torch.Tensor | None) -> list[tuple[str, float]]:
    """[(item_id, score)] of the k best items, best first, over `allowed` (all if None) less `excluded`."""
    scores = _masked(scores, excluded, allowed)
    top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
    return [(items.item_id(int(i)), float(v)) for v, i in zip(top.values, top.indices)]


def _bare_context(tok, cfg, max_tokens):
    from ..instructions.chat import RenderContext

    return RenderContext(tokenizer=tok.text, item_tokenizer=tok.items, catalogue={},
                         image_tokens=cfg.image_tokens if cfg.vision_config is not None else 0, max_tokens=max_tokens)

