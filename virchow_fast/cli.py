"""``virchow-fast``: the command line. No logic of its own: each command parses and delegates."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .config import ConfigError, describe, load_config


def _load(config: str | None, overrides: tuple[str, ...]):
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _setup_logging(level: str) -> None:
    """One handler on stderr for the package's loggers (progress, backend choices, the parallel plan, warnings)."""
    from .logs import ensure_logging

    ensure_logging(level)


@click.group()
@click.version_option(package_name="virchow-fast")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="how much the trainer logs to stderr")
def main(log_level: str) -> None:
    """Fast DINOv2 / Virchow 2 pretraining for pathology foundation models."""
    _setup_logging(log_level)


@main.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), required=True, help="YAML config file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key (repeatable)")
@click.option("--resume", is_flag=True, help="continue from the newest intact checkpoint in the run directory")
@click.option("--overwrite", is_flag=True,
              help="start a new run in a run directory that holds one (the earlier run is renamed to <dir>.old-<time>)")
def train(config: str, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Train (single process, or one rank of a torchrun launch)."""
    cfg = _load(config, overrides)
    from .data.records import DataError
    from .train.errors import RunError
    from .train.loop import run

    try:
        run_dir = run(cfg, resume=resume, overwrite=overwrite)
    except (ConfigError, FileNotFoundError, RunError, DataError) as exc:  # the user's input or the run's fate
        raise click.ClickException(f"{config}: {exc}" if isinstance(exc, ConfigError) else str(exc)) from None
    click.echo(f"run directory: {Path(run_dir).resolve()}")


@main.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), required=True, help="YAML config file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key (repeatable)")
def info(config: str, overrides: tuple[str, ...]) -> None:
    """Parameter counts (meta device), tokens per crop and FLOPs per tile per step."""
    cfg = _load(config, overrides)
    from .model.info import format_info, model_info

    click.echo(format_info(model_info(cfg)))


@main.command("config-help")
def config_help() -> None:
    """Every config key with its default and documentation."""
    click.echo("\n".join(describe()))


# commands that live beside their subsystem
from .data.cli import tiles  # noqa: E402
from .downstream.cli import embed, evaluate, export  # noqa: E402

main.add_command(tiles)
main.add_command(export)
main.add_command(evaluate)
main.add_command(embed)

if __name__ == "__main__":
    sys.exit(main())
