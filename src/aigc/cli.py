"""The `aigc` command line: one sub-command per stage of the loop.

Thin by design: parse options, call the library, print. Results go to stdout, logs and progress to
stderr. A user error (`AigcError`) is printed as one line and the exit code is 1; nothing else is
caught, so a bug still shows its traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from aigc import __version__
from aigc.errors import AigcError

out = Console()  # results
err = Console(stderr=True)  # logs, progress, errors

app = typer.Typer(
    name="aigc",
    help="AIGC Studio: train, evaluate, serve and tune generative models on your own data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        out.print(f"aigc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """AIGC Studio: collect -> preprocess -> train -> evaluate -> deploy -> generate -> rate -> tune."""


# Shared option types, so every sub-command spells them the same way.
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Config override key=value, e.g. --set train.lr=3e-4 (repeatable)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")]


# ============================================================================ data
# (collect + preprocess) `aigc data prepare|list|show`

data_app = typer.Typer(help="Collect and preprocess data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _data_kinds() -> list[str]:
    """Data kinds `data prepare` can make here: text always, others when their module is installed."""
    import importlib.util

    kinds = ["text"]
    if importlib.util.find_spec("aigc.data.images") is not None:
        kinds.append("image")
    if importlib.util.find_spec("aigc.data.music") is not None:
        kinds.append("music")
    return kinds


@data_app.command("prepare")
def data_prepare(
    source: Annotated[
        str,
        typer.Argument(
            help="A file, a directory, a JSON Lines file, or a built-in corpus (`aigc data list`)."
        ),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory (must be new or empty).")],
    kind: Annotated[
        str, typer.Option("--kind", help="What the data is: text (image, music where available).")
    ] = "text",
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="char | bpe (trained on the data; default char), or a run directory / tokenizer.json to "
            "encode with as is (to fine-tune that run with --init-from, or evaluate it).",
        ),
    ] = None,
    vocab_size: Annotated[
        int | None, typer.Option("--vocab-size", help="BPE vocabulary size (default 2048).")
    ] = None,
    field: Annotated[
        str | None, typer.Option("--field", help="JSON Lines: the field holding the text.")
    ] = None,
    glob: Annotated[
        str | None, typer.Option("--glob", help="Directory: which files, e.g. '**/*.py'.")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option("--val-fraction", help="Share held out for validation (default 0.1).")
    ] = None,
    dedup: Annotated[
        bool | None, typer.Option("--dedup/--no-dedup", help="Drop exact duplicate documents.")
    ] = None,
    scrub_pii: Annotated[
        bool | None,
        typer.Option(
            "--scrub-pii/--no-scrub-pii", help="Mask e-mails, phone numbers, long digit runs (default on)."
        ),
    ] = None,
    unknown: Annotated[
        str | None,
        typer.Option(
            "--unknown",
            help="char: unseen characters -> error | unk (default error; a reused tokenizer keeps its own).",
        ),
    ] = None,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", help="Use at most this many bytes of text.")
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="Fetch a missing built-in corpus (checksum-verified).")
    ] = False,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Clean, split and tokenize a source into DIR (train.bin, val.bin, tokenizer.json, meta.json)."""
    from aigc.config import merge, parse_overrides

    kinds = _data_kinds()
    if kind not in kinds:
        raise AigcError(f"unknown --kind {kind!r}; kinds available here: {', '.join(kinds)}")
    flags = {
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "field": field,
        "glob": glob,
        "val_fraction": val_fraction,
        "dedup": dedup,
        "scrub_pii": scrub_pii,
        "unknown": unknown,
        "max_bytes": max_bytes,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if kind == "image":
        if given or download:
            names = ", ".join("--" + k.replace("_", "-") for k in given) or "--download"
            raise AigcError(
                f"{names}: text options do not apply to --kind image; use --set for image settings"
            )
        from aigc.data.images import prepare_images

        meta = prepare_images(source, out, overrides=set_, overwrite=overwrite)
        stats = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
        typer.echo(f"prepared {out}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        return
    if kind == "music":  # MIDI / MusicXML / ABC / kern, or music21:bach | music21:folk
        if given or download:
            names = ", ".join("--" + k.replace("_", "-") for k in given) or "--download"
            raise AigcError(
                f"{names}: text options do not apply to --kind music; use --set for music settings "
                "(e.g. --set limit=50 --set transpose=2 --set val_fraction=0.1)"
            )
        from aigc.data.music import prepare_music

        meta = prepare_music(source, out, overrides=set_, overwrite=overwrite, log=lambda m: err.print(m))
        skipped = meta["skipped"]
        typer.echo(
            f"prepared {out}: {meta['documents']:,} pieces ({meta['train_documents']:,} train / "
            f"{meta['val_documents']:,} val), {meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
            f"tokens, music tokenizer with vocab {meta['vocab_size']:,}; skipped {skipped['corrupt']} "
            f"corrupt file(s){' e.g. ' + ', '.join(skipped['corrupt_files']) if skipped['corrupt'] else ''}"
        )
        return

    from aigc.data import prepare_text

    overrides = parse_overrides(set_)
    if isinstance(overrides.get("data"), dict):  # `--set data.seed=3` reads as `--set seed=3`
        overrides = merge({k: v for k, v in overrides.items() if k != "data"}, overrides["data"])
    overrides = merge(overrides, given)
    meta = prepare_text(
        source, out, overrides=overrides, overwrite=overwrite, download=download, log=lambda m: err.print(m)
    )
    tok = meta["tokenizer"]
    typer.echo(
        f"prepared {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
        f"({meta['dtype']}), {tok['kind']} tokenizer with vocab {meta['vocab_size']:,}"
        f"{' from ' + tok['from'] if 'from' in tok else ''}, "
        f"{meta['chars_per_token']} chars/token, {meta['documents']:,} document(s)"
    )
    cleaning = meta["cleaning"]
    if cleaning["scrub_pii"]:
        typer.echo(
            f"PII masked: {cleaning['emails']} e-mails, {cleaning['phones']} phone numbers, "
            f"{cleaning['digit_runs']} long digit runs"
        )
    if cleaning["dedup"]:
        typer.echo(f"duplicates removed: {cleaning['duplicates_removed']}")
    if cleaning["truncated"]:
        typer.echo(f"stopped at --max-bytes {cleaning['max_bytes']:,} (raise it to use more of the source)")


@data_app.command("list")
def data_list() -> None:
    """Built-in corpora: whether each is available here, where, and its size."""
    from rich.table import Table

    from aigc.data import builtin_status

    table = Table("name", "available", "size", "about")
    for row in builtin_status():
        size = f"{row['size'] / 1e6:.1f} MB" if row["size"] is not None else "-"
        avail = "yes" if row["available"] else ("no (--download)" if row["download"] else "no")
        table.add_row(row["name"], avail, size, f"{row['description']}\n[dim]{row['where']}[/]")
    out.print(table, crop=False)


@data_app.command("show")
def data_show(
    directory: Annotated[str, typer.Argument(help="A directory written by `aigc data prepare`.")],
    tokens: Annotated[
        int, typer.Option("--tokens", help="How many train tokens to decode as a sample.")
    ] = 200,
) -> None:
    """A prepared data set's stats and a decoded sample of its first tokens."""
    from pathlib import Path

    from aigc.utils.io import read_json

    meta_path = Path(directory) / "meta.json"
    if meta_path.is_file() and read_json(meta_path).get("kind") not in (None, "text"):
        meta = read_json(meta_path)  # other kinds: their stats only
        sample = None
    else:
        from aigc.data import describe

        meta, sample = describe(directory, sample_tokens=tokens)
    for key, value in meta.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list) and len(value) > 10:  # e.g. music's per-piece rows
            value = f"[{len(value)} entries; see meta.json]"
        typer.echo(f"{key}: {value}")
    if sample is not None:
        typer.echo(f"--- first {tokens} train tokens, decoded ---")
        typer.echo(sample)


# ============================================================================ train

# family -> "module:function" that trains it. Each is called as
# fn(family, data, out, preset=, overrides=, max_steps=, max_time=, resume=, init_from=, overwrite=,
#    progress=, log=) and returns an aigc.training.TrainResult. Add families here.
TRAINERS: dict[str, str] = {
    "gpt": "aigc.training.text:train_text",
    "lstm": "aigc.training.text:train_text",
    "diffusion": "aigc.training.image_tasks:train_image",
    "vae": "aigc.training.image_tasks:train_image",
    "gan": "aigc.training.image_tasks:train_image",
    "classifier": "aigc.evaluation.sentiment_cli:train_family",
    "music": "aigc.training.music:train_music",  # the gpt trainer on --kind music data
}


@app.command("train")
def train_cmd(
    family: Annotated[str, typer.Argument(help=f"Model family: {', '.join(TRAINERS)}.", show_default=False)],
    data: Annotated[str, typer.Option("--data", "-d", help="Prepared data directory (aigc data prepare).")],
    out_dir: Annotated[
        str, typer.Option("--out", "-o", help="Run directory to write (artifact + checkpoints).")
    ],
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            "-p",
            help="Preset name (tiny, small, base), a .toml path, or auto (sized to --max-time).",
        ),
    ] = "auto",
    set_: SetOpt = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.")
    ] = None,
    max_time: Annotated[
        float | None, typer.Option("--max-time", help="Stop after S seconds; the LR decays over the budget.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")
    ] = False,
    init_from: Annotated[
        str | None,
        typer.Option("--init-from", help="Start from a trained run dir or a transformers Llama folder."),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a model on prepared data; runs under torchrun for DDP with no change."""
    import importlib
    import os

    if family not in TRAINERS:
        raise AigcError(f"unknown model family {family!r}; valid families: {', '.join(TRAINERS)}")
    module, _, fn = TRAINERS[family].partition(":")
    from aigc.training.trainer import TrainingInterrupted

    train = getattr(importlib.import_module(module), fn)
    try:
        result = train(
            family, data, out_dir, preset=preset, overrides=set_, max_steps=max_steps, max_time=max_time,
            resume=resume, init_from=init_from, overwrite=overwrite, progress=True,
            log=lambda msg: err.print(msg, highlight=False),
        )  # fmt: skip
    except TrainingInterrupted as e:  # Ctrl-C: the step reached is saved; say so, exit 130 like any ^C
        err.print(str(e), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    out.print(
        f"trained {family}: {result.steps} steps in {result.elapsed:.1f} s ({result.stopped}){best} -> {result.run_dir}",
        highlight=False,
        soft_wrap=True,
    )


# ============================================================================ generate
# `aigc generate text` (+ `image` later) and `aigc chat`; flags mirror GenerationParams in kebab-case.

generate_app = typer.Typer(help="Generate content with a trained or pretrained model.", no_args_is_help=True)
app.add_typer(generate_app, name="generate")

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Run directory of a trained model, or hf:<dir or hub id>.")
]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass in (0, 1] (1 = off).")]
MinPOpt = Annotated[
    float, typer.Option("--min-p", help="Drop tokens below min-p x the top probability (0 = off).")
]
TypicalOpt = Annotated[float, typer.Option("--typical-p", help="Locally typical sampling mass (1 = off).")]
RepOpt = Annotated[float, typer.Option("--repetition-penalty", help="Penalty for seen tokens (1 = off).")]
PresenceOpt = Annotated[float, typer.Option("--presence-penalty", help="OpenAI presence penalty [-2, 2].")]
FreqOpt = Annotated[float, typer.Option("--frequency-penalty", help="OpenAI frequency penalty [-2, 2].")]
NgramOpt = Annotated[
    int, typer.Option("--no-repeat-ngram-size", help="Never repeat an n-gram of this size (0 = off).")
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Random seed (recorded; same seed -> same text).")
]
StopOpt = Annotated[
    list[str] | None,
    typer.Option("--stop", help="Stop at this string (repeatable; \\n and \\t are escapes)."),
]


def _stops(stop: list[str] | None) -> list[str]:
    return [s.replace("\\n", "\n").replace("\\t", "\t") for s in stop or []]


DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Weights for decoding: float32, bfloat16, float16 (fp16 weights, fp32 compute; fastest "
        "batched) or int8 (weight-only); float16 and int8 are for GPT models.",
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the GPT decode step (float32/float16): faster steps; first call ~15-40 s (1-4 s cached).",
    ),
]


def _dtype(name: str):
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,  # fp16 weights through fbgemm, fp32 activations (our GPT models)
        "fp16": torch.float16,
        "int8": torch.int8,  # weight-only int8 (our GPT models), bf16 activations
    }
    if name not in table:
        raise AigcError(
            f"--dtype {name!r} is not supported; use float32, bfloat16, float16 or int8 (the last two: GPT models)"
        )
    return table[name]


def _write(text: str) -> None:
    sys.stdout.write(text)  # plain write: generated text must not be parsed as rich markup
    sys.stdout.flush()


def _recorded_as(model: str) -> tuple[str, str | None]:
    """(model name, weights hash) for a store row, as `aigc serve` records its runs: `name` or
    `name@version` of the run directory (`runs/ref400` -> `ref400`, `models/story/2` -> `story@2`),
    so rows recorded here and by the server share a name and `aigc tune` finds them; a hub id as given."""
    from pathlib import Path

    from aigc.tuning.versions import model_id, weights_hash

    path = Path(model[3:] if model.startswith("hf:") else model).expanduser()
    if not path.is_dir():
        return model, None
    name, version = model_id(path)
    return (f"{name}@{version}" if version else name), weights_hash(path)


@generate_app.command("text")
def generate_text(
    model: ModelOpt,
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="Text to continue; empty = unconditional.")
    ] = "",
    stream: Annotated[bool, typer.Option("--stream", help="Print the text as it is generated.")] = False,
    n: Annotated[int, typer.Option("--n", "-n", help="Number of samples (seeds seed, seed+1, ...).")] = 1,
    max_new_tokens: MaxNewOpt = 200,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature", "-t", help="Sampling temperature; 0 = greedy (default 0.8; not with beams)."
        ),
    ] = None,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    typical_p: TypicalOpt = 1.0,
    repetition_penalty: RepOpt = 1.0,
    presence_penalty: PresenceOpt = 0.0,
    frequency_penalty: FreqOpt = 0.0,
    no_repeat_ngram_size: NgramOpt = 0,
    num_beams: Annotated[
        int, typer.Option("--num-beams", help="Beam search width (1 = sampling/greedy).")
    ] = 1,
    num_return_sequences: Annotated[
        int, typer.Option("--num-return-sequences", help="Beams to return (<= --num-beams).")
    ] = 1,
    length_penalty: Annotated[
        float, typer.Option("--length-penalty", help="Beam score / length**this.")
    ] = 1.0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    echo: Annotated[
        bool, typer.Option("--echo/--no-echo", help="Print the prompt before the continuation.")
    ] = True,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON result per line (with provenance).")
    ] = False,
    dtype: DtypeOpt = "float32",
    compile: CompileOpt = False,
    watermark: Annotated[
        bool, typer.Option("--watermark", help="Watermark the text with this deployment's key.")
    ] = False,
    moderation: Annotated[
        str | None, typer.Option("--moderation", help="Moderation rules TOML (default: $AIGC_MODERATION).")
    ] = None,
    record: Annotated[
        bool, typer.Option("--record", help="Record the outputs in the store (see `aigc history`).")
    ] = False,
    db: Annotated[
        str | None, typer.Option("--db", help="Store for --record (default $AIGC_DB or $AIGC_HOME/aigc.db).")
    ] = None,
    best_of: Annotated[
        int, typer.Option("--best-of", help="Draw N candidates per sample, keep the best (seeds seed..).")
    ] = 1,
    scorer: Annotated[
        str | None,
        typer.Option(
            "--scorer", help="Rank --best-of candidates: sentiment, label:NAME@PATH, python:F.py:FN."
        ),
    ] = None,
) -> None:
    """Generate text from a prompt: the text goes to stdout, the seed and timing to stderr."""
    import json
    import time

    from aigc.generation import load_generator, make_params
    from aigc.generation.best_of import MAX_BEST_OF

    if num_beams > 1 and temperature not in (None, 0):  # as top_p / top_k with beams: refused, not ignored
        raise AigcError(
            f"--num-beams {num_beams} cannot be combined with --temperature {temperature}: beam search is "
            "deterministic; drop --temperature (--num-return-sequences for several beams) or use --num-beams 1"
        )
    if not 1 <= best_of <= MAX_BEST_OF:
        raise AigcError(
            f"--best-of {best_of} is out of range; allowed: 1..{MAX_BEST_OF} (1 = no re-ranking; N draws N "
            "candidates per sample)"
        )
    params = make_params(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if num_beams > 1 else (0.8 if temperature is None else temperature),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        length_penalty=length_penalty,
        n=n,
        seed=seed,
        stop=_stops(stop),
        watermark=watermark or None,
    )
    store = None
    if record:  # opened first: a store that cannot be written fails before the model runs
        from aigc.feedback.store import Store

        store = Store.open(db)
        recorded_as, model_hash = _recorded_as(str(model))
    from aigc.safety.moderation import Moderator, StreamGuard

    # moderation, the server's policy: a blocked prompt or output is an error (exit 1; with --record
    # its row is stored with the verdict and no output), a flagged one is printed with a warning
    moderator = Moderator.load(moderation)
    prompt_check = moderator.check(prompt)
    if prompt_check.blocked and store is not None:
        with store:
            store.add_generation(kind="text", model=recorded_as, prompt=prompt, params={"moderated": "prompt"},
                                 model_hash=model_hash, moderation=moderator.verdict(prompt_check))  # fmt: skip
    moderator.enforce([prompt])  # a blocked category stops here with the category named
    if prompt_check.flagged:
        err.print(f"moderation: prompt flagged ({', '.join(prompt_check.matches)})", highlight=False)
    gen = load_generator(model, dtype=_dtype(dtype), compile=compile)
    gen.engine.log_warnings = False  # each result's warnings are printed below, once
    t0 = time.perf_counter()
    if stream and not json_out:
        if n > 1 or num_beams > 1 or best_of > 1:
            raise AigcError("--stream prints one text: use it with --n 1, --num-beams 1 and --best-of 1")
        s = gen.stream(prompt, params)
        guard = StreamGuard(moderator)  # prints all but a held-back tail; stops printing on a block
        _write(prompt if echo else "")
        for delta in s:
            _write(guard.feed(delta))
        _write(guard.finish(s.result.text) + "\n")
        results, checks = [s.result], [guard.result]
        if guard.result.flagged and not guard.blocked:
            err.print(f"moderation: output 1 flagged ({', '.join(guard.result.matches)})", highlight=False)
    else:
        if best_of > 1 or scorer is not None:  # the n best of best_of candidates (one batch)
            from aigc.generation.best_of import generate_best_of

            results = generate_best_of(gen, prompt, best_of=best_of, scorer=scorer, params=params)
            err.print(f"best of {results[0].best_of} by {results[0].scorer}: scores "
                      f"{', '.join(f'{v:.3g}' for v in results[0].scores)}", highlight=False)  # fmt: skip
        else:
            results = gen.generate(prompt, params)
        checks = [moderator.check(r.text) for r in results]
        for i, (r, verdict) in enumerate(zip(results, checks, strict=True)):
            if verdict.blocked:
                continue  # withheld: reported below, after the others are printed and recorded
            if verdict.flagged:
                err.print(f"moderation: output {i + 1} flagged ({', '.join(verdict.matches)})", highlight=False)  # fmt: skip
            if json_out:
                _write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
                continue
            if len(results) > 1:
                _write(("\n" if i else "") + f"----- {i + 1}/{len(results)} (seed {r.seed}) -----\n")
            _write((prompt if echo else "") + r.text + "\n")
    dt = time.perf_counter() - t0
    tokens = sum(r.usage["completion_tokens"] for r in results)
    err.print(
        f"seed {results[0].seed}, {tokens} tokens in {dt:.2f} s ({tokens / max(dt, 1e-9):.0f} tokens/s), "
        f"finish: {', '.join(sorted({r.finish_reason for r in results}))}",
        highlight=False,
    )
    for w in dict.fromkeys(w for r in results for w in r.warnings):
        err.print(f"warning: {w}", highlight=False, markup=False, soft_wrap=True)
    if store is not None:
        with store:
            ids = store.add_generations(
                [
                    dict(
                        kind="text",
                        model=recorded_as,
                        model_hash=model_hash,
                        prompt=prompt,
                        params=r.params,
                        seed=r.seed,
                        output_text=None if c.blocked else r.text,  # a blocked text is not kept
                        duration=dt / len(results),
                        moderation=moderator.verdict(prompt_check, c),
                    )
                    for r, c in zip(results, checks, strict=True)
                ]  # fmt: skip
            )
        err.print(
            f"recorded as generation {', '.join(map(str, ids))} (model {recorded_as}) in {store.where}",
            highlight=False,
        )
    blocked = [i + 1 for i, c in enumerate(checks) if c.blocked]
    if blocked:
        cats = sorted({cat for c in checks if c.blocked for cat in c.blocked_categories(moderator.policies)})
        raise AigcError(
            f"output {', '.join(map(str, blocked))} of {len(results)} blocked by moderation (category: "
            f"{', '.join(cats)}) and withheld; try another --seed or prompt, or change the policy (--moderation FILE)"
        )


@generate_app.command("image")
def generate_image(
    model: ModelOpt,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Directory for the PNGs (+ grid.png / .gif).")],
    n: Annotated[int, typer.Option("--n", "-n", help="Number of images.")] = 16,
    label: Annotated[
        str | None, typer.Option("--label", help="Class (index or name) for a class-conditional model.")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", "-g", help="Classifier-free guidance scale (diffusion).")
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            "--sampler",
            help="Diffusion sampler: ddpm, ddim, dpm (DPM-Solver++ ODE) or dpm-sde (stochastic; "
            "closer to 1000-step ddpm at 20 steps).",
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps (diffusion).")] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Text prompt (hf: text-to-image).")
    ] = None,
    size: Annotated[int | None, typer.Option("--size", help="Output side in pixels (hf: pipelines).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (recorded in every PNG).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="Diffusion sampling precision: auto (bf16 where it is faster), bf16, fp32."
        ),
    ] = "auto",
    scale: Annotated[int, typer.Option("--scale", help="Enlarge outputs N x (nearest) for viewing.")] = 1,
    animate: Annotated[
        bool, typer.Option("--animate", help="Write a latent-interpolation GIF (--n frames) instead.")
    ] = False,
    watermark: Annotated[
        bool, typer.Option("--watermark", help="Invisible mark with this deployment's key id (>= 24 px).")
    ] = False,
    c2pa: Annotated[
        bool, typer.Option("--c2pa", help="Sign every PNG with a C2PA manifest (needs aigc\\[c2pa]).")
    ] = False,
    overwrite: OverwriteOpt = False,
    best_of: Annotated[
        int, typer.Option("--best-of", help="Draw N x --n images, keep the --n best under --scorer.")
    ] = 1,
    scorer: Annotated[
        str | None,
        typer.Option("--scorer", help="Image scorer for --best-of: digit:K@DATA_DIR, python:F.py:FN."),
    ] = None,
) -> None:
    """Generate images (PNGs with their parameters + a grid), or a latent walk as an animated GIF."""
    from pathlib import Path

    from aigc.generation.image import ImageGenerator, check_seed
    from aigc.utils.io import commit_dir, prepare_out_dir, staging_dir

    lab: int | str | None = int(label) if label is not None and label.lstrip("-").isdigit() else label
    if watermark and animate:
        raise AigcError("--watermark marks the PNG images, not the --animate GIF; drop one of the two")
    if c2pa and animate:
        raise AigcError("--c2pa signs the PNG images, not the --animate GIF; drop one of the two")
    if c2pa:  # before the model runs: a missing package or certificate problem fails first
        from aigc.safety.c2pa import init_cert, require

        require()
        init_cert()
    if best_of < 1 or (best_of > 1 and (scorer is None or animate)):
        raise AigcError(
            f"--best-of {best_of}: give an integer >= 1, with --scorer (e.g. digit:7@DATA_DIR), no --animate"
        )
    check_seed(seed, 1 if animate else n * best_of)  # image i uses seed + i: none may pass 2**63-1
    if not 1 <= scale <= MAX_SCALE:
        raise AigcError(f"--scale {scale} is out of range; allowed: 1..{MAX_SCALE} (1 = as generated)")
    rank = None
    if scorer is not None:  # loaded (the digit classifier trained or read from cache) before sampling
        from aigc.evaluation.scorers import load_scorer

        rank = load_scorer(scorer)
    target = prepare_out_dir(out_dir, overwrite=overwrite)
    gen = ImageGenerator.load(model)
    if animate:
        frames, params = gen.animate(
            frames=n, seed=seed, label=lab, guidance=guidance, sampler=sampler, steps=steps, dtype=dtype
        )
    else:
        result = gen.generate(
            n=n * best_of, seed=seed, label=lab, guidance=guidance, sampler=sampler, steps=steps, prompt=prompt,
            batch_size=batch_size, size=size, dtype=dtype,
        )  # fmt: skip
        if rank is not None:  # keep the n best of n * best_of
            from aigc.generation.best_of import best_images

            result, scores = best_images(result, n, rank)
            kept = [p["score"] for p in result.params]
            err.print(f"kept {n} of {len(scores)} by {rank.name}: mean score {sum(kept) / n:.3f} "
                      f"(all: {sum(scores) / len(scores):.3f})", highlight=False)  # fmt: skip
    stage = staging_dir(target)  # the whole directory appears at once, or not at all
    try:
        if animate:
            gen.save_animation(frames, params, stage / "animation.gif", scale=scale)
        else:
            from aigc.safety.provenance import stamp_image_files

            paths = result.save(stage, scale=scale)
            # provenance on every PNG (A1111 line + aigc record), the invisible mark on request
            stamp_image_files(paths, model, watermark=watermark)
            if c2pa:  # last: the manifest binds the final bytes (chunks and mark included)
                from aigc.safety.c2pa import sign_file
                from aigc.safety.provenance import read_png_record

                for path in paths:
                    sign_file(path, read_png_record(path)[0] or {})
        commit_dir(stage, target)
    except BaseException:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        raise
    if animate:
        out.print(
            f"wrote {Path(target) / 'animation.gif'} ({len(frames)} frames, seed {seed})", highlight=False
        )
        return
    p = result.params[0]
    out.print(
        f"wrote {len(paths) - 1} images + grid.png to {target} (seed {seed}, sampler {p.get('sampler')}, "
        f"steps {p.get('steps')}, guidance {p.get('guidance')})",
        highlight=False,
    )


MAX_SCALE = 32  # --scale: a 64 px image at 32x is 2048 px, as large as a viewer needs


def _rehash_sidecar(sidecar) -> None:
    """Refresh a piece sidecar's (a Path) file hashes after its files were rewritten (signed)."""
    import json

    from aigc.safety.provenance import file_hashes
    from aigc.utils.io import atomic_write_json

    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    meta["sha256"] = file_hashes(sidecar.with_name(name) for name in meta.get("files", {}).values())
    atomic_write_json(sidecar, meta)


@generate_app.command("music")
def generate_music(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Run directory of a music model (aigc train music).")
    ],
    out_dir: Annotated[
        str, typer.Option("--out", "-o", help="Directory for .mid/.wav/.png/.json per piece.")
    ],
    key: Annotated[str, typer.Option("--key", help='Key, e.g. "D minor", "Bb major", "f#".')] = "C major",
    meter: Annotated[str, typer.Option("--meter", help="Time signature, e.g. 4/4, 3/4, 6/8.")] = "4/4",
    style: Annotated[
        str | None, typer.Option("--style", help="Style the model was trained with (chorale, folk, ...).")
    ] = None,
    bars: Annotated[int, typer.Option("--bars", help="Bars to generate per piece (after the primer).")] = 8,
    n: Annotated[int, typer.Option("--n", "-n", help="Number of pieces (seeds seed, seed+1, ...).")] = 1,
    primer: Annotated[
        str | None, typer.Option("--primer", help="A MIDI file whose notes open every piece.")
    ] = None,
    instrument: Annotated[
        str, typer.Option("--instrument", help="WAV voice: piano, organ or strings.")
    ] = "piano",
    tempo: Annotated[
        float | None, typer.Option("--tempo", help="Quarter notes per minute (default 100).")
    ] = None,
    temperature: TempOpt = 1.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (recorded in every file).")] = 0,
    c2pa: Annotated[
        bool,
        typer.Option("--c2pa", help="Sign each WAV and piano-roll PNG with a C2PA manifest (aigc\\[c2pa])."),
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Generate music: MIDI, WAV (built-in synth) and a piano-roll PNG per piece, with a JSON sidecar."""
    import shutil

    from aigc.generation.music import MusicGenerator
    from aigc.utils.io import commit_dir, prepare_out_dir, staging_dir

    target = prepare_out_dir(out_dir, overwrite=overwrite)
    if c2pa:  # before the model runs: a missing package or certificate problem fails first
        from aigc.safety.c2pa import init_cert, require

        require()
        init_cert()
    gen = MusicGenerator.from_artifact(model)
    from aigc.generation.music_render import soundfont_warning

    if (sf_warning := soundfont_warning()) is not None:
        err.print(f"warning: {sf_warning}", highlight=False, markup=False, soft_wrap=True)
    results = gen.generate(
        n=n, key=key, meter=meter, style=style, bars=bars, primer=primer, seed=seed, temperature=temperature,
        top_k=top_k, top_p=top_p, instrument=instrument, tempo=tempo,
    )  # fmt: skip
    # an under-trained model may decode no note at all: every piece empty is an error (nothing is
    # written); some empty, or short of the bars asked, is written with a warning (exit 0)
    if all(r.metadata["notes"] == 0 for r in results):
        skipped = sum(r.skipped for r in results)
        which = "the piece" if len(results) == 1 else f"all {len(results)} pieces"
        raise AigcError(
            f"{which} came out empty: 0 notes ({skipped} generated events skipped as ungrammatical), so "
            f"nothing was written; {model} is under-trained: train it longer (more --max-steps), then retry "
            "(another --seed or a lower --temperature may also help)"
        )
    stage = staging_dir(target)  # the whole directory appears at once, or not at all
    try:
        for r in results:
            r.save(stage, f"piece-{r.index}")
            if c2pa:  # the WAV and the piano roll (C2PA has no MIDI binding)
                from aigc.safety.c2pa import sign_file
                from aigc.safety.provenance import make_record

                prompt = " ".join(x for x in (r.metadata.get("key"), r.metadata.get("meter"), style) if x)
                record = make_record("music", str(r.metadata.get("model") or model), r.params, r.seed, prompt)
                for ext in (".wav", ".png"):
                    if (stage / f"piece-{r.index}{ext}").is_file():
                        sign_file(stage / f"piece-{r.index}{ext}", record)
                _rehash_sidecar(stage / f"piece-{r.index}.json")  # the signed files' bytes changed
        commit_dir(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for r in results:
        m = r.metadata
        out.print(
            f"{target}/piece-{r.index}.mid|.wav|.png: seed {r.seed}, {m['key']} {m['meter']}, {m['notes']} notes, "
            f"{m['seconds']:.1f} s ({r.finish_reason})",
            highlight=False,
            soft_wrap=True,
        )
    for r in results:
        short = "no notes (a silent WAV)" if r.metadata["notes"] == 0 else None
        if short is None and r.finish_reason == "length":
            short = f"fewer than the {bars} bars asked (the token budget ran out)"
        if short is not None:
            err.print(
                f"warning: piece-{r.index} has {short}; {r.skipped} generated events were skipped as "
                "ungrammatical: the model needs more training (more --max-steps)",
                highlight=False,
                soft_wrap=True,
            )


@app.command("chat")
def chat_cmd(
    model: ModelOpt,
    system: Annotated[str | None, typer.Option("--system", help="A system message opening the chat.")] = None,
    max_new_tokens: MaxNewOpt = 200,
    temperature: TempOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepOpt = 1.0,
    no_repeat_ngram_size: NgramOpt = 0,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    dtype: DtypeOpt = "float32",
    compile: CompileOpt = False,
) -> None:
    """Chat in the terminal: one message per line on stdin; /reset clears the history, /exit quits."""
    from aigc.generation import load_generator, make_params
    from aigc.generation.text import ChatSession

    params = make_params(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        seed=seed,
        stop=_stops(stop),
    )
    session = ChatSession(
        load_generator(model, dtype=_dtype(dtype), compile=compile), system=system, params=params
    )
    interactive = sys.stdin.isatty()
    if interactive:
        err.print("chat: type a message; /reset clears the history, /exit quits", highlight=False)
    while True:
        if interactive:
            err.print("> ", end="")
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            err.print("(history cleared)")
            continue
        for delta in session.send(text):
            _write(delta)
        _write("\n")


# ============================================================================ export


@app.command("export")
def export_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Run directory of a trained model.")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Output directory (must be new or empty).")],
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="Target format: hf (a transformers LlamaForCausalLM folder)."),
    ] = "hf",
    dtype: Annotated[str, typer.Option("--dtype", help="Weights on disk: float32 or bfloat16.")] = "float32",
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a trained model for other tools: --format hf loads in transformers.AutoModelForCausalLM."""
    from aigc.export import export_artifact

    path = export_artifact(model, out_dir, fmt, dtype=dtype, overwrite=overwrite)
    err.print(f"exported {model} as {fmt} ({dtype}) to {path}", highlight=False)
    out.print(str(path), highlight=False)


# ============================================================================ models


@app.command("models")
def models_cmd(
    directory: Annotated[
        str | None, typer.Argument(help="Directory holding run directories (default: ./runs).")
    ] = None,
) -> None:
    """List trained models (run directories) under a directory: family, parameters, val loss."""
    from pathlib import Path

    from rich.table import Table

    from aigc.training.runs import list_runs

    given = directory is not None
    directory = directory if given else "runs"
    if given and not Path(directory).is_dir():
        what = "is not a directory" if Path(directory).exists() else "not found"
        raise AigcError(
            f"folder {directory} {what}; pass the directory holding your runs (where `aigc train ... "
            "--out DIR` wrote them)"
        )
    runs = list_runs(directory)
    if not runs:
        err.print(f"no trained models under {directory}", highlight=False)
        return
    table = Table("run", "family", "params", "steps", "val loss", title=f"models in {directory}")
    for r in runs:
        val = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        name = str(r.path.relative_to(directory)) if r.path != Path(directory) else "."
        table.add_row(name, r.family, f"{r.params:,}", str(r.steps or "-"), val)
    out.print(table)


# ============================================================================ demo


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[
        str, typer.Option("--out", "-o", help="Where the demo writes its data and runs.")
    ] = "demo-output",
    parts: Annotated[
        list[str] | None,
        typer.Option("--part", help="Which parts to run: text, image, music (repeatable; default all)."),
    ] = None,
    seconds: Annotated[float, typer.Option("--seconds", help="Training budget per part, in seconds.")] = 60.0,
) -> None:
    """The whole loop on built-in data, offline: prepare, train, generate (text, images, music)."""
    from aigc.demo import PARTS, run_demo

    chosen = parts or list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise AigcError(f"unknown --part {unknown[0]!r}; valid parts: {', '.join(PARTS)}")
    if seconds <= 0:
        raise AigcError(f"--seconds must be > 0, got {seconds}")
    results = run_demo(out_dir, chosen, seconds, log=lambda m: err.print(m, highlight=False))
    if "text" in results:
        r = results["text"]
        out.print(
            f"\n[bold]text[/]: GPT trained {r['steps']} steps on {r['corpus']}, val loss {r['val_loss']:.3f}"
        )
        out.print(r["sample"], highlight=False, markup=False)
    if "image" in results:
        r = results["image"]
        out.print(
            f"\n[bold]images[/]: diffusion trained {r['steps']} steps; sample grid (labels 0-9): {r['grid']}"
        )
    if "music" in results:
        r = results["music"]
        f = r["files"]
        out.print(
            f"\n[bold]music[/]: GPT trained {r['steps']} steps on 24 Bach chorales; an 8-bar chorale "
            f"({r['notes']} notes, {r['seconds']:.0f} s): {f['mid']}, {f['wav']}, {f['png']}",
            highlight=False,
            soft_wrap=True,
        )
    out.print(f"\nEverything is in {out_dir}/ (runs load with aigc.load(PATH)).")


# ============================================================================ eval


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Run directory to evaluate.")],
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Prepared data (default: the run's own).")
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="Samples to generate (capped at the real set).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of sample 0 (sample i uses seed+i).")] = 0,
    out_path: Annotated[
        str | None, typer.Option("--out", "-o", help="Report JSON path (default RUN/eval/report.json).")
    ] = None,
    classifier: Annotated[
        str | None, typer.Option("--classifier", help="Sentiment classifier run: share of positive samples.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Tokens per text/music sample.")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", help="Sampling temperature.")
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Top-k sampling.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling.")] = None,
    sampler: Annotated[
        str | None, typer.Option("--sampler", help="Diffusion sampler: ddpm, ddim, dpm, dpm-sde.")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps (diffusion).")] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", "-g", help="Guidance scale (diffusion).")
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="Diffusion sampling precision: auto (bf16 where it is faster), bf16, fp32."
        ),
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
) -> None:
    """Evaluate a run: samples vs held-out data (real-vs-real floor) -> report.json + report.md."""
    import json
    import warnings

    from rich.table import Table

    from aigc.evaluation.run import evaluate

    with warnings.catch_warnings():  # shown below from report["warnings"], without library noise
        warnings.simplefilter("ignore")
        report = evaluate(
            model, data=data, n=n, seed=seed, out=out_path, classifier=classifier,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            sampler=sampler, steps=steps, guidance=guidance, dtype=dtype,
            log=lambda m: err.print(m, highlight=False, markup=False),
        )  # fmt: skip
    for msg in report["warnings"]:
        err.print(f"warning: {msg}", highlight=False, markup=False)
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)

    def scalar(side: dict, k: str) -> object:  # nested results shown by their headline number
        v = side.get(k)
        return v.get("accuracy", v.get("flagged_share")) if isinstance(v, dict) else v

    sides = ["model", "real"] + (["baseline"] if "baseline" in report else [])
    title = f"{report['kind']} eval: {report['protocol']['samples']} samples"
    table = Table("metric", "model", "real vs real", *sides[2:], title=title)
    for k, v in report["model"].items():
        if not isinstance(v, list):
            name = {"copies": "copies_flagged_share", "label_accuracy": "label_accuracy"}.get(k, k)
            table.add_row(name, *(fmt(scalar(report[s], k)) for s in sides))
    out.print(table)


