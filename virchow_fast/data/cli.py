"""``virchow-fast tiles``: index slides (and optionally write shards). Parses and delegates."""
from __future__ import annotations

from pathlib import Path

import click


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers") from None


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
    """Tile index (npz per slide + thumbnail PNG) of SLIDE_OR_DIR... into --out."""
    from .index import IndexSettings
    from .tiling import index_slides

    m = _floats(mags)
    mpp_list = _floats(mag_mpp) if mag_mpp else tuple(10.0 / x for x in m)
    if len(mpp_list) != len(m):
        raise click.BadParameter("--mag-mpp needs one value per magnification")
    settings = IndexSettings(m, mpp_list, context, min_tissue, mpp or None)
    index_dir = Path(out)
    rep = index_slides(list(slides), index_dir, settings, workers=workers)
    click.echo(f"tiles: {len(rep.done)} indexed, {len(rep.skipped)} already done, {len(rep.empty)} without tiles, "
               f"{len(rep.failed)} unreadable -> {index_dir}")
    if shards:
        from .shards import write_shards

        written, skipped = write_shards(index_dir, Path(out) / "shards", workers, samples_per_shard)
        click.echo(f"shards: {written} samples written, {skipped} skipped -> {Path(out) / 'shards'}")
