"""``virchow-fast tiles``: index slides (and optionally write shards) with the settings of a config.

The index settings are the config's ``data`` section (``--config``, ``--set data.*=...``): the same
magnifications, context size, tissue threshold and mpp that ``train`` reads, so an index built here
is current for a run of that config. The short options are ``--set`` spelled for the command line;
they have no defaults of their own. Impossible values fail in the config's validation, in one line.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import click

# short option -> the config key it sets
SHORTHANDS = {
    "--mags": "data.mags",
    "--mag-mpp": "data.mag_mpp",
    "--context": "data.crops.context_size",
    "--min-tissue": "data.min_tissue",
    "--mpp": "data.mpp",
    "--workers": "data.num_workers",
}


def _value(text: str, is_list: bool):
    """The option's text as the value for its key: numbers where it reads as numbers, else the text
    itself (the config then refuses it, naming the key)."""
    if is_list:
        try:
            return [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def shorthand_overrides(given: dict[str, str]) -> list[str]:
    """``--set`` items for the short options the user gave (``given``: option -> its text).

    ``--mags`` also sets one sampling weight per magnification (the index does not use them, the
    config's check wants one each) and, without ``--mag-mpp``, ``data.mag_mpp`` = 10 / mag.
    """
    values = {SHORTHANDS[opt]: _value(text, opt in ("--mags", "--mag-mpp")) for opt, text in given.items()}
    mags = values.get("data.mags")
    if isinstance(mags, list) and mags:
        values["data.mag_weights"] = [1.0] * len(mags)
        if "data.mag_mpp" not in values and all(m != 0 for m in mags):
            values["data.mag_mpp"] = [10.0 / m for m in mags]
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]  # JSON is YAML


def load_tiles_config(config: str | None, overrides: tuple[str, ...], given: dict[str, str], slides: tuple[str, ...]):
    """The config ``tiles`` works with; a :class:`click.ClickException` (one line) when it is impossible.

    The line names the short option when the failing key is one the user set with it.
    """
    from ..config import ConfigError, load_config

    items = list(overrides) + shorthand_overrides(given)
    if slides:
        items += ["data.source=slides", f"data.paths={json.dumps(list(slides))}"]
    quiet = logging.getLogger("virchow_fast.config")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warnings are about training (warmups vs epochs), not about an index
    try:
        cfg = load_config(config, items)
    except ConfigError as exc:
        said = [f"{opt} {given[opt]}" for opt in given if re.search(re.escape(SHORTHANDS[opt]) + r"\b", str(exc))]
        raise click.ClickException(": ".join([", ".join(said)] * bool(said) + [str(exc)])) from None
    finally:
        quiet.setLevel(level)
    if not slides and cfg.data.source != "slides":
        raise click.ClickException("tiles: name SLIDE_OR_DIR... (or use a config with data.source: slides and "
                                   "its data.paths)")
    return cfg


@click.command("tiles")
@click.argument("slides", nargs=-1)
@click.option("--config", "config", help="YAML config file or a shipped config's name (default: the defaults)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key (repeatable)")
@click.option("--out", "out", type=click.Path(file_okay=False), help="output folder (default: data.index_dir)")
@click.option("--mags", metavar="MAG,...", help="magnifications, e.g. 40,20 (data.mags; data.mag_mpp = 10 / mag)")
@click.option("--mag-mpp", metavar="MPP,...", help="um/px per magnification (data.mag_mpp)")
@click.option("--context", metavar="PX", help="context tile side in px (data.crops.context_size)")
@click.option("--min-tissue", metavar="FRACTION", help="least tissue fraction of a tile (data.min_tissue)")
@click.option("--mpp", metavar="MPP", help="um/px of slides without one (data.mpp; 0 = refuse them)")
@click.option("--workers", metavar="N", help="parallel processes (data.num_workers; at least 1)")
@click.option("--shards", is_flag=True, help="also write WebDataset shards of JPEG contexts (+ DALI index files)")
@click.option("--samples-per-shard", default=1000, show_default=True, help="samples per shard (no config key)")
def tiles(slides, config, overrides, out, mags, mag_mpp, context, min_tissue, mpp, workers, shards,
          samples_per_shard) -> None:
    """Tile index (npz per slide + thumbnail PNG) of SLIDE_OR_DIR... (default: data.paths) into --out.

    Exits non-zero when a named path is missing or no slide gave a tile.
    """
    import numpy as np

    from ..logs import ensure_logging
    from .factory import index_settings
    from .records import DataError
    from .tiling import index_slides

    ensure_logging()
    if samples_per_shard < 1:
        raise click.ClickException(f"--samples-per-shard {samples_per_shard}: must be >= 1")
    values = {"--mags": mags, "--mag-mpp": mag_mpp, "--context": context, "--min-tissue": min_tissue,
              "--mpp": mpp, "--workers": workers}
    given = {opt: text for opt, text in values.items() if text is not None}
    data = load_tiles_config(config, overrides, given, slides).data
    slides = tuple(slides) or tuple(data.paths)
    if not (out or data.index_dir):
        raise click.ClickException("tiles: --out (or data.index_dir in the config) names the output folder")
    index_dir = Path(out or data.index_dir)
    workers = max(1, data.num_workers)
    try:
        rep = index_slides(list(slides), index_dir, index_settings(data), workers=workers)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    for _, line in rep.missing:
        click.echo(f"tiles: skipped {line}", err=True)
    for path, why in rep.rebuilt:  # the index is derived data: rebuilt in place, the slide untouched
        click.echo(f"tiles: rebuilt the index of {path} ({why})", err=True)
    rebuilt = f", {len(rep.rebuilt)} rebuilt (settings or file changed)" if rep.rebuilt else ""
    click.echo(f"tiles: {len(rep.done)} indexed, {len(rep.skipped)} already done{rebuilt}, {len(rep.empty)} without "
               f"tiles, {len(rep.failed)} unreadable, {len(rep.missing)} paths without slides -> {index_dir}")
    files = rep.index_files(index_dir)
    n_tiles = 0
    for f in files:
        with np.load(f) as z:
            n_tiles += len(z["x"])
    if shards and n_tiles:
        from .shards import write_shards

        written, skipped = write_shards(index_dir, index_dir / "shards", workers, samples_per_shard, files=files)
        click.echo(f"shards: {written} samples written, {skipped} skipped -> {index_dir / 'shards'}")
    missing = [p for p, _ in rep.missing if not Path(p).exists()]
    if missing:
        raise click.ClickException(f"{len(missing)} named paths do not exist: {', '.join(missing)}")
    if n_tiles == 0:
        raise click.ClickException(f"no tile indexed from {len(slides)} paths (see the lines above)")