# ============================================================================ sentiment


@app.command("sentiment")
def sentiment_cmd(
    texts: Annotated[list[str] | None, typer.Argument(help="Text(s) to classify.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Classifier run dir (default: the newest one).")
    ] = None,
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="Classify every non-empty line of a UTF-8 file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per text.")] = False,
) -> None:
    """Label + probability for each text with a trained classifier (`aigc train classifier`)."""
    import json
    from pathlib import Path

    from aigc.evaluation.sentiment import sentiment

    items = list(texts or [])
    if file is not None:
        if not Path(file).is_file():
            raise AigcError(f"--file {file} not found; pass a UTF-8 text file, one text per line")
        items += [line.strip() for line in Path(file).read_text(encoding="utf-8").split("\n") if line.strip()]
    if not items:
        raise AigcError('nothing to classify: pass text(s), e.g. aigc sentiment "I love it", or --file FILE')
    for text, (label, prob) in zip(items, sentiment(items, model=model), strict=True):
        # plain lines (label TAB probability TAB text), so scripts can cut/awk them
        if as_json:
            row = {"text": text, "label": label, "probability": round(prob, 4)}
            typer.echo(json.dumps(row, ensure_ascii=False))
        else:
            typer.echo(f"{label}\t{prob:.4f}\t{text}")


