"""The built-in default domain: a synthetic catalogue whose tastes live partly in the pixels.

Each item has text attributes (category, style), which its title and text mention, and image
attributes (colour, shape, pattern), which only its picture shows. Users belong to hidden personas:
a persona is a set of preference weights over every attribute value, stronger on image attributes
than on text ones. A user's sequence is drawn step by step from a softmax over the items not yet
consumed: persona preference + item popularity + short-term dynamics (a pull towards the previous
item's category and colour). Ratings, reviews and summaries follow from how well the item matches
the persona; reviews talk about colours and shapes, so explaining them needs the image.

Because the generator is known, the Bayes-optimal next-item ranking given a history can be computed
exactly (see `oracle.py`), and so can the best ranking for a model that sees only the text
attributes. `check_image` recovers an image's attributes from its pixels, deterministically, so
generated images can be scored.

Everything is drawn from one `numpy.random.default_rng(seed)`: the same seed gives a byte-identical
domain folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .domain import InteractionRow, ItemRow, write_domain

GENERATOR_VERSION = 1

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (150, 50, 200),
    "cyan": (0, 190, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PATTERNS = ("solid", "stripes", "dots")
CATEGORIES = ("lamp", "vase", "mug", "cushion", "clock", "rug")
STYLES = ("modern", "rustic", "minimal", "retro")
IMAGE_ATTRS = {"colour": tuple(COLOURS), "shape": SHAPES, "pattern": PATTERNS}
TEXT_ATTRS = {"category": CATEGORIES, "style": STYLES}
ALL_ATTRS = {**IMAGE_ATTRS, **TEXT_ATTRS}
BACKGROUND = (238, 236, 230)
INK = (25, 25, 25)

_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "to", "sul", "ne", "dar", "fi", "po", "lin", "ze", "qua", "bel", "or")
_STYLE_WORDS = {
    "modern": ("clean lines", "a contemporary finish", "an understated profile"),
    "rustic": ("a weathered finish", "a hand-made feel", "a farmhouse look"),
    "minimal": ("nothing superfluous", "a quiet, simple form", "a pared-back design"),
    "retro": ("a vintage air", "a nod to the seventies", "an old-school charm"),
}
_USES = {
    "lamp": "for a reading corner", "vase": "for fresh flowers", "mug": "for the morning coffee",
    "cushion": "for the sofa", "clock": "for the kitchen wall", "rug": "for the hallway",
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the generator. Defaults give ~19K interactions, fast enough for the quickstart."""

    seed: int = 0
    n_items: int = 500
    n_users: int = 1000
    n_personas: int = 16
    min_length: int = 8
    max_length: int = 30
    image_size: int = 32
    image_weight: float = 2.0  # how strongly a persona likes its favourite image attribute values
    text_weight: float = 1.2  # ... and its favourite text attribute values
    popularity_std: float = 0.5
    same_category_bonus: float = 0.8  # short-term dynamics: pull towards the previous item's category
    same_colour_bonus: float = 0.8  # ... and towards its colour (an image attribute)
    start_time: int = 1_600_000_000

    def __post_init__(self):
        if self.image_size < 32 or self.image_size > 128:
            raise ValueError(f"image_size must be between 32 and 128, got {self.image_size}")
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(f"need 2 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if self.max_length >= self.n_items:
            raise ValueError(f"max_length ({self.max_length}) must be below n_items ({self.n_items})")


# ----------------------------------------------------------------------------------------------
# images


def draw_item_image(colour: str, shape: str, pattern: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A coloured shape with a pattern on a light background, small random size/position jitter."""
    s = size
    bg = tuple(int(np.clip(c + rng.integers(-6, 7), 0, 255)) for c in BACKGROUND)
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    half = s * rng.uniform(0.30, 0.40)
    cx = s / 2 + rng.uniform(-0.06, 0.06) * s
    cy = s / 2 + rng.uniform(-0.06, 0.06) * s
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        poly = None
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        poly = [(box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])]
    elif shape == "triangle":
        poly = [(cx, box[1]), (box[2], box[3]), (box[0], box[3])]
    elif shape == "diamond":
        poly = [(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if poly:
        d.polygon(poly, fill=COLOURS[colour])
    if pattern != "solid":
        mask = Image.new("L", (s, s), 0)
        md = ImageDraw.Draw(mask)
        if shape == "circle":
            md.ellipse(box, fill=255)
        else:
            md.polygon(poly, fill=255)
        ink = Image.new("L", (s, s), 0)
        idraw = ImageDraw.Draw(ink)
        if pattern == "stripes":
            period, width = max(4, round(s * 5 / 32)), max(2, round(s * 2 / 32))
            for y in range(int(rng.integers(0, period)), s, period):
                idraw.rectangle([0, y, s, y + width - 1], fill=255)
        elif pattern == "dots":
            period, dot = max(5, round(s * 6 / 32)), max(2, round(s * 2 / 32))
            off = int(rng.integers(0, period))
            for y in range(off, s, period):
                for x in range(off, s, period):
                    idraw.rectangle([x, y, x + dot - 1, y + dot - 1], fill=255)
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
        both = np.minimum(np.asarray(mask), np.asarray(ink))
        img.paste(INK, mask=Image.fromarray(both))
    return img


def draw_random_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """n images of random colour/shape/pattern, drawn as the default domain draws its items."""
    rng = np.random.default_rng(seed)
    return [draw_item_image(list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))],
                            PATTERNS[int(rng.integers(len(PATTERNS)))], size, rng) for _ in range(n)]


_PALETTE = np.array([BACKGROUND, INK, *COLOURS.values()], dtype=np.float32)


def check_image(img: Image.Image | np.ndarray) -> dict[str, str | None]:
    """Recover colour, shape and pattern from pixels alone (None where the picture shows none).

    Every pixel is assigned to the nearest of background, ink and the six colours; the colour is the
    most common coloured class, the object is coloured + ink pixels, the shape follows from how much
    of its bounding box it fills and where it is widest, the pattern from its share of ink.
    """
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float32)
    s = a.shape[0]
    d = ((a[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    cls = d.argmin(-1)  # 0 background, 1 ink, 2.. colours
    counts = np.bincount(cls.ravel(), minlength=len(_PALETTE))
    colour_counts = counts[2:]
    if colour_counts.max() < 0.02 * s * s:
        return {"colour": None, "shape": None, "pattern": None}
    c = int(colour_counts.argmax())
    colour = list(COLOURS)[c]
    obj = (cls == c + 2) | (cls == 1)
    rows, cols = np.nonzero(obj)
    h = rows.max() - rows.min() + 1
    w = cols.max() - cols.min() + 1
    fill = obj.sum() / float(h * w)
    widths = obj[rows.min() : rows.max() + 1].sum(1).astype(np.float32)
    q = max(1, len(widths) // 4)
    top, mid, bottom = widths[:q].mean(), widths[len(widths) // 2 - q // 2 : len(widths) // 2 + q // 2 + 1].mean(), widths[-q:].mean()
    if fill > 0.9:
        shape = "square"
    elif fill > 0.68:
        shape = "circle"
    elif bottom > 1.5 * top and bottom > 0.7 * mid:
        shape = "triangle"
    else:
        shape = "diamond"
    ink_share = (cls == 1)[obj].mean()
    pattern = "solid" if ink_share < 0.06 else ("dots" if ink_share < 0.2 else "stripes")
    return {"colour": colour, "shape": shape, "pattern": pattern}


# ----------------------------------------------------------------------------------------------
# the world: items, personas, users


def _draw_world(cfg: SyntheticConfig, rng: np.random.Generator) -> dict:
    n = cfg.n_items
    attrs = {a: rng.integers(0, len(v), size=n) for a, v in ALL_ATTRS.items()}
    popularity = rng.normal(0.0, cfg.popularity_std, size=n)
    # a persona likes 1-2 values of each attribute and dislikes one
    weights = {}
    for a, values in ALL_ATTRS.items():
        strength = cfg.image_weight if a in IMAGE_ATTRS else cfg.text_weight
        w = np.zeros((cfg.n_personas, len(values)))
        for k in range(cfg.n_personas):
            order = rng.permutation(len(values))
            n_fav = 1 + int(rng.random() < 0.35)
            w[k, order[:n_fav]] = strength
            w[k, order[-1]] = -strength / 2
        weights[a] = w
    persona_prior = np.full(cfg.n_personas, 1.0 / cfg.n_personas)
    return {"attrs": attrs, "popularity": popularity, "weights": weights, "persona_prior": persona_prior}


def persona_scores(world: dict, attrs: tuple[str, ...] | None = None) -> np.ndarray:
    """(n_personas, n_items) static utility: preference weights over `attrs` (all by default) + popularity."""
    attrs = attrs or tuple(ALL_ATTRS)
    s = np.zeros((len(world["persona_prior"]), len(world["popularity"]))) + world["popularity"][None]
    for a in attrs:
        s += world["weights"][a][:, world["attrs"][a]]
    return s


def dynamics_bonus(world: dict, cfg_bonus: dict[str, float], prev: int) -> np.ndarray:
    """(n_items,) short-term pull from the previous item."""
    b = np.zeros(len(world["popularity"]))
    for a, bonus in cfg_bonus.items():
        b += bonus * (world["attrs"][a] == world["attrs"][a][prev])
    return b


def bonuses(cfg: SyntheticConfig, attrs: tuple[str, ...] | None = None) -> dict[str, float]:
    b = {"category": cfg.same_category_bonus, "colour": cfg.same_colour_bonus}
    return {a: v for a, v in b.items() if attrs is None or a in attrs}


def _item_text(rng: np.random.Generator, category: str, style: str) -> tuple[str, str]:
    name = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
    title = f"{name} {style} {category}"
    phrase = _STYLE_WORDS[style][int(rng.integers(0, 3))]
    text = f"A {style} {category} {_USES[category]}, with {phrase}."
    return title, text


def _review(rng, item_attrs: dict[str, str], liked: list[str], disliked: list[str], rating: int) -> tuple[str, str]:
    cat = item_attrs["category"]

    def describe(a: str) -> str:
        v = item_attrs[a]
        return {"colour": f"the {v} colour", "shape": f"the {v} shape", "pattern": f"the {v} pattern" if v != "solid" else "the solid fill",
                "category": f"having a {v}", "style": f"the {v} style"}[a]

    if rating >= 4:
        reasons = " and ".join(describe(a) for a in liked[:2]) or f"it as a {cat}"
        return f"I love {reasons}. A great {cat}.", f"Great {cat}"
    if rating <= 2:
        reasons = " and ".join(describe(a) for a in disliked[:2]) or "the look of it"
        return f"Not for me: I did not like {reasons}.", f"Disappointing {cat}"
    mixed = describe(liked[0]) if liked else describe("style")
    return f"It is fine. I like {mixed}, but it is nothing special.", f"An okay {cat}"


def generate(cfg: SyntheticConfig, progress: bool = True) -> tuple[list[ItemRow], list[InteractionRow], dict]:
    """Draw the catalogue, the users and their sequences. Returns rows and the hidden generator state."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(cfg.seed)
    world = _draw_world(cfg, rng)
    names = {a: ALL_ATTRS[a] for a in ALL_ATTRS}

    def item_attr(i: int) -> dict[str, str]:
        return {a: names[a][int(world["attrs"][a][i])] for a in ALL_ATTRS}

    items = []
    for i in tqdm(range(cfg.n_items), desc="drawing items", disable=not progress):
        ia = item_attr(i)
        title, text = _item_text(rng, ia["category"], ia["style"])
        img = draw_item_image(ia["colour"], ia["shape"], ia["pattern"], cfg.image_size, rng)
        items.append(ItemRow(item_id=str(i), title=title, text=text,
                             attributes={"category": ia["category"], "style": ia["style"]}, image=img,
                             source="<synthetic>"))

    static = persona_scores(world)
    mean, std = static.mean(1, keepdims=True), static.std(1, keepdims=True)
    fav = {a: world["weights"][a] > 0 for a in ALL_ATTRS}
    bad = {a: world["weights"][a] < 0 for a in ALL_ATTRS}
    bonus = bonuses(cfg)
    personas = rng.choice(cfg.n_personas, size=cfg.n_users, p=world["persona_prior"])
    interactions = []
    for u in tqdm(range(cfg.n_users), desc="drawing users", disable=not progress):
        k = int(personas[u])
        length = int(rng.integers(cfg.min_length, cfg.max_length + 1))
        t = cfg.start_time + int(rng.integers(0, 180 * 86400))
        consumed = np.zeros(cfg.n_items, dtype=bool)
        prev = None
        for _ in range(length):
            logits = static[k] + (dynamics_bonus(world, bonus, prev) if prev is not None else 0.0)
            logits = np.where(consumed, -np.inf, logits)
            p = np.exp(logits - logits.max())
            i = int(rng.choice(cfg.n_items, p=p / p.sum()))
            consumed[i] = True
            prev = i
            t += 60 + int(rng.exponential(86400))
            z = (static[k, i] - mean[k, 0]) / std[k, 0]
            rating = int(np.clip(np.round(3.0 + 1.1 * z + rng.normal(0, 0.5)), 1, 5))
            ia = item_attr(i)
            liked = [a for a in ALL_ATTRS if fav[a][k, world["attrs"][a][i]]]
            disliked = [a for a in ALL_ATTRS if bad[a][k, world["attrs"][a][i]]]
            review, summary = _review(rng, ia, liked, disliked, rating)
            interactions.append(InteractionRow(user_id=str(u), item_id=str(i), timestamp=t, rating=float(rating),
                                               review=review, summary=summary, source="<synthetic>"))
    hidden = {
        "version": GENERATOR_VERSION,
        "config": asdict(cfg),
        "attribute_values": {a: list(v) for a, v in ALL_ATTRS.items()},
        "image_attributes": list(IMAGE_ATTRS),
        "text_attributes": list(TEXT_ATTRS),
        "item_attributes": {a: world["attrs"][a].tolist() for a in ALL_ATTRS},
        "popularity": [round(float(x), 6) for x in world["popularity"]],
        "persona_weights": {a: world["weights"][a].tolist() for a in ALL_ATTRS},
        "persona_prior": world["persona_prior"].tolist(),
        "user_persona": personas.tolist(),
    }
    return items, interactions, hidden


def world_from_hidden(hidden: dict) -> dict:
    """Rebuild the arrays the oracle needs from generator.json."""
    popularity = np.asarray(hidden["popularity"])
    return {
        "attrs": {a: np.asarray(v) for a, v in hidden["item_attributes"].items()},
        "popularity": popularity,
        "weights": {a: np.asarray(v) for a, v in hidden["persona_weights"].items()},
        "persona_prior": np.asarray(hidden["persona_prior"]),
    }


def prepare_default(out: str | Path, cfg: SyntheticConfig | None = None, overwrite: bool = False, progress: bool = True):
    """Generate the default domain into `out`, with its oracle numbers in domain.json."""
    from .domain import Domain
    from .oracle import oracle_report

    cfg = cfg or SyntheticConfig()
    items, interactions, hidden = generate(cfg, progress=progress)
    domain = write_domain(
        out, name=f"default-seed{cfg.seed}", source="recfm built-in synthetic domain",
        items=items, interactions=interactions, extra_files={"generator.json": json.dumps(hidden, sort_keys=True) + "\n"},
        extra_meta={"generator": asdict(cfg)}, overwrite=overwrite, progress=progress,
    )
    report = oracle_report(domain)
    meta = dict(domain.meta, oracle=report)
    (Path(out) / "domain.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Domain(out)
