"""The `recfm` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="recfm: a multimodal foundation model for recommendation.", no_args_is_help=True,
                  add_completion=False)
data_app = typer.Typer(help="Prepare domains from public formats or your own files, and inspect them.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

SOURCES = ("movielens", "amazon-reviews", "generic", "default")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(2)


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(..., help=f"one of: {', '.join(SOURCES)}"),
    output: Path = typer.Option(..., "--output", "-o", help="the domain folder to write"),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="input file or folder (not for 'default')"),
    skip_bad_rows: bool = typer.Option(False, help="skip and count bad rows instead of stopping at the first"),
    overwrite: bool = typer.Option(False, help="replace an existing domain folder"),
    posters: Optional[Path] = typer.Option(None, help="movielens: the ML-1M posters folder (found beside the input otherwise)"),
    metadata: Optional[Path] = typer.Option(None, help="amazon-reviews: item metadata JSON lines"),
    images: Optional[Path] = typer.Option(None, help="amazon-reviews/generic: folder of item images"),
    interactions: Optional[Path] = typer.Option(None, help="generic: interactions CSV/TSV/JSONL"),
    items: Optional[Path] = typer.Option(None, help="generic: items CSV/TSV/JSONL"),
    user_col: str = typer.Option("user_id", help="generic: user column"),
    item_col: str = typer.Option("item_id", help="generic: item column in interactions"),
    time_col: str = typer.Option("timestamp", help="generic: timestamp column (Unix seconds or ISO 8601)"),
    rating_col: str = typer.Option("rating", help="generic: rating column"),
    review_col: str = typer.Option("review", help="generic: review text column"),
    summary_col: str = typer.Option("summary", help="generic: review summary column"),
    item_id_col: str = typer.Option("item_id", help="generic: item id column in the items file"),
    title_col: str = typer.Option("title", help="generic: item title column"),
    text_col: str = typer.Option("text", help="generic: item text column"),
    image_col: str = typer.Option("image", help="generic: item image file column"),
    name: Optional[str] = typer.Option(None, help="generic: the domain's name"),
    seed: int = typer.Option(0, help="default: generator seed"),
    n_items: int = typer.Option(500, "--items-count", help="default: catalogue size"),
    n_users: int = typer.Option(1000, "--users-count", help="default: number of users"),
    image_size: int = typer.Option(32, help="default: image size in pixels (32-128)"),
):
    """Convert a data source into a domain folder."""
    from recfm.data import DataError

    try:
        if source == "default":
            from recfm.data.synthetic import SyntheticConfig, prepare_default

            cfg = SyntheticConfig(seed=seed, n_items=n_items, n_users=n_users, image_size=image_size)
            domain = prepare_default(output, cfg, overwrite=overwrite)
        elif source == "movielens":
            from recfm.data.movielens import prepare_movielens

            domain = prepare_movielens(input or _fail("movielens needs --input"), output, posters=posters,
                                       skip_bad_rows=skip_bad_rows, overwrite=overwrite)
        elif source == "amazon-reviews":
            from recfm.data.amazon import prepare_amazon

            domain = prepare_amazon(input or _fail("amazon-reviews needs --input"), output, metadata=metadata,
                                    images=images, skip_bad_rows=skip_bad_rows, overwrite=overwrite)
        elif source == "generic":
            from recfm.data.generic import Columns, prepare_generic

            cols = Columns(user=user_col, item=item_col, timestamp=time_col, rating=rating_col, review=review_col,
                           summary=summary_col, item_id=item_id_col, title=title_col, text=text_col, image=image_col)
            domain = prepare_generic(output, input_dir=input, interactions=interactions, items=items, images=images,
                                     columns=cols, name=name, skip_bad_rows=skip_bad_rows, overwrite=overwrite)
        else:
            _fail(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))
    skipped = domain.meta["skipped"]
    console.print(f"wrote {domain!r} to {output}")
    if skipped["total"]:
        console.print(f"[yellow]skipped {skipped['total']} bad rows:[/] " +
                      ", ".join(f"{n} {r}" for r, n in skipped["by_reason"].items()))
        for reason, examples in skipped["examples"].items():
            for ex in examples[:2]:
                console.print(f"  {reason}: {ex}")


@data_app.command("stats")
def data_stats(
    domain_dir: Path = typer.Argument(..., help="a domain folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    cold_fraction: float = typer.Option(0.05, help="fraction of items held out as cold"),
    seed: int = typer.Option(0, help="seed of the cold-item draw"),
):
    """Users, items, interactions, images, split sizes, sequence lengths (and the default domain's oracle)."""
    from recfm.data import load_domain
    from recfm.data.stats import domain_stats

    try:
        s = domain_stats(load_domain(domain_dir), cold_fraction, seed)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(s, indent=2))
        return
    t = Table(title=f"{s['name']} ({s['source']})", show_header=False)
    for k in ("users", "items", "interactions", "items_with_image", "interactions_with_review", "skipped"):
        t.add_row(k.replace("_", " "), f"{s[k]:,}")
    t.add_row("sequence length", "  ".join(f"{k} {v:g}" for k, v in s["sequence_length"].items()))
    for split, sizes in s["splits"].items():
        t.add_row(f"split: {split.replace('_', '-')}", "  ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in sizes.items()))
    console.print(t)
    if "oracle" in s:
        o = Table(title="oracle: best achievable full ranking (leave-one-out)")
        o.add_column("split")
        o.add_column("ranker")
        metrics = ("hr@5", "hr@10", "hr@20", "ndcg@10", "mrr")
        for m in metrics:
            o.add_column(m, justify="right")
        for split, rankers in s["oracle"].items():
            for ranker, vals in rankers.items():
                o.add_row(split, ranker.replace("_", " "), *(f"{vals[m]:.4f}" for m in metrics))
        console.print(o)


@app.command()
def tokenize(
    domain_dir: Path = typer.Argument(..., help="a prepared domain folder"),
    output: Path = typer.Option(..., "--output", "-o", help="where the tokenizers go"),
    vocab_size: int = typer.Option(4096, help="text BPE vocabulary size"),
    semantic_levels: int = typer.Option(3, help="levels of the semantic item ids (plus a collision level)"),
    vq_steps: int = typer.Option(1500, help="VQ image tokenizer training steps"),
    vq_image_size: Optional[int] = typer.Option(None, help="VQ image size (32 or 64; by default from the images)"),
    vq_codebook: int = typer.Option(512, help="VQ codebook size (image tokens in the vocabulary)"),
    seed: int = typer.Option(0, help="seed for k-means and VQ training"),
):
    """Train the text, item-identifier and VQ image tokenizers of a domain."""
    from recfm.tokenizers.build import tokenize_domain

    try:
        s = tokenize_domain(domain_dir, output, vocab_size=vocab_size, semantic_levels=semantic_levels,
                            vq_steps=vq_steps, vq_image_size=vq_image_size, vq_codebook=vq_codebook, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"wrote tokenizers for {s['domain']} to {output}")
    console.print(json.dumps(s, indent=2))


@app.command()
def quickstart(
    workdir: Path = typer.Option(Path("runs/quickstart"), help="where the domain and the run go"),
    seed: int = typer.Option(0, help="seed for data generation"),
):
    """Generate the built-in default domain and show what it holds (the model stages will follow)."""
    from recfm.data import load_domain
    from recfm.data.synthetic import SyntheticConfig, prepare_default

    domain_dir = workdir / "domain"
    if (domain_dir / "domain.json").exists():
        console.print(f"using the default domain already in {domain_dir}")
        load_domain(domain_dir)
    else:
        console.rule("1/1  the built-in default domain")
        prepare_default(domain_dir, SyntheticConfig(seed=seed))
    data_stats(domain_dir, as_json=False, cold_fraction=0.05, seed=0)
    console.print(
        "[bold]recfm quickstart stops after the data stage in this version:[/] tokenizers, training, "
        "evaluation and serving are not built yet."
    )


if __name__ == "__main__":
    app()
