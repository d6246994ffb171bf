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
export_app = typer.Typer(help="Export a run's weights for other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

SOURCES = ("movielens", "amazon-reviews", "generic", "default")
_QUANT = typer.Option("none", help="weights: none, bf16, int8, nf4 or fp4 (see recfm/serving/quantization.py)")


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


def _parse_value(v: str):
    """--set values: numbers (3e-3 included, which YAML 1.1 reads as a string), then YAML."""
    import yaml

    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return yaml.safe_load(v)


def _train_command(stage: str, config: Optional[Path], domain: Optional[Path], tokenizers: Optional[Path],
                   output: Optional[Path], init_from: Optional[Path], preset: Optional[str], fusion: Optional[str],
                   item_mode: Optional[str], max_steps: Optional[int], sets: list[str]):
    from recfm.training import TrainConfig, train

    overrides = dict(stage=stage, domain=str(domain) if domain else None, tokenizers=str(tokenizers) if tokenizers else None,
                     output=str(output) if output else None, init_from=str(init_from) if init_from else None,
                     preset=preset, fusion=fusion, item_mode=item_mode, max_steps=max_steps)
    for kv in sets:
        if "=" not in kv:
            _fail(f"--set takes key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        overrides[k.strip()] = _parse_value(v)
    try:
        cfg = TrainConfig.load(config, **overrides)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    run = train(cfg)
    console.print(f"[bold green]{stage} done:[/] {run} (model, tokenizers, loss.png, logs/)")
    return run


_CONFIG = typer.Option(None, "--config", "-c", help="a YAML training config (see recfm/training/config.py for every field)")
_DOMAIN = typer.Option(None, "--domain", "-d", help="a domain folder")
_TOK = typer.Option(None, "--tokenizers", "-t", help="a recfm tokenize folder")
_OUT = typer.Option(None, "--output", "-o", help="the run folder to write")
_INIT = typer.Option(None, "--init-from", help="a run folder to start from")
_PRESET = typer.Option(None, help="model size: tiny, small, base")
_FUSION = typer.Option(None, help="early or cross_attention")
_ITEMS = typer.Option(None, "--item-mode", help="atomic, semantic or content")
_STEPS = typer.Option(None, help="stop after this many optimizer steps")
_SET = typer.Option([], "--set", help="any config field: --set lr=3e-4 (repeatable)")


def _register_stage(stage: str, doc: str) -> None:
    """pretrain and tune take the same options; one definition registers both."""

    def command(config: Optional[Path] = _CONFIG, domain: Optional[Path] = _DOMAIN, tokenizers: Optional[Path] = _TOK,
                output: Optional[Path] = _OUT, init_from: Optional[Path] = _INIT, preset: Optional[str] = _PRESET,
                fusion: Optional[str] = _FUSION, item_mode: Optional[str] = _ITEMS, max_steps: Optional[int] = _STEPS,
                set_: list[str] = _SET):
        _train_command(stage, config, domain, tokenizers, output, init_from, preset, fusion, item_mode, max_steps, set_)

    command.__doc__ = doc
    app.command(stage)(command)


_register_stage("pretrain", "Multimodal pretraining on serialized histories (next item over item spans, image-text alignment).")
_register_stage("tune", "Multitask instruction tuning over all five task families.")


@app.command()
def finetune(config: Optional[Path] = _CONFIG, domain: Optional[Path] = _DOMAIN, init_from: Optional[Path] = _INIT,
             output: Optional[Path] = _OUT, max_steps: Optional[int] = _STEPS, set_: list[str] = _SET):
    """LoRA fine-tuning of a tuned run (PEFT adapters, merged into the saved model)."""
    _train_command("finetune", config, domain, None, output, init_from, None, None, None, max_steps, set_)


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="a run folder"),
    data: Path = typer.Option(..., "--data", help="the domain folder to evaluate on"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks (default: all)"),
    max_users: Optional[int] = typer.Option(None, help="evaluate the first N test users only"),
    stage: str = typer.Option("test", help="test or valid"),
    output: Optional[Path] = typer.Option(None, help="where eval.json and eval.png go (default RUN/eval)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    seed: int = typer.Option(0, help="seed for negatives and image sampling"),
    quantization: str = _QUANT,
    split: str = typer.Option("leave_one_out", help="leave_one_out, or cold_items for a run trained with that split "
                                                     "(next-item prediction of items it never saw)"),
    id_view_weight: Optional[list[float]] = typer.Option(
        None, help="also rank next items from the prompts fused with the identifier view at this weight (repeatable; "
                   "default: the run's own id_view_weight)"),
):
    """Evaluate every task family against baselines; writes JSON and a PNG plot."""
    from recfm.eval.report import print_report
    from recfm.eval.runner import evaluate, save_report

    try:
        report = evaluate(run, data, tasks=tasks.split(",") if tasks else None, stage=stage, max_users=max_users, seed=seed,
                          quantization=quantization, split=split, id_view_weight=id_view_weight or None)
    except ValueError as e:
        _fail(str(e))
    out = save_report(report, output or run / "eval")
    if as_json:
        print(json.dumps({k: v for k, v in report.items() if k != "per_example"}, indent=2, default=float))
    else:
        print_report(report, console)
        console.print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")


@export_app.command("llama")
def export_llama(
    run: Path = typer.Argument(..., help="a run folder"),
    output: Path = typer.Argument(..., help="where the checkpoint goes"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
):
    """The text path (decoder + output head + tokenizer) as a plain Llama-family checkpoint, for
    vLLM or any other runtime; images and content-item vectors do not carry over."""
    import torch

    from recfm.foundation.export import export_text_model

    if dtype not in ("float32", "bfloat16"):
        _fail(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    try:
        out = export_text_model(run, output, getattr(torch, dtype))
    except (FileNotFoundError, OSError, ValueError) as e:
        _fail(str(e))
    console.print(f"wrote {out}")


QUICKSTART_TOKENIZERS = dict(vocab_size=2048, vq_steps=800, vq_codebook=256, vq_channels=32, vq_batch_size=32)


def quickstart_config(stage: str, domain_dir: Path, output: Path, source: Path, steps: int, preset: str = "small",
                      seed: int = 0):
    """The quickstart's TrainConfig of one stage: `source` is the tokenizers folder for pretraining, the
    pretrained run for tuning (benchmarks/quickstart_bench.py trains with the same settings)."""
    from recfm.training import TrainConfig

    common = dict(domain=str(domain_dir), preset=preset, seed=seed, batch_size=8, logging_steps=10, save_steps=100,
                  max_history=10, max_tokens=512, n_candidates=5, output=str(output), max_steps=steps)
    if stage == "pretrain":
        return TrainConfig(stage="pretrain", tokenizers=str(source), lr=2e-3, **common)
    return TrainConfig(stage=stage, init_from=str(source), lr=1e-3, **common)


@app.command()
def quickstart(
    workdir: Path = typer.Option(Path("runs/quickstart"), help="where the domain, tokenizers and runs go"),
    seed: int = typer.Option(0, help="seed for data generation and training"),
    pretrain_steps: int = typer.Option(250, help="pretraining steps"),
    tune_steps: int = typer.Option(450, help="instruction-tuning steps (450 chosen on the default domain's validation split over every task family)"),
    eval_users: int = typer.Option(100, help="test users to evaluate"),
    preset: str = typer.Option("small", help="model size"),
):
    """The whole pipeline on the built-in default domain: data, tokenizers, pretraining, instruction
    tuning, evaluation of all five task families against popularity and the oracle."""
    import time

    from recfm.data.synthetic import SyntheticConfig, prepare_default
    from recfm.eval.report import print_report
    from recfm.eval.runner import evaluate, save_report
    from recfm.tokenizers.build import tokenize_domain
    from recfm.training import train

    t0 = time.perf_counter()
    domain_dir, tok_dir = workdir / "domain", workdir / "tokenizers"
    pre_dir, run_dir = workdir / "pretrain", workdir / "run"
    console.rule("1/5  the built-in default domain")
    if (domain_dir / "domain.json").exists():
        console.print(f"using {domain_dir}")
    else:
        prepare_default(domain_dir, SyntheticConfig(seed=seed))
    console.rule("2/5  tokenizers (text BPE, item ids, VQ images)")
    if (tok_dir / "tokenizers.json").exists():
        console.print(f"using {tok_dir}")
    else:
        tokenize_domain(domain_dir, tok_dir, **QUICKSTART_TOKENIZERS, seed=seed)
    console.rule("3/5  multimodal pretraining")
    train(quickstart_config("pretrain", domain_dir, pre_dir, tok_dir, pretrain_steps, preset, seed))
    console.rule("4/5  multitask instruction tuning")
    train(quickstart_config("tune", domain_dir, run_dir, pre_dir, tune_steps, preset, seed))
    console.rule("5/5  evaluation")
    report = evaluate(run_dir, domain_dir, max_users=eval_users, seed=seed)
    save_report(report, run_dir / "eval")
    print_report(report, console)
    minutes = (time.perf_counter() - t0) / 60
    console.print(f"\n[bold]done in {minutes:.1f} min.[/] The run folder {run_dir} loads with "
                  "RecFMForCausalLM.from_pretrained (import recfm.foundation first).")
    console.print(f"evaluate again:  recfm eval {run_dir} --data {domain_dir}")
    console.print(f"chat with it:    recfm chat {run_dir}")
    console.print(f"serve it:        recfm serve {run_dir} --port 8000   (OpenAI-compatible: /v1/chat/completions)")


def _engine_config(block_size: int, kv_cache_mb: int, max_num_seqs: int, max_batched_tokens: int, max_model_len: Optional[int],
                   prefix_caching: bool = True, chunked_prefill: bool = True):
    from recfm.serving.engine import EngineConfig

    return EngineConfig(block_size=block_size, kv_cache_bytes=kv_cache_mb * 2**20, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_batched_tokens, max_model_len=max_model_len,
                        prefix_caching=prefix_caching, chunked_prefill=chunked_prefill)


def _load_service(run: Path, data: Optional[Path], dtype: str, engine_config, model_id: Optional[str] = None,
                  allowed_image_dirs: Optional[list[Path]] = None, quantization: str = "none"):
    import torch

    from recfm.serving.service import Service

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        _fail(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    try:
        return Service(run, data, engine_config, dtype=dtypes[dtype], model_id=model_id,
                       allowed_image_dirs=allowed_image_dirs or [], quantization=quantization)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


_BLOCK = typer.Option(16, help="KV-cache block size in tokens")
_KV_MB = typer.Option(512, help="KV-cache size in MiB (preallocated)")
_SEQS = typer.Option(64, help="most sequences in one step")
_TOKENS = typer.Option(512, help="token budget of one step (chunked prefill splits longer prompts)")
_MAXLEN = typer.Option(None, help="context length (default: the model's)")
_DTYPE = typer.Option("float32", help="float32 or bfloat16 weights and KV cache")
_DATA = typer.Option(None, "--data", help="the domain whose items the model talks about (default: the run's)")


@app.command()
def serve(
    run: Path = typer.Argument(..., help="a run folder"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    data: Optional[Path] = _DATA,
    api_key: Optional[str] = typer.Option(None, envvar="RECFM_API_KEY", help="require 'Authorization: Bearer KEY'"),
    model_id: Optional[str] = typer.Option(None, help="the model name clients send (default: the run folder's name)"),
    dtype: str = _DTYPE,
    block_size: int = _BLOCK,
    kv_cache_mb: int = _KV_MB,
    max_num_seqs: int = _SEQS,
    max_batched_tokens: int = _TOKENS,
    max_model_len: Optional[int] = _MAXLEN,
    max_waiting: int = typer.Option(256, help="requests allowed to wait; more get 429"),
    engine_loop: str = typer.Option("inline", help="inline: the engine steps on the server's event loop (1.2x the "
                                    "tokens/s here); thread: on a thread of its own, so HTTP is answered during long steps"),
    no_prefix_caching: bool = typer.Option(False, help="turn prefix caching off"),
    allowed_image_dir: Optional[list[Path]] = typer.Option(None, help="a folder image_url parts may name files in (repeatable)"),
    quantization: str = _QUANT,
):
    """Serve a run over HTTP: OpenAI-compatible chat/completions, recommendations, image generation."""
    import time

    import uvicorn

    from recfm.serving.api import build_app
    from recfm.serving.async_engine import LOOPS

    if engine_loop not in LOOPS:  # before anything is loaded
        _fail(f"--engine-loop must be one of {', '.join(LOOPS)}, got {engine_loop!r}")
    t0 = time.perf_counter()
    cfg = _engine_config(block_size, kv_cache_mb, max_num_seqs, max_batched_tokens, max_model_len, not no_prefix_caching)
    service = _load_service(run, data, dtype, cfg, model_id, allowed_image_dir, quantization)
    app_ = build_app(service, api_key=api_key, max_waiting=max_waiting, engine_loop=engine_loop)
    eng = service.engine
    console.print(f"serving [bold]{service.model_id}[/] ({service.model.config.item_mode} ids, {len(service.catalogue)} items, "
                  f"weights {service.quantization['option']}) "
                  f"on http://{host}:{port}  ·  KV cache {eng.blocks.num_blocks} blocks x {eng.blocks.block_size} tokens "
                  f"({eng.runner.cache.nbytes / 2**20:.0f} MiB)  ·  loaded in {time.perf_counter() - t0:.1f} s", highlight=False)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def chat(
    run: Path = typer.Argument(..., help="a run folder"),
    data: Optional[Path] = _DATA,
    max_tokens: int = typer.Option(128, help="longest answer"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    dtype: str = _DTYPE,
    quantization: str = _QUANT,
):
    """Chat with a run in the terminal. Lines starting with /item ID or /image PATH attach an item or
    an image to your next message; /reset starts over; /quit (or end of input) leaves."""
    import sys

    from recfm.serving.sequence import ParamError, SamplingParams
    from recfm.serving.service import BadInput

    service = _load_service(run, data, dtype, _engine_config(16, 64, 4, 512, None), allowed_image_dirs=[Path("/")],
                            quantization=quantization)
    eng = service.engine
    console.print(f"chatting with [bold]{service.model_id}[/]: {len(service.catalogue)} items. "
                  "/item ID, /image PATH, /reset, /quit", highlight=False)
    history: list[dict] = []
    parts: list[dict] = []
    images: dict = {}
    turn = 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, parts, images = [], [], {}
            console.print("(new conversation)")
            continue
        try:
            if line.startswith("/item "):
                item_id = line.split(maxsplit=1)[1]
                service.check_item(item_id, "/item")
                parts.append({"type": "item", "item_id": item_id, "view": "full"})
                console.print(f"(attached item {item_id}: {service.catalogue[item_id].title})", highlight=False)
                continue
            if line.startswith("/image "):
                key, px = service.image_pixels(line.split(maxsplit=1)[1], "/image")
                images[key] = px
                parts.append({"type": "image", "image": key})
                console.print("(attached image)")
                continue
            history.append({"role": "user", "content": [*parts, {"type": "text", "text": line}]})
            parts = []
            prompt, _ = service.prompt(history, images)
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        except (BadInput, ParamError) as e:
            err_console.print(f"[red]{escape(str(e))}[/]")
            if history and history[-1]["role"] == "user" and not parts:
                history.pop()
            continue
        turn += 1
        eng.add_request(f"chat-{turn}", prompt, params)
        console.print("recfm> ", end="")
        answer = ""
        while eng.has_unfinished():
            for out in eng.step():
                for o in out.outputs:
                    answer += o.text
                    console.print(o.text, end="", highlight=False, markup=False)
        console.print()
        history.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    app()
