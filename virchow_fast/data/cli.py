"""``virchow-fast tiles``: index slides (and optionally write shards). Parses, checks and delegates."""
from __future__ import annotations

from pathlib import Path

import click


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.ClickException(f"{option} {text!r}: expected comma-separated numbers") from None
    if not values:
        raise click.ClickException(f"{option} {text!r}: needs at least one number")
    return values


def settings_from_options(mags: str, mag_mpp: str, context: int, min_tissue: float, mpp: float):
    """:class:`.index.IndexSettings` from the options, each impossible value refused with one line."""
    import math

    from .index import IndexSettings

    m = _floats(mags, "--mags")
    if any(not (math.isfinite(x) and x > 0) for x in m) or len(set(m)) != len(m):
        raise click.ClickException(f"--mags {mags!r}: magnifications must be distinct positive numbers")
    mpp_list = _floats(mag_mpp, "--mag-mpp") if mag_mpp else tuple(10.0 / x for x in m)
    if len(mpp_list) != len(m):
        raise click.ClickException(f"--mag-mpp {mag_mpp!r}: needs one value per magnification ({len(m)})")
    if any(not (math.isfinite(x) and x > 0) for x in mpp_list):
        raise click.ClickException(f"--mag-mpp {mag_mpp!r}: microns per pixel must be positive")
    if not 16 <= context <= 16384:
        raise click.ClickException(f"--context {context}: the context side must be 16 to 16384 px")
    if not (math.isfinite(min_tissue) and 0.0 <= min_tissue <= 1.0):
        raise click.ClickException(f"--min-tissue {min_tissue}: a tissue fraction must be in [0, 1]")
    if not (math.isfinite(mpp) and mpp >= 0):
        raise click.ClickException(f"--mpp {mpp}: must be > 0 (or 0: only slides with an mpp in their metadata)")
    return IndexSettings(m, mpp_list, context, min_tissue, mpp or None)


@click.command("tiles")
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--mags", default="40,20,10,5", show_default=True, help="magnifications to index")
@click.option("--mag-mpp", default="", help="um/px per magnification (default 10 / mag)")
@click.option("--context", default=392, show_default=True, help="context tile side in px (ECT)")
@click.option("--min-tissue", default=0.65, show_default=True, help="keep tiles with at least this tissue fraction")
@click.option("--mpp", default=0.0, help="um/px for slides whose metadata has none")
@click.option("--workers", default=2, show_default=True, help="parallel processes")
@click.option("--shards", is_flag=True, help="also write WebDataset shards of JPEG contexts (+ DALI index files)")
@click.option("--samples-per-shard", default=1000, show_default=True)
def tiles(slides, out, mags, mag_mpp, context, min_tissue, mpp, workers, shards, samples_per_shard) -> None:
    """Tile index (npz per slide + thumbnail PNG) of SLIDE_OR_DIR... into --out.

    Exits non-zero when a named path is missing or no slide gave a tile.
    """
    import numpy as np

    from .records import DataError
    from .tiling import index_slides

    settings = settings_from_options(mags, mag_mpp, context, min_tissue, mpp)
    if workers < 1 or samples_per_shard < 1:
        raise click.ClickException("--workers and --samples-per-shard must be >= 1")
    index_dir = Path(out)
    try:
        rep = index_slides(list(slides), index_dir, settings, workers=workers)
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
