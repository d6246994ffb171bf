"""Task templates (loaded from templates.yaml) and their filling into chat messages.

Filling a template gives a conversation: a user turn whose content is a list of parts (text, items,
images) and an assistant turn with the answer. Parts are plain dicts, the same shape the HTTP API
accepts, so training examples, evaluation prompts and served requests go through one renderer:

    {"type": "text", "text": "..."}
    {"type": "item", "item_id": "12", "view": "history" | "full" | "id" | "image" | "codes",
     "rating": 4.0, "history": true}
    {"type": "image", "image": "<opaque reference>"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

PLACEHOLDER = re.compile(r"\{(\w+)\}")
PROMPT_SLOTS = {"history", "item", "candidates", "image_a", "image_b", "rating", "query"}
ANSWER_SLOTS = {"target", "image_codes", "review", "yes_no", "choice", "rating"}


@dataclass(frozen=True)
class Template:
    id: str
    task: str
    family: str
    prompt: str
    answer: str
    held_out: bool = False

    @property
    def slots(self) -> set[str]:
        return set(PLACEHOLDER.findall(self.prompt))


def load_templates(path: str | Path | None = None) -> dict[str, list[Template]]:
    """Task name -> its templates. Validates every placeholder and that ids are unique."""
    return _load(str(path) if path else None)


@lru_cache(maxsize=4)
def _load(path: str | None) -> dict[str, list[Template]]:
    text = Path(path).read_text() if path else resources.files(__package__).joinpath("templates.yaml").read_text()
    spec = yaml.safe_load(text)
    where = path or "recfm/instructions/templates.yaml"
    out: dict[str, list[Template]] = {}
    seen: set[str] = set()
    for task, t in spec["tasks"].items():
        answer = t["answer"]
        if not set(PLACEHOLDER.findall(answer)) <= ANSWER_SLOTS:
            raise ValueError(f"{where}: task {task!r} answer {answer!r} uses an unknown placeholder")
        out[task] = []
        for raw in t["templates"]:
            tpl = Template(id=raw["id"], task=task, family=t["family"], prompt=raw["prompt"], answer=answer,
                           held_out=bool(raw.get("held_out", False)))
            if tpl.id in seen:
                raise ValueError(f"{where}: template id {tpl.id!r} appears twice")
            seen.add(tpl.id)
            unknown = tpl.slots - PROMPT_SLOTS
            if unknown:
                raise ValueError(f"{where}: template {tpl.id!r} uses unknown placeholder(s) {sorted(unknown)}")
            out[task].append(tpl)
    return out


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def item_part(item_id: str, view: str, rating: float | None = None, history: bool = False) -> dict:
    part = {"type": "item", "item_id": item_id, "view": view}
    if rating is not None:
        part["rating"] = rating
    if history:
        part["history"] = True
    return part


def fill(template: Template, values: dict, answer: bool = True) -> list[dict]:
    """Messages for one example (only the user turn with answer=False: a prompt to serve). `values` holds what the slots need:
    history: [(item_id, rating|None)], item, candidates: [item_id], image_a, image_b (item ids),
    rating, query, and for the answer: target, review, yes_no, choice, image_codes (= target)."""
    user: list[dict] = []
    pos = 0
    for m in PLACEHOLDER.finditer(template.prompt):
        if m.start() > pos:
            user.append(text_part(template.prompt[pos : m.start()]))
        user += _slot(m.group(1), values, template)
        pos = m.end()
    if pos < len(template.prompt):
        user.append(text_part(template.prompt[pos:]))
    messages = [{"role": "user", "content": _merge_text(user)}]
    if answer:
        messages.append({"role": "assistant", "content": _answer(template, values)})
    return messages


def _slot(name: str, v: dict, tpl: Template) -> list[dict]:
    if name not in v or v[name] is None:
        raise KeyError(f"template {tpl.id!r} needs a value for {{{name}}}")
    if name == "history":
        return [item_part(i, "history", r, history=True) for i, r in v["history"]]
    if name == "item":
        return [item_part(v["item"], "full")]
    if name == "candidates":
        parts = []
        for k, c in enumerate(v["candidates"]):
            parts += [text_part(f" ({k + 1}) "), item_part(c, "full")]
        return parts
    if name in ("image_a", "image_b"):
        return [item_part(v[name], "image")]
    return [text_part(_fmt(v[name]))]


def _answer(tpl: Template, v: dict) -> list[dict]:
    name = PLACEHOLDER.fullmatch(tpl.answer).group(1)
    if name == "target":
        return [item_part(v["target"], "id")]
    if name == "image_codes":
        return [item_part(v["target"], "codes")]
    if v.get(name) is None:
        raise KeyError(f"template {tpl.id!r} needs an answer value for {{{name}}}")
    return [text_part(_fmt(v[name]))]


def _fmt(x) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _merge_text(parts: list[dict]) -> list[dict]:
    out: list[dict] = []
    for p in parts:
        if p["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = text_part(out[-1]["text"] + p["text"])
        elif not (p["type"] == "text" and not p["text"]):
            out.append(p)
    return out
