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
