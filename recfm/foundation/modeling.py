"""The RecFM backbone, top to bottom.

    pixels --vision tower--> patches --projector--> n vectors per image
    tokens --embeddings--> [early fusion: image vectors replace the <image> placeholders]
                           [content items: <item> placeholders get the item encoder's vector]
           --Llama-family decoder--> [cross-attention fusion: gated item-level cross-attention
                                      before every k-th layer, via forward pre-hooks on those layers]
           --lm_head--> next-token logits;  --ranking head--> a score for every catalogue item

The language model is a stock transformers model (`AutoModel.from_config(text_config)`), untouched:
a loaded Llama/Qwen2/Mistral checkpoint computes inside RecFM exactly what it computes alone, and
attention goes through transformers' attention interface (sdpa, flash_attention_2, or any
registered implementation). Cross-attention blocks are attached with forward pre-hooks rather than by
rewriting the decoder loop, and their gates start at zero. A block runs on the input of its decoder
layer (as in Flamingo), never after the last layer: there it could only change the item tokens' own
outputs, which no answer token would ever attend to.

How a sequence is read (all from token ids, see `token_image_index`): the k-th run of
`image_tokens` <image> tokens is the k-th image of `pixel_values` (row-major over the batch); an
item span runs from <|item|> to <|/item|>, and in cross-attention mode every token of a span
attends to the image inside that span (an image outside any span is attended by its own
placeholder tokens). In content mode the j-th <item> token (row-major) is item
`content_item_ids[j]`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration import RecFMConfig
from .vision import GatedCrossAttention, build_projector, build_vision_tower, vision_features

IGNORE = -100


@dataclass
class RecFMModelOutput(BaseModelOutputWithPast):
    contrastive_loss: torch.Tensor | None = None


def token_image_index(input_ids: torch.Tensor, cfg: RecFMConfig) -> torch.Tensor:
    """(B, T) index of the image each token attends to in cross-attention mode, -1 for none."""
    b, t = input_ids.shape
    is_img = input_ids == cfg.image_token_id
    flat = is_img.reshape(-1)
    img_idx = torch.where(flat, (flat.long().cumsum(0) - 1) // cfg.image_tokens, -1).view(b, t)
    start = input_ids == cfg.item_start_id
    end = input_ids == cfg.item_end_id
    s_cum = start.long().cumsum(1)
    in_span = s_cum > (end.long().cumsum(1) - end.long())
    if not bool(in_span.any()):
        return img_idx
    row_offset = torch.cat([start.new_zeros(1, dtype=torch.long), start.sum(1).cumsum(0)[:-1]])
    span_id = torch.where(in_span, s_cum - 1 + row_offset[:, None], -1)
    span_img = torch.full((int(start.sum()),), -1, dtype=torch.long, device=input_ids.device)
    span_img.scatter_reduce_(0, span_id[in_span], img_idx[in_span], reduce="amax")
    return torch.where(in_span, span_img[span_id.clamp(min=0)], img_idx)


class ItemEncoder(nn.Module):
    """Content mode: an item's vector from its text and image (mean projected image vector), plus an
    optional learned per-item residual (zero at initialisation). The text is read as the mean embedding
    of its tokens, as a TF-IDF weighted sum of learned word vectors over a vocabulary of words many
    training items share (`n_words` > 0, recfm.tokenizers.words), or both.

    A residual row that training never reached stays exactly zero (no gradient, and AdamW's decay of
    zero is zero), so an item new to the model is scored from its content alone. That measured far
    better than giving it the trained rows' mean residual (cold items on the default domain, seed 0:
    HR@10 0.048 vs 0.000, random 0.020). With `residual_dropout` > 0, training reads that share of
    the items from their content alone too (DropoutNet); it did not help there (HR@10 0.040)."""

    def __init__(self, d: int, n_items: int, id_residual: bool, n_words: int = 0, tokens: bool = True,
                 image: bool = True):
        super().__init__()
        # no module a mode does not read (DDP wants no unused parameter)
        self.text = nn.Linear(d, d) if tokens else None
        self.words = nn.Embedding(n_words, d) if n_words else None
        self.image = nn.Linear(d, d) if image else None
        self.no_image = nn.Parameter(torch.zeros(d))
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(d, d))
        self.id_residual = nn.Embedding(n_items, d) if id_residual else None

    def forward(self, text_vec, image_vec, has_image, item_idx, residual_dropout: float = 0.0,
                word_ids=None, word_weights=None):
        """text_vec: (n, d) mean token embeddings, or None (words only); word_ids / word_weights: (n, L)
        vocabulary ids (-1 pads) and TF-IDF weights, or None (tokens only)."""
        if self.image is not None:
            x = torch.where(has_image[:, None], self.image(image_vec), self.no_image.to(image_vec.dtype))
        else:
            x = self.no_image.to(image_vec.dtype).expand(len(item_idx), -1)
        if text_vec is not None:
            x = x + self.text(text_vec)
        if word_ids is not None:
            w = word_weights * (word_ids >= 0)
            x = x + (self.words(word_ids.clamp(min=0)) * w[..., None].to(x.dtype)).sum(1)
        x = x + self.mlp(x)
        if self.id_residual is not None:
            r = self.id_residual(item_idx)
            if self.training and residual_dropout > 0:  # DropoutNet: these items are read from content alone
                r = r * (torch.rand(len(item_idx), 1, device=r.device) >= residual_dropout).to(r.dtype)
            x = x + r
        return x


class RecFMPreTrainedModel(PreTrainedModel):
    config: RecFMConfig
    config_class = RecFMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer", "GatedCrossAttention"]

    @torch.no_grad()
    def _init_weights(self, module):
        # Non-persistent buffers are not in a checkpoint: from_pretrained materialises them empty, so
        # they are set here (transformers.initialization's functions leave loaded tensors alone).
        super()._init_weights(module)
        if isinstance(module, RecFMModel):
            init.copy_(module.image_mean, torch.tensor(self.config.image_mean).view(1, 3, 1, 1))
            init.copy_(module.image_std, torch.tensor(self.config.image_std).view(1, 3, 1, 1))
        elif isinstance(module, GatedCrossAttention):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)
        elif isinstance(module, ItemEncoder):
            init.zeros_(module.no_image)
            if module.id_residual is not None:
                init.zeros_(module.id_residual.weight)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


class RecFMModel(RecFMPreTrainedModel):
    def __init__(self, config: RecFMConfig):
        super().__init__(config)
        tc = config.text_config
        d = tc.hidden_size
        self.language_model = AutoModel.from_config(tc)
        self.vision_tower = self.projector = None
        if config.vision_config is not None:
            self.vision_tower = build_vision_tower(config.vision_config)
            if config.freeze_vision:
                self.vision_tower.requires_grad_(False)
            self.projector = build_projector(config.projector, config.vision_config.hidden_size, d, config.image_tokens)
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.cross_attn = nn.ModuleDict(
            {str(i): GatedCrossAttention(d, tc.num_attention_heads, tc.rms_norm_eps) for i in config.cross_attention_layers()}
        )
        self._xattn_ctx: tuple[torch.Tensor, torch.Tensor] | None = None
        for i in self.cross_attn:
            self.language_model.layers[int(i)].register_forward_pre_hook(partial(self._xattn_hook, i), with_kwargs=True)
        self._branch_hooks: list = []  # hidden_dropout's hooks, present only while training with a rate above 0
        self.item_encoder = None
        if config.item_mode == "content":
            if config.n_items < 1:
                raise ValueError("content item mode needs n_items (the catalogue size) in the config")
            n_words = len(config.item_word_vocab) if config.item_text != "tokens" else 0
            self.item_encoder = ItemEncoder(d, config.n_items, config.item_id_residual, n_words,
                                            tokens=config.item_text != "words", image=config.item_image)
            s = config.vision_config.image_size if config.vision_config is not None else 1
            self.register_buffer("catalogue_text_ids", torch.full((config.n_items, config.item_text_len), -1, dtype=torch.long))
            self.register_buffer("catalogue_pixels", torch.zeros(config.n_items, 3, s, s, dtype=torch.uint8))
            self.register_buffer("catalogue_has_image", torch.zeros(config.n_items, dtype=torch.bool))
            if n_words:  # each item's words: vocabulary ids (-1 pads) and TF-IDF weights
                self.register_buffer("catalogue_word_ids", torch.full((config.n_items, config.item_text_len), -1, dtype=torch.long))
                self.register_buffer("catalogue_word_weights", torch.zeros(config.n_items, config.item_text_len))
        self._image_cache: dict[bytes, torch.Tensor] = {}
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # --- images ---------------------------------------------------------------------------------

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) or floats in [0, 1] -> normalised floats for the vision tower."""
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        return (x - self.image_mean) / self.image_std

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, image_tokens, d). A frozen tower's features are
        cached by image content, so a catalogue image is encoded once."""
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower (built with vision=None); send no images")
        dtype = next(self.vision_tower.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        if not self.config.freeze_vision:
            return self.projector(vision_features(self.vision_tower, pixel_values))
        # the key says how the features were computed too: features from an autocast (bf16) pass must
        # not stand in for fp32 ones later, nor the other way round
        device = pixel_values.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        mode = f"{dtype}/{autocast}".encode()
        keys = [hashlib.sha1(mode + p.detach().cpu().float().numpy().tobytes()).digest() for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self._image_cache]
        if missing:
            with torch.no_grad():
                feats = vision_features(self.vision_tower, pixel_values[missing])
            if len(self._image_cache) > 200_000:
                self._image_cache.clear()
            for i, f in zip(missing, feats):
                self._image_cache[keys[i]] = f
        patches = torch.stack([self._image_cache[k] for k in keys]).to(pixel_values.device)
        return self.projector(patches)

    def clear_image_cache(self) -> None:
        self._image_cache.clear()

    # --- content items --------------------------------------------------------------------------

    def resize_catalogue(self, n_items: int) -> None:
        """Content mode, a new domain: room for n_items items. The item encoder is kept (it reads
        content, so it carries over); the per-item ID residuals start again at zero."""
        if self.item_encoder is None:
            raise ValueError("resize_catalogue is for content item mode")
        length = self.catalogue_text_ids.shape[1]
        s = self.catalogue_pixels.shape[-1]
        device = self.catalogue_text_ids.device
        self.catalogue_text_ids = torch.full((n_items, length), -1, dtype=torch.long, device=device)
        self.catalogue_pixels = torch.zeros(n_items, 3, s, s, dtype=torch.uint8, device=device)
        self.catalogue_has_image = torch.zeros(n_items, dtype=torch.bool, device=device)
        if self.item_encoder.words is not None:
            self.catalogue_word_ids = torch.full((n_items, length), -1, dtype=torch.long, device=device)
            self.catalogue_word_weights = torch.zeros(n_items, length, device=device)
        if self.item_encoder.id_residual is not None:
            d = self.item_encoder.id_residual.embedding_dim
            self.item_encoder.id_residual = nn.Embedding(n_items, d, device=device)
            nn.init.zeros_(self.item_encoder.id_residual.weight)
        self.config.n_items = n_items

    def extend_words(self, words: list[str], idf: list[float]) -> None:
        """Words mode, a new domain: the vocabulary `words` (the old one first, at its ids, then the new
        domain's words it lacked, e.g. `WordVocabulary.extend`). Old words keep their trained vectors;
        a new word's vector starts at zero, so until training reaches it an item is read from the
        words it shares with the old domain (and its image)."""
        enc = self.item_encoder
        if enc is None or enc.words is None:
            raise ValueError("extend_words is for content item mode with item_text words or both")
        old = list(self.config.item_word_vocab)
        if list(words[: len(old)]) != old or len(idf) != len(words):
            raise ValueError(f"the extended vocabulary must start with the model's {len(old)} words, in order, and "
                             f"give one idf per word (got {len(words)} words, {len(idf)} idf values)")
        table = enc.words.weight
        grown = nn.Embedding(len(words), table.shape[1], device=table.device, dtype=table.dtype)
        with torch.no_grad():
            grown.weight.zero_()
            grown.weight[: len(old)] = table
        enc.words = grown
        self.config.item_word_vocab, self.config.item_word_idf = list(words), [float(v) for v in idf]

    def set_catalogue(self, text_ids: torch.Tensor, pixels: torch.Tensor | None, has_image: torch.Tensor,
                      word_ids: torch.Tensor | None = None, word_weights: torch.Tensor | None = None) -> None:
        """Content mode: every item's text token ids (n, L, -1 padded), uint8 pixels and image flag, and
        (words mode) its word ids (n, L, -1 padded) and weights."""
        if self.item_encoder is None:
            raise ValueError("set_catalogue is for content item mode")
        n, length = self.catalogue_text_ids.shape
        ids = torch.full((n, length), -1, dtype=torch.long)
        ids[:, : min(length, text_ids.shape[1])] = text_ids[:, :length]
        self.catalogue_text_ids.copy_(ids)
        if pixels is not None:
            self.catalogue_pixels.copy_(pixels)
        self.catalogue_has_image.copy_(has_image)
        if self.item_encoder.words is not None:
            if word_ids is None or word_weights is None:
                raise ValueError(f"item_text {self.config.item_text!r} needs every item's word ids and weights")
            self.catalogue_word_ids.fill_(-1)
            self.catalogue_word_weights.zero_()
            k = min(length, word_ids.shape[1])
            self.catalogue_word_ids[:, :k] = word_ids[:, :k]
            self.catalogue_word_weights[:, :k] = word_weights[:, :k]

    def item_embeddings(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Content mode: (len(idx), d) item vectors (every item when idx is None)."""
        if idx is None:
            idx = torch.arange(self.config.n_items, device=self.catalogue_text_ids.device)
        enc = self.item_encoder  # the modules it has say what it reads (item_text, item_image)
        text_vec = word_ids = word_weights = None
        if enc.text is not None:
            ids = self.catalogue_text_ids[idx]
            mask = ids >= 0
            emb = self.get_input_embeddings()(ids.clamp(min=0)) * mask[..., None]
            text_vec = emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        if enc.words is not None:
            word_ids, word_weights = self.catalogue_word_ids[idx], self.catalogue_word_weights[idx]
        has_image = self.catalogue_has_image[idx]
        image_vec = enc.no_image.new_zeros(len(idx), enc.no_image.shape[0])
        if self.vision_tower is not None and enc.image is not None and bool(has_image.any()):
            rows = has_image.nonzero().squeeze(1)
            feats = self.encode_images(self.normalize_pixels(self.catalogue_pixels[idx[rows]]))
            image_vec = image_vec.index_put((rows,), feats.mean(1).to(image_vec.dtype))
        return enc(text_vec, image_vec, has_image, idx, self.config.item_residual_dropout, word_ids, word_weights)

    # --- the forward pass -----------------------------------------------------------------------

    def _sync_branch_dropout(self) -> None:
        """hidden_dropout on each residual branch's output (every layer's attention and MLP) is a forward hook
        registered only while training with a rate above 0, so evaluation and serving run without hooks."""
        want = self.training and self.config.hidden_dropout > 0
        if want and not self._branch_hooks:
            self._branch_hooks = [m.register_forward_hook(self._branch_dropout)
                                  for layer in self.language_model.layers for m in (layer.self_attn, layer.mlp)]
        elif not want and self._branch_hooks:
            for h in self._branch_hooks:
                h.remove()
            self._branch_hooks = []

    def train(self, mode: bool = True):
        super().train(mode)
        self._sync_branch_dropout()  # eval() drops the hooks even where the language model is called directly (serving)
        return self

    def _branch_dropout(self, module, args, output):
        p = self.config.hidden_dropout
        if not (self.training and p > 0):
            return None
        if isinstance(output, tuple):  # attention: (output, weights)
            return (nn.functional.dropout(output[0], p, True), *output[1:])
        return nn.functional.dropout(output, p, True)

    def _xattn_hook(self, key, module, args, kwargs):
        """Forward pre-hook: cross-attend the decoder layer's input hidden states to the images."""
        if self._xattn_ctx is None:
            return None
        feats, token_image = self._xattn_ctx
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[:2] != token_image.shape:
            return None
        hidden = self.cross_attn[key](hidden, feats, token_image)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                pixel_values=None, content_item_ids=None, use_cache=None, **kwargs) -> RecFMModelOutput:
        cfg = self.config
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        token_embeds = inputs_embeds
        feats = None
        if pixel_values is not None and len(pixel_values):
            feats = self.encode_images(pixel_values)
            feats = feats.to(inputs_embeds.dtype)
            if cfg.fusion == "early":
                mask = input_ids == cfg.image_token_id
                n_expected = feats.shape[0] * feats.shape[1]
                if int(mask.sum()) != n_expected:
                    raise ValueError(f"{int(mask.sum())} <image> tokens in the input but {feats.shape[0]} images x "
                                     f"{feats.shape[1]} tokens = {n_expected} image vectors")
                inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], feats.reshape(-1, feats.shape[-1]))
        if self.item_encoder is not None and content_item_ids is not None and input_ids is not None:
            mask = input_ids == cfg.item_token_id
            n = int(mask.sum())
            if n == len(content_item_ids) and n:
                vecs = self.item_embeddings(content_item_ids.to(input_ids.device)).to(inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], vecs)
            elif n and input_ids.shape[1] > 1:
                raise ValueError(f"{n} <item> tokens in the input but {len(content_item_ids)} content_item_ids")
        contrastive = None
        if feats is not None and input_ids is not None and (cfg.fusion == "cross_attention" or cfg.contrastive_loss_weight > 0):
            token_image = token_image_index(input_ids, cfg)
            if cfg.fusion == "cross_attention" and len(self.cross_attn):
                self._xattn_ctx = (feats, token_image)
            if self.training and cfg.contrastive_loss_weight > 0:
                contrastive = self._contrastive(feats, token_embeds, input_ids, token_image)
        self._sync_branch_dropout()
        if self.training and cfg.hidden_dropout > 0:
            inputs_embeds = nn.functional.dropout(inputs_embeds, cfg.hidden_dropout, True)
        try:
            out = self.language_model(input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        finally:
            self._xattn_ctx = None
        return RecFMModelOutput(last_hidden_state=out.last_hidden_state, cache=out.cache,
                                hidden_states=out.hidden_states, attentions=out.attentions, contrastive_loss=contrastive)

    def _contrastive(self, feats, token_embeds, input_ids, token_image) -> torch.Tensor | None:
        """InfoNCE between each image (mean projected vector) and its item's words (mean embedding)."""
        cfg = self.config
        special = {cfg.image_token_id, cfg.item_start_id, cfg.item_end_id, cfg.item_token_id}
        is_word = token_image >= 0
        for s in special:
            is_word &= input_ids != s
        if cfg.n_item_tokens:
            is_word &= ~((input_ids >= cfg.item_token_offset) & (input_ids < cfg.item_token_offset + cfg.n_item_tokens))
        n_img = feats.shape[0]
        idx = token_image[is_word]
        if idx.numel() == 0:
            return None
        text = torch.zeros(n_img, token_embeds.shape[-1], dtype=token_embeds.dtype, device=token_embeds.device)
        text = text.index_add(0, idx, token_embeds[is_word])
        count = torch.bincount(idx, minlength=n_img)
        keep = count > 0
        if int(keep.sum()) < 2:
            return None
        t = F.normalize(text[keep] / count[keep, None], dim=-1)
        v = F.normalize(feats.mean(1)[keep].to(t.dtype), dim=-1)
        logits = t @ v.T / cfg.contrastive_temperature
        target = torch.arange(len(t), device=t.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class RecFMForCausalLM(RecFMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: RecFMConfig):
        super().__init__(config)
        self.model = RecFMModel(config)
        d = config.text_config.hidden_size
        self.lm_head = nn.Linear(d, config.text_config.vocab_size, bias=False)
        self.item_head = nn.Linear(d, d, bias=False) if config.item_mode == "content" else None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, pixel_values=None, content_item_ids=None, use_cache=None, logits_to_keep=0,
                **kwargs) -> CausalLMOutputWithPast:
        kwargs.pop("num_items_in_batch", None)
        teacher = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("teacher_")}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, pixel_values=pixel_values, content_item_ids=content_item_ids,
                         use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            # content ids: the trained items' vectors, encoded once a step for the item loss and the distillation
            catalogue = self._item_catalogue(trained_only=True) if content_item_ids is not None else None
            loss = self.loss(hidden, logits, labels, input_ids, content_item_ids, catalogue)
            if out.contrastive_loss is not None:
                loss = loss + self.config.contrastive_loss_weight * out.contrastive_loss
            if teacher and self.config.answer_distill > 0:
                loss = loss + self.config.answer_distill * self.answer_distillation(hidden, labels, teacher, catalogue)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                      attentions=out.attentions)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search / num_return_sequences copy each prompt `expand_size` times. `pixel_values` and
        `content_item_ids` are not per row but per image / per <item> token, row-major, so each row's
        group is copied whole ([A, B] -> [A, B, A, B]); the default copies entry by entry
        ([A, A, B, B]), which hands the copies of a prompt other prompts' images."""
        grouped = {}
        if expand_size > 1 and input_ids is not None:
            cfg = self.config
            for key, token_id, per in (("pixel_values", cfg.image_token_id, cfg.image_tokens),
                                       ("content_item_ids", cfg.item_token_id, 1)):
                x = model_kwargs.get(key)
                if isinstance(x, torch.Tensor) and len(x):
                    counts = ((input_ids == token_id).sum(1) // per).tolist()
                    if sum(counts) == len(x):
                        groups = x.split(counts)
                        grouped[key] = torch.cat([g for g in groups for _ in range(expand_size)])
                        model_kwargs.pop(key)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        model_kwargs.update(grouped)
        return input_ids, model_kwargs

    # --- losses ---------------------------------------------------------------------------------

    def loss(self, hidden, logits, labels, input_ids, content_item_ids=None, catalogue=None) -> torch.Tensor:
        """Next-token cross-entropy on the answer (optionally focal), + context reconstruction of history
        item identifiers, + (content mode) a full-catalogue item cross-entropy where an <item> is predicted
        (`catalogue`: the trained items' vectors, default `_item_catalogue(trained_only=True)`)."""
        cfg = self.config
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:].to(shift_logits.device)
        total = _token_ce(shift_logits, shift_labels, cfg.focal_gamma)
        if input_ids is None:
            return total
        next_ids = input_ids[:, 1:]
        if cfg.context_loss_weight > 0 and cfg.n_item_tokens and cfg.item_mode != "content":
            in_item_vocab = (next_ids >= cfg.item_token_offset) & (next_ids < cfg.item_token_offset + cfg.n_item_tokens)
            ctx_labels = torch.where(in_item_vocab & (shift_labels == IGNORE), next_ids, IGNORE)
            if bool((ctx_labels != IGNORE).any()):
                total = total + cfg.context_loss_weight * _token_ce(shift_logits, ctx_labels, 0.0)
        if self.item_head is not None and content_item_ids is not None:
            is_item = next_ids == cfg.item_token_id  # position t predicts the <item> at t + 1
            if bool(is_item.any()):
                ordinal = torch.zeros_like(input_ids).masked_scatter(
                    input_ids == cfg.item_token_id, torch.arange(len(content_item_ids), device=input_ids.device))[:, 1:]
                answer = is_item & (shift_labels == cfg.item_token_id)
                context = is_item & (shift_labels == IGNORE)
                # items with no training interaction are no one's negative either (cold items would otherwise
                # only ever be pushed down); they come last
                if catalogue is None:
                    catalogue = self._item_catalogue(trained_only=True)
                scores_all = self.item_head(hidden[:, :-1]).float()
                for sel, weight in ((answer, 1.0), (context, cfg.context_loss_weight)):
                    if weight > 0 and bool(sel.any()):
                        scores = scores_all[sel] @ catalogue.float().T
                        total = total + weight * F.cross_entropy(scores, content_item_ids.to(scores.device)[ordinal[sel]])
        return total

    def answer_distillation(self, hidden, labels, teacher: dict, catalogue=None) -> torch.Tensor:
        """KL(teacher || student) over the catalogue at the answer position of each row in
        `teacher["teacher_rows"]`: the teacher is the model's own next-item distribution after the same
        history in the identifier-only view (`teacher_input_ids`, open after its last item), computed without
        gradient. That view learns next-item prediction at every position of every sequence, a prompt's
        answer position at one; the soft target carries the whole ranking, not only the one observed item.
        `catalogue`: as in `loss`."""
        cfg = self.config
        if cfg.item_mode == "semantic":
            raise ValueError("answer_distill needs one score per item (atomic or content ids), not semantic code paths")
        rows = teacher["teacher_rows"].to(hidden.device)
        nxt = labels[rows, 1:].to(hidden.device)  # hidden[:, t] predicts labels[:, t + 1]
        if cfg.item_mode == "atomic":
            is_item = (nxt >= cfg.item_token_offset) & (nxt < cfg.item_token_offset + cfg.n_items)
        else:
            is_item = nxt == cfg.item_token_id
        has = is_item.any(1)
        if not bool(has.any()):
            return hidden.sum() * 0.0
        pos = is_item.int().argmax(1)  # the answer's first item position
        if catalogue is None:  # content ids: encoded once, for student and teacher
            catalogue = self._item_catalogue(trained_only=True)
        student = self._item_scores(hidden[rows, pos][has], catalogue)
        with torch.no_grad():
            mask = teacher["teacher_attention_mask"]
            out = self.model(input_ids=teacher["teacher_input_ids"], attention_mask=mask,
                             content_item_ids=teacher.get("teacher_content_item_ids"))
            last = mask.sum(1) - 1
            t = self._item_scores(out.last_hidden_state[torch.arange(len(last), device=last.device), last][has],
                                  None if catalogue is None else catalogue.detach())
        return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                        reduction="batchmean")

    def _item_catalogue(self, trained_only: bool = False) -> torch.Tensor | None:
        """Content ids: every item's content vector (`trained_only`: the items with a training interaction,
        which come first, as in the training loss); None for atomic ids."""
        if self.config.item_mode != "content":
            return None
        catalogue = self.model.item_embeddings()
        trained = getattr(self.model, "n_trained_items", None)
        return catalogue[:trained] if trained_only and trained else catalogue

    def _item_scores(self, h: torch.Tensor, catalogue: torch.Tensor | None = None) -> torch.Tensor:
        """(N, items) scores from N hidden states: atomic, the item tokens' logits; content, the ranking
        head against `catalogue` (default: `_item_catalogue()`, every item)."""
        cfg = self.config
        if cfg.item_mode == "atomic":
            # through the head module rather than its weight, so a quantized head scores items too
            return self.lm_head(h)[:, cfg.item_token_offset : cfg.item_token_offset + cfg.n_items]
        return self.item_head(h) @ (self._item_catalogue() if catalogue is None else catalogue).T

    # --- ranking --------------------------------------------------------------------------------

    @torch.no_grad()
    def score_items(self, input_ids, attention_mask=None, pixel_values=None, content_item_ids=None,
                    exclude: list[list[int]] | None = None) -> torch.Tensor:
        """(B, n_items) scores for the item that answers each prompt (prompts end where the answer
        starts, e.g. with <|assistant|>), in one forward pass. Atomic: the logit of each item token;
        content: the ranking head against every item's content vector. `exclude[b]` item indices get
        -inf (a user's own history). Semantic ids need a pass over the code trie as well
        (recfm.foundation.generation.score_semantic_items)."""
        cfg = self.config
        if cfg.item_mode == "semantic":
            raise ValueError("semantic ids are scored over the code trie: use generation.score_semantic_items")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         content_item_ids=content_item_ids)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:  # the last real token (works for left or right padding)
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (attention_mask.bool() * pos).argmax(1)
        scores = self._item_scores(out.last_hidden_state[torch.arange(len(last)), last]).float()
        if exclude:
            for b, items in enumerate(exclude):
                if items:
                    scores[b, torch.as_tensor(items, device=scores.device)] = float("-inf")
        return scores


def _token_ce(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens; with gamma > 0, focal: weighted by (1 - p)^gamma."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    if not bool(keep.any()):
        return flat_logits.sum() * 0.0
    ce = F.cross_entropy(flat_logits[keep], flat[keep], reduction="none")
    if gamma > 0:
        ce = ce * (1 - torch.exp(-ce)).pow(gamma)
    return ce.mean()