# ============================================================================ history/feedback
# `aigc history`, `aigc feedback export|rate`: the content store (aigc.feedback.store)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db", help="Store: SQLAlchemy URL or SQLite file (default $AIGC_DB or $AIGC_HOME/aigc.db)."
    ),
]


@app.command("history")
def history_cmd(
    kind: Annotated[str | None, typer.Option("--kind", "-k", help="text, image, music or audio.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Only this model (name@version).")
    ] = None,
    q: Annotated[str | None, typer.Option("--q", help="Search prompts and text outputs.")] = None,
    min_rating: Annotated[
        float | None,
        typer.Option("--min-rating", help="Mean rating at least this (1-5 stars; thumb up = 5)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many, newest first (1-1000).")] = 20,
    before: Annotated[int | None, typer.Option("--before", help="Page on: only ids below this.")] = None,
    moderation: Annotated[
        str | None,
        typer.Option("--moderation", help="Only flagged, blocked, any (either) or none (no verdict)."),
    ] = None,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per generation.")] = False,
) -> None:
    """List recorded generations, newest first (page on with --before LAST_ID)."""
    import datetime
    import json

    from rich.table import Table

    from aigc.feedback.store import Store

    with Store.open(db, create=False) as store:  # reads only: a missing database is a typo
        page = store.list_generations(
            kind=kind,
            model=model,
            q=q,
            min_rating=min_rating,
            limit=limit,
            before=before,
            moderation=moderation,
        )
    if as_json:
        for row in page["data"]:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    if not page["data"]:
        err.print("no generations recorded (yet) matching that")
        return
    table = Table(
        "id", "time (UTC)", "kind", "model", "prompt", "output", "rating", "moderation",
        title=f"history ({store.where})",
    )  # fmt: skip
    for row in page["data"]:
        when = datetime.datetime.fromtimestamp(row["created"], datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        output = row["output_text"] if row["output_text"] is not None else (row["output_ref"] or "")
        rating = f"{row['rating']:.1f} ({row['rating_count']})" if row["rating"] is not None else "-"
        table.add_row(
            str(row["id"]), when, row["kind"], row["model"], row["prompt"][:40], output[:40], rating,
            row.get("moderation") or "",
        )  # fmt: skip
    out.print(table)
    if page["has_more"]:
        err.print(f"more: aigc history --before {page['last_id']}", highlight=False)


feedback_app = typer.Typer(help="Rate generations and export feedback for tuning.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def feedback_export(
    fmt: Annotated[str, typer.Option("--format", "-f", help="dpo, kto or sft (TRL's JSONL shapes).")],
    out_file: Annotated[str, typer.Option("--out", "-o", help="JSON Lines file to write.")],
    db: DbOpt = None,
) -> None:
    """Export ratings and comparisons as a TRL data set (dpo: prompt/chosen/rejected, kto, sft)."""
    import json

    from aigc.feedback.store import Store
    from aigc.utils.io import atomic_write_text

    with Store.open(db, create=False) as store:
        rows = store.export_feedback(fmt)
    atomic_write_text(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    err.print(f"wrote {len(rows)} {fmt} rows to {out_file}", highlight=False)
    out.print(out_file, highlight=False)


@feedback_app.command("rate", context_settings={"ignore_unknown_options": True})  # so VALUE may be -1
def feedback_rate(
    generation_id: Annotated[int, typer.Argument(help="Generation id (see `aigc history`).")],
    value: Annotated[int, typer.Argument(help="Thumb: -1 or 1; stars: 1-5.")],
    kind: Annotated[str, typer.Option("--kind", help="thumb or stars.")] = "thumb",
    comment: Annotated[str | None, typer.Option("--comment", help="A note on the output.")] = None,
    correction: Annotated[
        str | None, typer.Option("--correction", help="The output as it should have been (for sft).")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Who rates (default: your login name, e.g. $USER).")
    ] = None,
    db: DbOpt = None,
) -> None:
    """Rate a recorded generation; rating it again (same user and kind) replaces your rating."""
    import getpass

    from aigc.feedback.store import Store

    if user is None:
        try:  # $LOGNAME, $USER, ..., else the password database: a rater even where $USER is unset
            user = getpass.getuser()
        except (OSError, KeyError):
            user = None  # no name at all: the rating is one more anonymous vote
    with Store.open(db, create=False) as store:  # the rated generation is in an existing store
        done = store.rate(generation_id, value, kind, comment=comment, correction=correction, user=user)
    again = f" (replaces {user}'s earlier {kind} rating)" if done["replaced"] else ""
    out.print(f"rating {done['id']} on generation {generation_id}{again}", highlight=False, markup=False)


@app.command("simulate-feedback")
def simulate_feedback_cmd(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model id the server serves (name or name@version).")
    ],
    rater: Annotated[
        str,
        typer.Option(
            "--rater",
            help="Scorer spec the simulated person likes: sentiment, label:NAME@PATH, digit:K@DATA_DIR, python:FILE.py:FUNC.",
        ),
    ],
    threshold: Annotated[float, typer.Option("--threshold", help="Thumb up when the score >= this.")] = 0.5,
    n: Annotated[int, typer.Option("--n", "-n", help="Outputs to generate and rate.")] = 200,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="Prompt (repeatable; cycled; default: unconditional)."),
    ] = None,
    prompts_file: Annotated[
        str | None, typer.Option("--prompts-file", help="File of prompts, one per line.")
    ] = None,
    server: Annotated[
        str | None, typer.Option("--server", help="Base URL of a running `aigc serve`.")
    ] = None,
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="In-process server: directory of run dirs (repeatable)."),
    ] = None,
    db: DbOpt = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="text or image (default: the rater's kind).")
    ] = None,
    user: Annotated[
        str, typer.Option("--user", help="Name of the simulated person (in each comment).")
    ] = "sim",
    seed: Annotated[int, typer.Option("--seed", help="Output i uses seed + i.")] = 0,
    noise: Annotated[float, typer.Option("--noise", help="Chance that a thumb is flipped.")] = 0.0,
    label: Annotated[str | None, typer.Option("--label", help="Class to generate (image models).")] = None,
    guidance: Annotated[
        float | None,
        typer.Option("--guidance", help="Image models: guidance scale (0: unconditional samples)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per text output.")] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="Sampling temperature (text).")
    ] = 1.0,
    api_key_env: Annotated[
        str, typer.Option("--api-key-env", help="Environment variable holding the API key for --server.")
    ] = "AIGC_API_KEY",
) -> None:
    """Fill the store with a simulated person's thumbs, through the same HTTP API a person uses."""
    import json
    import os
    from pathlib import Path

    from aigc.feedback.simulate import Rater, read_prompts, simulate_feedback

    if (server is None) == (models is None):
        raise AigcError(
            "pass --server URL (a running aigc serve) or --models DIR (an in-process server), one of the two"
        )
    if kind is not None and kind not in ("text", "image"):
        raise AigcError(f"--kind {kind!r} is not supported; allowed: text, image")
    prompts = read_prompts(prompt, prompts_file)
    the_rater = Rater(rater, threshold=threshold, noise=noise, seed=seed)
    kind = kind or the_rater.kind
    if kind == "text":
        params: dict = {"max_tokens": max_tokens, "temperature": temperature}
    else:
        params = {} if label is None else {"label": int(label) if label.isdigit() else label}
        if guidance is not None:
            params["guidance"] = guidance
    if server is not None:
        counts = simulate_feedback(server, model, the_rater, n, prompts=prompts, user=user, seed=seed,
                                   kind=kind, params=params, api_key=os.environ.get(api_key_env))  # fmt: skip
    else:
        from fastapi.testclient import TestClient

        from aigc.serve.app import create_app
        from aigc.serve.settings import Settings

        dirs = [Path(d) for d in models or []]
        for d in dirs:
            if not d.is_dir():
                raise AigcError(f"--models {d} is not a directory; pass a folder holding run directories")
        with TestClient(create_app(Settings(models_dirs=dirs, db=db))) as client:
            counts = simulate_feedback(client, model, the_rater, n, prompts=prompts, user=user, seed=seed,
                                       kind=kind, params=params)  # fmt: skip
    ids = counts.pop("generation_ids")
    if ids:
        err.print(
            f"generations {ids[0]}..{ids[-1]} rated by {counts['rater']} (threshold {threshold:g})",
            highlight=False,
        )
    out.print(
        f"generated {counts['generated']}, liked {counts['liked']}, disliked {counts['disliked']}",
        highlight=False,
    )
    err.print(json.dumps(counts), highlight=False)


