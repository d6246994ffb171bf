"""Generation helpers: constrained decoding for items and for image code grids.

- `score_semantic_items`: every item's exact log-probability as the answer to each prompt, for
  semantic ids (a code sequence per item): one pass over the prompts, then one pass over the trie's
  inner nodes as a tree (each node sees the prompt and its own ancestors), so ranking is over the
  whole catalogue, not over what a beam happened to keep.
- `beam_items`: top-k items for prompts by beam search constrained to the item trie (works for any
  item mode; kept for callers that want generated sequences).
- `ImageGridProcessor` + `generate_images`: after <|img|>, exactly grid*grid image-code tokens, then
  <|/img|>; nothing else can come out, so every generation decodes to a picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList

from ..tokenizers.trie import TrieLogitsProcessor


@dataclass
class _CodeTree:
    """The inner nodes of the code trie (each distinct code prefix shorter than a full code), parents
    before children: the token a node feeds, its depth (1 = a first code), which nodes it may attend
    to (itself and its ancestors), and for every item the node of each of its proper prefixes."""
    tokens: torch.Tensor  # (N,)
    depth: torch.Tensor  # (N,)
    path: torch.Tensor  # (N, L - 1): the node's ancestors from the root down, then itself, then -1 padding
    prefix_node: np.ndarray  # (n_items, L - 1)


def _code_tree(table: np.ndarray) -> _CodeTree:
    n, levels = table.shape
    node_of: dict[tuple, int] = {}
    tokens, parent, depth = [], [], []
    prefix_node = np.zeros((n, max(levels - 1, 0)), dtype=np.int64)
    for i, row in enumerate(table.tolist()):
        for length in range(1, levels):
            key = tuple(row[:length])
            j = node_of.get(key)
            if j is None:
                j = node_of[key] = len(tokens)
                tokens.append(row[length - 1])
                parent.append(node_of.get(key[:-1], -1))
                depth.append(length)
            prefix_node[i, length - 1] = j
    path = torch.full((len(tokens), max(levels - 1, 1)), -1, dtype=torch.long)
    for j in range(len(tokens)):
        k = j
        while k >= 0:
            path[j, depth[k] - 1] = k
            k = parent[k]
    return _CodeTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(depth, dtype=torch.long), path, prefix_node)


TREE_ATTENTION = "recfm_code_tree"


def _tree_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, code_tree=None,
                            **kwargs):
    """Attention of the code trie's nodes (transformers' attention interface). Each node sees every
    real prompt token and its own path from the root (at most L - 1 nodes), so it is computed in two
    parts and merged by their log-sum-exps: nodes x prompt by one fused attention call, nodes x path
    by gathering each node's few path keys. One masked nodes x (prompt + all nodes) call would spend
    most of its work on pairs the mask throws away. query (B, H, N, d); key and value
    (B, kv_heads, T + N, d), the prompt's cached keys first. Returns (B, N, H, d)."""
    path, prompt_mask = code_tree
    b, h, n, d = query.shape
    kvh = key.shape[1]
    t = key.shape[2] - n
    scale = scaling if scaling is not None else d ** -0.5
    # the query heads that share a key head side by side, so keys and values are never copied per head
    q = query.reshape(b, kvh, (h // kvh) * n, d)
    kp, vp, kn, vn = key[:, :, :t], value[:, :, :t], key[:, :, t:], value[:, :, t:]
    bias = torch.zeros(b, 1, 1, t, dtype=query.dtype, device=query.device).masked_fill_(
        ~prompt_mask[:, None, None, :], float("-inf"))
    if query.device.type == "cpu":
        out_prompt, lse_prompt = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, kp, vp, 0.0, False, attn_mask=bias, scale=scale)
    else:
        s = torch.matmul(q, kp.transpose(-1, -2)).float() * scale + bias.float()
        lse_prompt = s.logsumexp(-1)
        out_prompt = torch.matmul((s - lse_prompt[..., None]).exp().to(vp.dtype), vp)
    q = q.view(b, kvh, h // kvh, n, d)
    steps = []  # (score, value) of each step along the path, per query head: (B, kvh, group, N) and (B, kvh, 1, N, d)
    for p in range(path.shape[1]):
        node = path[:, p]
        k_p, v_p = kn[:, :, None, node.clamp(min=0)], vn[:, :, None, node.clamp(min=0)]
        score = (q * k_p).sum(-1).float() * scale
        steps.append((score.masked_fill_(node < 0, float("-inf")), v_p))
    lse_prompt = lse_prompt.view(b, kvh, h // kvh, n)
    lse = torch.logaddexp(lse_prompt, torch.stack([s for s, _ in steps], -1).logsumexp(-1))
    out = out_prompt.float().view(b, kvh, h // kvh, n, d) * (lse_prompt - lse).exp()[..., None]
    for score, v_p in steps:
        out = out + (score - lse).exp()[..., None] * v_p.float()
    return out.to(query.dtype).reshape(b, h, n, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(TREE_ATTENTION, _tree_attention_forward)


_TREES: dict[tuple[int, int], tuple[np.ndarray, list[tuple[np.ndarray, _CodeTree]]]] = {}

# Inner trie nodes one tree pass feeds per prompt. The pass holds (prompts x nodes x vocabulary) logits,
# so a catalogue with more nodes is scored in several passes over the same prompt cache, each over a
# run of items in code order with its own trie (their shared ancestors computed again in each).
MAX_TREE_NODES = 4096


def _chunks(table: np.ndarray, max_nodes: int) -> list[np.ndarray]:
    """Item indices in code order, cut into runs whose tries have at most max_nodes inner nodes (an
    item alone never exceeds L - 1)."""
    rows = table.tolist()
    runs, run, seen = [], [], set()
    for i in np.lexsort(table.T[::-1]).tolist():
        prefixes = [tuple(rows[i][:k]) for k in range(1, table.shape[1])]
        if run and len(seen) + sum(p not in seen for p in prefixes) > max_nodes:
            runs.append(np.asarray(run))
            run, seen = [], set()
        run.append(i)
        seen.update(prefixes)
    if run:
        runs.append(np.asarray(run))
    return runs


def _trees_for(item_tokenizer, max_nodes: int) -> tuple[np.ndarray, list[tuple[np.ndarray, _CodeTree]]]:
    """The id table and, for each run of items (all items in one run when the trie fits), the run's
    item indices and trie."""
    table = np.asarray(item_tokenizer.id_table)
    key = (id(item_tokenizer), max_nodes)
    hit = _TREES.get(key)
    if hit is None or hit[0].shape != table.shape or not np.array_equal(hit[0], table):
        whole = _code_tree(table)
        if len(whole.tokens) <= max_nodes:
            trees = [(np.arange(len(table)), whole)]
        else:
            trees = [(idx, _code_tree(table[idx])) for idx in _chunks(table, max_nodes)]
        hit = _TREES[key] = (table, trees)
    return hit


def fused_scores(scores: torch.Tensor, id_view: torch.Tensor, weight: float) -> torch.Tensor:
    """A prompt's next-item scores fused with the identifier view's over the same history: the prompt's
    log-probabilities plus `weight` times the view's (log-probabilities; a weighted product of the two
    distributions). Shared by `recfm eval` and `/v1/recommendations`."""
    return torch.log_softmax(scores.float(), -1) + weight * id_view


@torch.no_grad()
def score_semantic_items(model, item_tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         pixel_values=None, content_item_ids=None, exclude: list[list[int]] | None = None,
                         max_nodes: int = MAX_TREE_NODES) -> torch.Tensor:
    """(B, n_items): log p(item's codes | prompt) for every item, the sum of its code tokens'
    log-probabilities over the full vocabulary (the end token after the last code is left out: every
    item has one, and it says nothing about which item). Prompts are left-padded (they end where the
    answer starts). Two passes: the prompts, then every inner trie node at once on top of the
    prompts' cache with a tree mask (in runs of at most `max_nodes` nodes for a large catalogue, the
    cache cut back to the prompts after each). `exclude[b]` item indices get -inf."""
    table, trees = _trees_for(item_tokenizer, max_nodes)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("score_semantic_items needs left-padded prompts (each row's last token is real)")
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      pixel_values=pixel_values, content_item_ids=content_item_ids, use_cache=True)
    head = model.get_output_embeddings()
    logp = head(out.last_hidden_state[:, -1]).float().log_softmax(-1)
    codes = torch.as_tensor(table, dtype=torch.long)
    scores = logp[:, codes[:, 0]]
    if table.shape[1] > 1:
        lm_config = model.model.language_model.config
        before = lm_config._attn_implementation
        lm_config._attn_implementation = TREE_ATTENTION  # no mask is built: the tree attention knows who sees what
        try:
            for run, tree in trees:
                n = len(tree.tokens)
                node_pos = positions[:, -1:] + tree.depth[None]
                h = model.model(input_ids=tree.tokens[None].expand(b, n), position_ids=node_pos, cache=out.cache,
                                use_cache=True, code_tree=(tree.path, attention_mask.bool())).last_hidden_state
                if len(trees) > 1:
                    out.cache.crop(-n)  # the next run sees the prompts only (this run's n nodes removed)
                logits = head(h).float()  # (B, N, V)
                logz = logits.logsumexp(-1)
                idx = torch.as_tensor(run, dtype=torch.long)
                part = scores[:, idx]
                for level in range(1, table.shape[1]):
                    node = torch.as_tensor(tree.prefix_node[:, level - 1])
                    part = part + logits[:, node, codes[idx, level]] - logz[:, node]
                scores[:, idx] = part
        finally:
            lm_config._attn_implementation = before
    if exclude:
        for row, items in enumerate(exclude):
            if items:
                scores[row, torch.as_tensor(items, dtype=torch.long)] = float("-inf")
    return scores


@torch.no_grad()
def beam_items(model, item_tokenizer, input_ids: torch.Tensor, k: int = 10, attention_mask=None,
               pixel_values=None, end_token_id: int | None = None, **kwargs) -> list[list[str]]:
    """For each prompt (left-padded), the k items with the best constrained beams, best first."""
    end = end_token_id if end_token_id is not None else model.config.eos_token_id
    n_levels = item_tokenizer.id_table.shape[1]
    proc = TrieLogitsProcessor(item_tokenizer.trie, span_start=input_ids.shape[1], end_token_id=end)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         logits_processor=LogitsProcessorList([proc]), num_beams=k, num_return_sequences=k,
                         do_sample=False, max_new_tokens=n_levels + 1, early_stopping=True,
                         pad_token_id=model.config.pad_token_id, eos_token_id=end, **kwargs)
    codes = out[:, input_ids.shape[1]:].tolist()
    result = []
    for b in range(input_ids.shape[0]):
        items = []
        for seq in codes[b * k : (b + 1) * k]:
            item = item_tokenizer.decode([t for t in seq if t != end and t != model.config.pad_token_id][:n_levels])
            if item is not None and item not in items:
                items.append(item)
        result.append(items)
    return result


class ImageGridProcessor(LogitsProcessor):
    """Forces <|img|>, then exactly `n_codes` image-code tokens, then <|/img|>, from `span_start`."""

    def __init__(self, span_start: int, img_start_id: int, img_end_id: int, code_offset: int, n_codebook: int,
                 n_codes: int, eos_token_id: int):
        self.span_start, self.n_codes = span_start, n_codes
        self.img_start_id, self.img_end_id, self.eos = img_start_id, img_end_id, eos_token_id
        self.codes = slice(code_offset, code_offset + n_codebook)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.span_start
        mask = torch.full_like(scores, float("-inf"))
        if step == 0:
            mask[:, self.img_start_id] = 0
        elif step <= self.n_codes:
            mask[:, self.codes] = 0
        elif step == self.n_codes + 1:
            mask[:, self.img_end_id] = 0
        else:
            mask[:, self.eos] = 0
        return scores + mask


@torch.no_grad()
def generate_image_codes(model, input_ids: torch.Tensor, attention_mask=None, pixel_values=None,
                         do_sample: bool = True, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                         **kwargs) -> torch.Tensor:
    """(B, grid*grid) image codes generated after each prompt (prompts end with <|assistant|>)."""
    cfg = model.config
    if cfg.image_code_offset < 0 or not cfg.image_codebook_size:
        raise ValueError("this model has no image-code vocabulary (build it with image_codebook_size)")
    n = cfg.image_grid ** 2
    proc = ImageGridProcessor(input_ids.shape[1], cfg.img_start_id, cfg.img_end_id, cfg.image_code_offset,
                              cfg.image_codebook_size, n, cfg.eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         logits_processor=LogitsProcessorList([proc]), do_sample=do_sample, temperature=temperature,
                         top_k=top_k, max_new_tokens=n + 2, min_new_tokens=n + 2, pad_token_id=cfg.pad_token_id, **kwargs)
    return out[:, input_ids.shape[1] + 1 : input_ids.shape[1] + 1 + n] - cfg.image_code_offset


def generate_images(model, vq, input_ids: torch.Tensor, **kwargs):
    """PIL images drawn by the VQ decoder from generated codes."""
    codes = generate_image_codes(model, input_ids, **kwargs)
    return vq.decode_to_pil(codes)
