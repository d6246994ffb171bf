"""The model runner: one flattened batch of prefill chunks and decode tokens per step, through the
backbone's own modules.

Input embeddings are the language model's token embeddings with, where a prompt position stands for
something else, that thing's vector: projected image features at <image> placeholders (early
fusion), the item encoder's vector at content-mode <item> placeholders. Those vectors are computed
once per request when it is first scheduled; image features come from an image-embedding cache
keyed by the image's hash, so a catalogue image is encoded once for all requests. In cross-attention
mode the decoder's gated cross-attention blocks get each token's image index, as in a full forward
pass. The decoder runs as `decoder.FastDecoder` (plain tensor code over the same weights, q/k/v and
gate/up fused) when it knows the architecture, otherwise through the language model's own modules
with the paged attention in `attention.py` registered in transformers' attention interface.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import attention
from .decoder import FastDecoder, unsupported
from .kv_cache import KVCache, kv_spec
from .sequence import Request, Sequence


@dataclass
class RequestEmbeds:
    positions: torch.Tensor  # (M,) prompt positions whose input vector is replaced, sorted
    vectors: torch.Tensor  # (M, d)
    feats: torch.Tensor | None = None  # cross-attention: (n_img, image_tokens, d)
    token_image: torch.Tensor | None = None  # cross-attention: (prompt_len,) image index or -1


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, image_cache_size: int = 4096, fast: bool = True,
                 native_attention: bool = True):
        self.model = model
        self.cfg = model.config
        self.lm = model.model.language_model
        self.lm.config._attn_implementation = attention.register()
        spec = kv_spec(model)
        self.device, self.dtype = spec["device"], spec["dtype"]
        fused = None
        if native_attention and self.dtype == torch.bfloat16 and torch.device(self.device).type == "cpu":
            from . import native

            fused = native.norm_rope()
        self.fast = FastDecoder(self.lm, model.model.cross_attn, model.lm_head, fused) \
            if fast and unsupported(self.lm) is None else None
        self.cache = KVCache(spec["num_layers"], num_blocks, block_size, spec["kv_heads"], spec["head_dim"],
                             spec["dtype"], spec["device"])
        self.block_size = block_size
        self.native = None  # decode attention in place from the cache (fp32 or bf16 CPU cache)
        if native_attention and self.dtype in (torch.float32, torch.bfloat16) and torch.device(self.device).type == "cpu":
            from . import native

            self.native = native.paged_decode()
        self.image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.image_cache_size = image_cache_size
        self.image_hits = self.image_misses = 0
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def _scratch(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat buffers for n_tokens gathered keys and values, grown (never shrunk) as needed."""
        k = self.cache.k[0]
        need = n_tokens * k.shape[2] * k.shape[3]
        if self._gathered is None or self._gathered[0].numel() < need:
            size = max(need, 2 * (0 if self._gathered is None else self._gathered[0].numel()))
            self._gathered = (torch.empty(size, dtype=k.dtype, device=k.device), torch.empty(size, dtype=k.dtype, device=k.device))
        return self._gathered

    # --- per request ----------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, req: Request) -> None:
        """Vectors for a request's image and item placeholders (once, on first schedule)."""
        if req.embeds is not None:
            return
        cfg, prompt = self.cfg, req.prompt
        d = cfg.text_config.hidden_size
        dtype = self.dtype
        positions, vectors = [], []
        feats = self.image_features(prompt.images) if prompt.images else None
        if feats is not None and cfg.fusion == "early":
            for (start, _, _), f in zip(prompt.images, feats):
                positions += range(start, start + len(f))
                vectors.append(f)
        if prompt.content:
            model = self.model.model
            idx = torch.tensor([i for _, i in prompt.content], device=self.device)
            positions += [p for p, _ in prompt.content]
            vectors.append(model.item_embeddings(idx).to(dtype))
        emb = RequestEmbeds(torch.empty(0, dtype=torch.long), torch.empty(0, d, dtype=dtype))
        if positions:
            pos = torch.tensor(positions, dtype=torch.long)
            order = torch.argsort(pos)
            emb = RequestEmbeds(pos[order], torch.cat(vectors).to(dtype)[order.to(self.device)])
        if feats is not None and cfg.fusion == "cross_attention":
            emb.feats = feats
            emb.token_image = req.token_image  # computed once, when the request was added
        req.embeds = emb

    def image_features(self, images) -> torch.Tensor:
        """(n, image_tokens, d) projected features, from the cache where the key is known."""
        model = self.model.model
        missing = [(k, px) for _, k, px in images if k not in self.image_cache]
        self.image_hits += len(images) - len(missing)
        self.image_misses += len(missing)
        if missing:
            unknown = [k for k, px in missing if px is None]
            if unknown:
                raise KeyError(f"image {unknown[0]} is neither cached nor given")
            pixels = torch.stack([px for _, px in missing]).to(self.device)
            feats = model.encode_images(model.normalize_pixels(pixels))
            for (k, _), f in zip(missing, feats):
                self.image_cache[k] = f
        out = []
        for _, k, _ in images:
            self.image_cache.move_to_end(k)
            out.append(self.image_cache[k])
        while len(self.image_cache) > self.image_cache_size:
            self.image_cache.popitem(last=False)
        return torch.stack(out).to(self.dtype)

    # --- one step -------------------------------------------------------------------------------

    @torch.no_grad()
    def execute(self, chunks: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor, torch.Tensor]:
        """Run the scheduled chunks; return the sequences that reached their last token (to be sampled
        or scored), their last hidden states (len, d) and next-token logits (len, vocab)."""
        bs = self.block_size
        ids, pos, slots = [], [], []
        decode_rows, decode_seqs, prefills, sample_rows, sample_seqs = [], [], [], [], []
        overrides = []  # (row offset, request, first position, n)
        xattn = []  # (row offset, request, first position, n)
        for seq, n in chunks:
            start = seq.num_computed
            row = len(ids)
            ids += seq.tokens[start : start + n]
            p = range(start, start + n)
            pos += p
            table = seq.block_table
            slots += [table[i // bs] * bs + i % bs for i in p]
            end = start + n
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_seqs.append(seq)
            elif start == 0:
                prefills.append(attention.PrefillChunk(row, row + n, None))
            else:
                blocks = torch.tensor(table[: -(-end // bs)], dtype=torch.long)
                mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
                prefills.append(attention.PrefillChunk(row, row + n, blocks, end, mask))
            if end == len(seq.tokens):
                sample_rows.append(row + n - 1)
                sample_seqs.append(seq)
            req = seq.request
            if start < seq.prompt_len and req.embeds is not None:
                if len(req.embeds.positions):
                    overrides.append((row, req, start, min(end, seq.prompt_len)))
                if req.embeds.feats is not None:
                    xattn.append((row, req, start, min(end, seq.prompt_len)))
        meta = attention.PagedMetadata(self.cache.k, self.cache.v, torch.tensor(slots, dtype=torch.long), prefills=prefills)
        if decode_rows:
            lengths = [s.num_computed + 1 for s in decode_seqs]
            width = -(-max(lengths) // bs)
            tables = torch.tensor([s.block_table[:width] + [0] * (width - len(s.block_table)) for s in decode_seqs],
                                  dtype=torch.long)
            # decode-first batches put every decode token first: a slice (views) instead of gathered rows
            nd = len(decode_rows)
            meta.decode_rows = slice(0, nd) if decode_rows[-1] == nd - 1 else torch.tensor(decode_rows, dtype=torch.long)
            meta.decode_blocks = tables
            if self.native is not None:
                meta.native, meta.decode_lengths = self.native, torch.tensor(lengths, dtype=torch.long)
            else:
                meta.decode_mask = (torch.arange(width * bs)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
                meta.scratch = self._scratch(tables.numel() * bs)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        embeds = self.lm.get_input_embeddings()(input_ids)
        for row, req, lo, hi in overrides:
            e = req.embeds
            a, b = torch.searchsorted(e.positions, torch.tensor([lo, hi])).tolist()
            if b > a:
                embeds[row + e.positions[a:b] - lo] = e.vectors[a:b]
        model = self.model.model
        ctx = None
        if xattn:
            feats, token_image = [], torch.full((len(ids),), -1, dtype=torch.long)
            base = 0
            for row, req, lo, hi in xattn:
                ti = req.embeds.token_image[lo:hi]
                token_image[row : row + hi - lo] = torch.where(ti >= 0, ti + base, -1)
                feats.append(req.embeds.feats)
                base += len(req.embeds.feats)
            ctx = (torch.cat(feats), token_image[None].to(self.device))
        positions = torch.tensor(pos, device=self.device)
        if self.fast is not None:
            last = self.fast(embeds, positions, meta, ctx)
        else:
            model._xattn_ctx = ctx
            try:
                last = self.lm(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False,
                               paged=meta).last_hidden_state[0]
            finally:
                model._xattn_ctx = None
        if not sample_rows:
            return [], torch.empty(0), torch.empty(0)
        hidden = last if len(sample_rows) == len(ids) else last[sample_rows]  # a decode-only step samples every row
        return sample_seqs, hidden, (self.fast.logits if self.fast is not None else self.model.lm_head)(hidden)
