"""`aigc demo`: the whole loop on built-in data, offline, in a few minutes on a laptop CPU.

Each step is a plain call into the library, the same ones the CLI sub-commands make, so the demo
doubles as a worked example of the Python API:

1. text: prepare a corpus (tiny Shakespeare when it is on the data path, else the Python standard
   library's own source), train a small GPT for a time budget, generate a sample;
2. images: prepare scikit-learn's digits, train a small class-conditional diffusion model, sample a
   grid with classifier-free guidance;
3. music: prepare 24 Bach chorales bundled with music21, train a small GPT on their events,
   generate one 8-bar chorale in D minor as MIDI, WAV and a piano roll.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aigc.utils.io import prepare_out_dir

Log = Callable[[str], None]


def _text(out: Path, seconds: float, log: Log) -> dict[str, Any]:
    from aigc.data import prepare_text
    from aigc.data.sources import find_builtin
    from aigc.generation import load_generator
    from aigc.training.text import train_text

    corpus, prompt = ("shakespeare", "ROMEO:") if find_builtin("shakespeare") else ("python-stdlib", "def ")
    log(f"text: preparing the built-in corpus {corpus!r} (char tokenizer)")
    meta = prepare_text(corpus, out / "text-data", overrides={"tokenizer": "char"}, overwrite=True, log=log)
    log(
        f"[text] {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {meta['vocab_size']}"
    )
    log(f"text: training a GPT for {seconds:.0f} s")
    result = train_text("gpt", out / "text-data", out / "text-run", max_time=seconds, overwrite=True, log=log)
    gen = load_generator(out / "text-run")
    [sample] = gen.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=50, seed=0)
    return {
        "corpus": corpus,
        "run": str(out / "text-run"),
        "steps": result.steps,
        "val_loss": result.best_val_loss,
        "sample": prompt + sample.text,
    }


def _image(out: Path, seconds: float, log: Log) -> dict[str, Any]:
    from aigc.data.images import prepare_images
    from aigc.generation.image import ImageGenerator
    from aigc.training.image_tasks import train_image

    log("image: preparing scikit-learn's digits (8x8, padded to 16x16)")
    prepare_images("digits", out / "image-data", overrides=["size=16"], overwrite=True)
    log(f"image: training a class-conditional diffusion model for {seconds:.0f} s")
    result = train_image(
        "diffusion",
        out / "image-data",
        out / "image-run",
        preset="tiny",
        overrides=["conditional=true"],
        max_time=seconds,
        overwrite=True,
        log=log,
    )
    gen = ImageGenerator.load(out / "image-run")
    images = gen.generate(
        n=20, seed=0, label=[i % 10 for i in range(20)], guidance=3.0, sampler="dpm", steps=20
    )
    paths = images.save(out / "image-samples", scale=4)
    grid = next((p for p in paths if Path(p).name.startswith("grid")), paths[-1])
    return {"run": str(out / "image-run"), "steps": result.steps, "grid": str(grid)}


def _music(out: Path, seconds: float, log: Log) -> dict[str, Any]:
    from aigc.data.music import prepare_music
    from aigc.generation.music import MusicGenerator
    from aigc.training.music import train_music

    log("music: preparing 24 Bach chorales bundled with music21 (parsed once, cached)")
    meta = prepare_music("music21:bach", out / "music-data", overrides=["limit=24"], overwrite=True, log=log)
    log(
        f"[music] {meta['documents']} pieces, {meta['train_tokens']:,} train tokens, vocab {meta['vocab_size']}"
    )
    log(f"music: training a GPT on the event tokens for {seconds:.0f} s")
    result = train_music(
        "music", out / "music-data", out / "music-run", max_time=seconds, overwrite=True, log=log
    )
    gen = MusicGenerator.from_artifact(out / "music-run")
    [piece] = gen.generate(key="D minor", meter="4/4", style="chorale", bars=8, seed=0, instrument="organ")
    paths = piece.save(out / "music-samples", "chorale-0")
    return {
        "run": str(out / "music-run"),
        "steps": result.steps,
        "val_loss": result.best_val_loss,
        "notes": piece.metadata["notes"],
        "seconds": piece.metadata["seconds"],
        "files": {k: str(p) for k, p in paths.items()},
    }


PARTS: dict[str, tuple[Callable[[Path, float, Log], dict[str, Any]], str | None]] = {
    "text": (_text, None),
    "image": (_image, "diffusers"),
    "music": (_music, "music21"),
}


def run_demo(out: str | Path, parts: list[str], seconds: float, log: Log) -> dict[str, dict[str, Any]]:
    """Run the chosen demo parts into `out/` (replaced if it holds an earlier demo)."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / ".aigc-demo").is_file():
        prepare_out_dir(out)  # a non-empty folder that is not ours: refuse with the usual message
    out.mkdir(parents=True, exist_ok=True)
    (out / ".aigc-demo").touch()
    results = {}
    for name in parts:
        fn, needs = PARTS[name]
        if needs and importlib.util.find_spec(needs) is None:
            log(f"{name}: skipped: {needs} is not installed (pip install 'aigc[{name}]')")
            continue
        results[name] = fn(out, seconds, log)
    return results