# ============================================================================ tune
# `aigc tune`: the store's feedback -> DPO / KTO / SFT (text) or image tuning -> the next version


@app.command("tune")
def tune_cmd(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Run dir, transformers folder, or name / name@version.")
    ],
    from_feedback: Annotated[
        bool, typer.Option("--from-feedback", help="Tune on the ratings and comparisons in the store.")
    ] = False,
    method: Annotated[
        str | None, typer.Option("--method", help="Text: dpo (default), kto or sft. Images: see docs.")
    ] = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", "-o", help="New run dir (default: the model's next version).")
    ] = None,
    db: DbOpt = None,
    scorer: Annotated[
        str | None,
        typer.Option("--scorer", help="Judge for the report, e.g. sentiment (preferred rate, win rate)."),
    ] = None,
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="Where model names are looked up (default $AIGC_HOME/models)."),
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Tuning preset (name or .toml path).")
    ] = None,
    set_: SetOpt = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N steps.")] = None,
    max_time: Annotated[float | None, typer.Option("--max-time", help="Stop after S seconds.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Tune a model on its feedback and publish the result as its next version (exit 1 if the
    held-out guard trips: nothing is published, the report says why)."""
    from pathlib import Path

    from aigc.feedback.store import Store
    from aigc.tuning import check_tune_args, tune

    if not from_feedback:
        raise AigcError(
            "aigc tune needs a data source: pass --from-feedback (the store's ratings and comparisons)"
        )
    models_dirs = [Path(d) for d in models] if models else None
    check_tune_args(model, method, models_dirs)  # the arguments first, then the store
    say = lambda msg: err.print(msg, highlight=False, markup=False)  # noqa: E731
    with Store.open(db, create=False) as store:  # tunes on the feedback stored there
        report = tune(model, out_dir, store=store, method=method, overrides=set_, preset=preset, scorer=scorer,
                      max_steps=max_steps, max_time=max_time, overwrite=overwrite, progress=True,
                      models_dirs=models_dirs, log=say)  # fmt: skip
    if report.get("kind") == "images":
        ev, lb, la = report.get("eval", {}), report["heldout_loss_before"], report["heldout_loss_after"]
        figures = f"held-out loss {lb:.4f} -> {la:.4f}" if lb is not None and la is not None else ""
        if "share_before" in ev:
            figures = (f"preferred class share {ev['share_before']:.1%} -> {ev['share_after']:.1%}"
                       + (", " + figures if figures else ""))  # fmt: skip
        out.print(
            f"tuned {report['model']} with RWR: {figures} -> {report['run']}", highlight=False, soft_wrap=True
        )
        return
    hl, pr = report["heldout_loss"], report.get("preferred")
    figures = f"held-out loss {hl['before']:.4f} -> {hl['after']:.4f} ({hl['change']:+.1%})"
    if pr:
        figures = (f"{pr['scorer']} preferred {pr['before']:.0%} -> {pr['after']:.0%}, win rate "
                   f"{report['win_rate']:.0%} vs previous, " + figures)  # fmt: skip
    out.print(f"tuned {report['model']['name']} with {report['method'].upper()}: {figures} -> {report['run']}",
              highlight=False, soft_wrap=True)  # fmt: skip


# ============================================================================ serve


def _serve_scorers(specs: list[str] | None) -> list[str]:
    """`--scorer` specs, checked at start (a python: scorer never runs on a request's behalf)."""
    from aigc.evaluation.scorers import parse_spec

    specs = list(specs) if specs else ["sentiment"]
    for spec in specs:
        if parse_spec(spec)[0] == "python":
            raise AigcError(
                f"--scorer {spec}: python: scorers run code; a server offers only sentiment, label:, digit:"
            )
    return specs


@app.command("serve")
def serve_cmd(
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="Directory of model run dirs (repeatable; default $AIGC_HOME/models)."),
    ] = None,
    models_config: Annotated[
        str | None, typer.Option("--models-config", help='JSON {"models": {"name": "hf:<dir>"}}.')
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (non-loopback needs API keys).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key_file: Annotated[
        str | None, typer.Option("--api-key-file", help="File of sha256:<hex> key hashes (one per line).")
    ] = None,
    cors: Annotated[
        list[str] | None,
        typer.Option("--cors", help="Allowed browser origin (repeatable; default: CORS off)."),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Rows decoded together per model.")] = 32,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch intra-op threads (default: torch's choice).")
    ] = None,
    dtype: DtypeOpt = "float32",
    worker_process: Annotated[
        bool,
        typer.Option(
            "--worker-process", help="Decode text models in a child process (off the server's GIL; Unix)."
        ),
    ] = False,
    db: DbOpt = None,
    data_dir: Annotated[
        list[str] | None,
        typer.Option(
            "--data-dir",
            help="Folder of prepared data sets for training jobs (repeatable; "
            "$AIGC_HOME/data is always searched).",
        ),
    ] = None,
    max_train_time: Annotated[
        float, typer.Option("--max-train-time", help="Cap on a training job's max_time, in seconds.")
    ] = 3600.0,
    c2pa: Annotated[
        bool,
        typer.Option("--c2pa", help="Sign image PNGs and music WAVs with C2PA manifests (aigc\\[c2pa])."),
    ] = False,
    scorers: Annotated[
        list[str] | None,
        typer.Option(
            "--scorer", help="Scorer requests may use for best_of (repeatable; default: sentiment)."
        ),
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (FastAPI + uvicorn) and the studio at /."""
    from pathlib import Path

    from aigc.serve.settings import LOOPBACK_HOSTS, Settings, default_models_dir, settle_gc

    if host not in LOOPBACK_HOSTS and not api_key_file:
        raise AigcError(
            f"--host {host} exposes the server beyond this machine: pass --api-key-file too "
            f"(or bind one of {', '.join(LOOPBACK_HOSTS)})"
        )
    if not 1 <= max_batch <= 1024:
        raise AigcError(f"--max-batch {max_batch} is out of range; allowed: 1..1024")
    if worker_process and sys.platform == "win32":
        raise AigcError("--worker-process needs a Unix system (Linux, macOS); drop it on Windows")
    dirs = [Path(d) for d in models] if models else [default_models_dir()]
    for d in dirs:
        if not d.is_dir():
            raise AigcError(f"--models {d} is not a directory; pass a folder holding run directories")
    for d in data_dir or []:
        if not Path(d).is_dir():
            raise AigcError(f"--data-dir {d} is not a directory; pass a folder holding prepared data sets")
    if not max_train_time > 0:
        raise AigcError(f"--max-train-time {max_train_time} is out of range; allowed: seconds > 0")
    settings = Settings(
        models_dirs=dirs,
        data_dirs=[Path(d) for d in data_dir or []],
        max_train_time_s=max_train_time,
        models_config=Path(models_config) if models_config else None,
        api_keys_file=Path(api_key_file) if api_key_file else None,
        cors_origins=list(cors or []),
        host=host,
        port=port,
        max_batch=max_batch,
        dtype=str(_dtype(dtype)).removeprefix("torch."),  # text models' decoding weights
        worker_process=worker_process,
        db=db,
        c2pa=c2pa,
        scorers=_serve_scorers(scorers),
    )
    if threads is not None:
        if threads < 1:
            raise AigcError(f"--threads {threads} is out of range; allowed: an integer >= 1")
        import torch

        # small models decode faster on one thread, and far faster when other processes load the cores
        torch.set_num_threads(threads)
    import contextlib
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from aigc.serve.app import create_app

    socks = _listen(host, port)  # before the app opens its store: a taken port leaves nothing behind
    try:
        application = create_app(settings)
        port = socks[0].getsockname()[1]  # (--port 0: the one the system picked)
        shown = f"[{host}]" if ":" in host else host
        err.print(
            f"serving {', '.join(map(str, dirs))} on http://{shown}:{port} (docs: /docs)", highlight=False
        )
        # the same access lines through a plain formatter: uvicorn's copies every record to colour it
        log_config = copy.deepcopy(LOGGING_CONFIG)
        log_config["formatters"]["access"] = {"format": "%(levelname)s:     %(message)s"}
        settle_gc()
        config = uvicorn.Config(application, host=host, port=port, log_level="info", log_config=log_config)
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):  # (as uvicorn.run: Ctrl+C is a normal stop)
            server.run(sockets=socks)  # bound above: no other process can take the port in between
    finally:
        for sock in socks:
            sock.close()
    if not server.started:
        sys.exit(3)  # uvicorn's code for a failed start; it has logged why


def _listen(host: str, port: int) -> list:
    """TCP sockets bound to host:port, one per address the host names (as asyncio binds them for
    uvicorn), or one line on why they cannot be."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise AigcError(f"--port {port} is out of range; allowed: 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise AigcError(
            f"--host {host} is not an address of this machine ({e.strerror}); check --host"
        ) from None
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, type_, proto)
            except OSError:  # a family this machine lacks (IPv6 off): skipped, as asyncio does
                continue
            socks.append(sock)
            if sys.platform != "win32":  # a restart rebinds at once; on Windows it would share a busy port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as e:
        for sock in socks:
            sock.close()
        if e.errno == errno.EADDRINUSE or getattr(e, "winerror", None) == 10048:
            raise AigcError(f"port {port} on {host} is in use; pick another with --port") from None
        raise AigcError(
            f"cannot listen on {host} port {port} ({e.strerror or e}); check --host and --port"
        ) from None
    if not socks:
        raise AigcError(f"cannot listen on {host}: no address of it can be used here; check --host")
    return socks


# ============================================================================ detect/verify
# `aigc detect text|image FILE` (watermarks) and `aigc verify FILE` (provenance); see aigc.safety.

detect_app = typer.Typer(help="Detect this deployment's invisible watermarks.", no_args_is_help=True)
app.add_typer(detect_app, name="detect")


def _read_text_file(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise AigcError(f"file {path} not found; pass the path of a text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AigcError(f"{path} is not UTF-8 text ({e.reason}); pass a text file") from None


@detect_app.command("text")
def detect_text_cmd(
    file: Annotated[str, typer.Argument(help="Text file to test (the generated part, without the prompt).")],
    model: ModelOpt,
    threshold: Annotated[
        float, typer.Option("--threshold", help="z-score above which text is marked.")
    ] = 4.0,
    ignore_repeated: Annotated[
        bool, typer.Option("--ignore-repeated", help="Count each (context, token) pair once.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Test a text for the green-list watermark of this deployment's key (exit 0 either way)."""
    import json

    from aigc.generation import load_generator
    from aigc.safety.watermark_text import detect_text

    text = _read_text_file(file)
    gen = load_generator(model)
    d = detect_text(text, gen, gen.decoder.vocab_size, threshold=threshold, ignore_repeated=ignore_repeated)
    if json_out:
        _write(json.dumps(d.to_dict()) + "\n")
        return
    _write(
        f"{d.verdict()}\nz-score {d.z_score:.3f}, p-value {d.p_value:.3g}, "
        f"green {d.green}/{d.scored} tokens ({d.green_fraction:.1%}), key id {d.key_id}\n"
    )


@detect_app.command("image")
def detect_image_cmd(
    file: Annotated[str, typer.Argument(help="Image file to test (PNG, JPEG, ...).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Test an image for the invisible mark of this deployment's key (exit 0 either way)."""
    import json

    from aigc.safety.watermark_image import detect_file

    d = detect_file(file)
    if json_out:
        _write(json.dumps(d) + "\n")
        return
    _write(
        f"{d['verdict']}\nbit accuracy {d['bit_accuracy']:.1%}, p-value {d['p_value']:.3g}, key id {d['key_id']}\n"
    )


@app.command("verify")
def verify_cmd(
    file: Annotated[str, typer.Argument(help="A generated output: PNG, WAV, MIDI, text, ...")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="For text files: the model whose tokenizer scores the mark."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
) -> None:
    """Report a file's provenance: metadata (PNG chunks or sidecar), watermark and C2PA status."""
    import json

    from aigc.safety.provenance import verify

    r = verify(file, model=model)
    if json_out:
        _write(json.dumps(r, ensure_ascii=False, indent=2) + "\n")
        return
    m = r.get("metadata")
    lines = [f"file: {r['file']} ({r['type']}, {r['bytes']} bytes)", f"metadata: {r['metadata_source']}"]
    if m:
        for key in ("kind", "model", "model_hash", "seed", "created", "prompt"):
            if m.get(key) is not None:
                lines.append(f"  {key}: {m[key]}")
        if m.get("watermark"):
            lines.append(f"  watermark key id: {m['watermark']['key_id']}")
    if "file_unchanged" in r:
        lines.append(f"file unchanged since generation: {'yes' if r['file_unchanged'] else 'NO (edited)'}")
    w = r.get("watermark") or {}
    lines.append(f"watermark: {w.get('verdict') or w.get('status')}")
    from aigc.safety.c2pa import summary

    lines.append(f"c2pa: {summary(r['c2pa_manifest'])}")
    _write("\n".join(lines) + "\n")


c2pa_app = typer.Typer(
    help="C2PA content credentials (optional: pip install aigc\\[c2pa]).", no_args_is_help=True
)
app.add_typer(c2pa_app, name="c2pa")


@c2pa_app.command("init-cert")
def c2pa_init_cert(
    force: Annotated[bool, typer.Option("--force", help="Replace an existing certificate.")] = False,
) -> None:
    """Create the local test CA + ES256 signing certificate under $AIGC_HOME/c2pa/ (done on first use)."""
    from aigc.safety.c2pa import cert_dir, init_cert

    existed = (cert_dir() / "signer.pem").is_file()
    d = init_cert(force=force)
    what = "kept the existing" if existed and not force else "created a new"
    out.print(f"{what} test certificate in {d} (signer.pem, signer.key, ca.pem)", highlight=False)


# ============================================================================ entry point


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app, turning user errors into one line and exit code 1."""
    try:
        app(args=argv, prog_name="aigc")  # standalone: click prints usage errors itself (exit 2)
    except AigcError as e:
        from rich.markup import escape

        # escaped: a message naming e.g. `aigc[c2pa]` must not be read as rich markup
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
