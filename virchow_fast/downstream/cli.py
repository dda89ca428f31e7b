"""``virchow-fast export | embed | eval``: using a trained (or published) backbone. Parse and delegate."""
from __future__ import annotations

import click


def _user_errors():
    """The errors that are the user's input, said in one line (no traceback)."""
    from ..config import ConfigError
    from ..model.timm_compat import StateDictMismatch
    from .weights import WeightsError

    errors = [ConfigError, StateDictMismatch, WeightsError, FileNotFoundError]
    try:
        from .datasets import DatasetError

        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="weights file (.safetensors); "
              "config.json is written beside it")
@click.option("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
@click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing weights file / config.json")
def export(run_dir: str, out: str, step: int | None, which: str, overwrite: bool) -> None:
    """A run's backbone as timm-layout safetensors + config.json (loads with timm.create_model)."""
    from .export import export as do_export

    try:
        weights, cfg = do_export(run_dir, out, step, which, overwrite)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {weights} and {cfg}")


@click.command("eval")
@click.option("--model", "model", required=True, type=click.Path(), help="weights file or run directory")
@click.option("--train", "train", required=True, type=click.Path(), help="labelled tiles: ImageFolder tree, "
              "CSV of path,label, or PCam _x.h5")
@click.option("--val", "val", required=True, type=click.Path(), help="labelled tiles for early stopping")
@click.option("--test", "test", type=click.Path(), default=None, help="labelled tiles to report on (default: val)")
@click.option("--out", type=click.Path(dir_okay=False), default="eval.json", show_default=True, help="results JSON")
@click.option("--seeds", type=int, default=5, show_default=True, help="linear-probe runs")
@click.option("--k", type=int, default=20, show_default=True, help="kNN neighbours")
@click.option("--embedding", type=click.Choice(["cls+mean", "cls"]), default="cls+mean", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="tiles per forward")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--max-steps", type=int, default=12500, show_default=True, help="probe steps at most")
@click.option("--patience", type=int, default=0, help="validations without improvement before stopping "
              "(0 = max(7 epochs, 1250 steps))")
@click.option("--val-every", type=int, default=0, help="probe steps between validations (0 = one epoch)")
@click.option("--step", type=int, default=None, help="checkpoint step of a run directory (default: newest)")
def evaluate(model, train, val, test, out, seeds, k, embedding, batch_size, device, max_steps, patience, val_every,
             step) -> None:
    """Frozen embeddings: kNN (cosine) and eva's linear probe; prints a table, writes JSON."""
    from .evaluate import evaluate as run_eval
    from .evaluate import format_table

    try:
        result = run_eval(model, train, val, test, out, seeds, k, embedding, batch_size, device, max_steps, patience,
                          val_every, step)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{result['weights']}: {result['embedding']} embeddings ({result['embedding_dim']}), "
               f"reported on {result['reported_on']} ({result['tiles'][result['reported_on']]} tiles), "
               f"RankMe(train) {result['rankme_train']:.1f}")
    click.echo(format_table(result))
    click.echo(f"wrote {out}")


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model", required=True, type=click.Path(), help="weights file or run directory")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for one <slide>.h5 each")
@click.option("--mag", type=float, default=20.0, show_default=True, help="tile magnification (40x = 0.25 um/px)")
@click.option("--tile", type=int, default=224, show_default=True, help="tile side in px at --mag")
@click.option("--embedding", type=click.Choice(["cls+mean", "cls"]), default="cls+mean", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--min-tissue", type=float, default=0.65, show_default=True, help="tissue fraction to keep a tile")
@click.option("--mpp", type=float, default=None, help="um/px for slides whose metadata has none")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N] (bf16 on CUDA)")
@click.option("--overwrite", is_flag=True, help="redo slides whose .h5 already exists")
@click.option("--step", type=int, default=None, help="checkpoint step of a run directory (default: newest)")
def embed(inputs, model, out, mag, tile, embedding, batch_size, min_tissue, mpp, device, overwrite, step) -> None:
    """Tile embeddings of slides (files or folders) or tile-image folders: one HDF5 per slide."""
    from .embed import embed as run_embed

    if tile <= 0 or mag <= 0 or batch_size <= 0:
        raise click.ClickException("--tile, --mag and --batch-size must be positive")
    try:
        rep = run_embed(list(inputs), model, out, mag, tile, embedding, batch_size, min_tissue, mpp, device,
                        overwrite, step)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    rate = rep.tiles / rep.seconds if rep.seconds > 0 else 0.0
    click.echo(f"embedded {rep.tiles} tiles of {len(rep.done)} slides in {rep.seconds:.1f} s ({rate:.1f} tiles/s); "
               f"{len(rep.skipped)} already done, {len(rep.failed)} failed, {rep.bad_tiles} bad tiles skipped -> {out}")
