"""`aigc train music`: the text trainer's GPT on prepared music event data.

Music events train exactly like text (docs/internals.md "Music"), so this is only an adapter: it
checks the data is music (a text directory here is a mistake worth naming) and gives the auto
preset a longer context, since one chorale bar is ~30-50 event tokens and 64 would hold one bar.
The run directory is an ordinary gpt run whose tokenizer.json has "kind": "music"; `aigc.load`
turns it into a `MusicGenerator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aigc import config as C
from aigc.errors import AigcError
from aigc.utils.io import read_json

MUSIC_BLOCK_SIZE = 256  # auto preset context: ~6 bars of four-voice chorale


def train_music(
    family: str,
    data: str | Path,
    out: str | Path,
    preset: str = "auto",
    overrides: list[str] | dict[str, Any] | None = None,
    **kwargs: Any,
):
    """Train a GPT on `aigc data prepare ... --kind music` output; arguments as `train_text`."""
    from aigc.training.text import train_text

    meta_path = Path(data) / "meta.json"
    if meta_path.is_file() and read_json(meta_path).get("kind") != "music":
        raise AigcError(
            f"{data} holds {read_json(meta_path).get('kind')!r} data; `aigc train music` needs music "
            f"events: prepare them with `aigc data prepare SOURCE --kind music --out DIR`, "
            f"or train text with `aigc train gpt`"
        )
    over = overrides if isinstance(overrides, dict) else C.parse_overrides(overrides)
    if preset == "auto" and "block_size" not in over.get("model", {}):
        over = C.merge(over, {"model": {"block_size": MUSIC_BLOCK_SIZE}})
    return train_text("gpt", data, out, preset=preset, overrides=over, **kwargs)
