"""The ``ft`` command line: run, preprocess, validate, plugins, schema; plugins add more (infer, merge ...).

Heavy libraries are imported inside commands, so ``ft --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ft import __version__
from ft.errors import FtError

plugin_option = click.option(
    "-p", "plugin_args", multiple=True, metavar="NAME",
    help="Select a feature plugin (repeatable); -p no:NAME blocks a plugin.",
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a config value (YAML scalar)."
)
trace_option = click.option("--trace", is_flag=True, help="Print every hook call and the plugins it reaches.")


def _fail(exc: FtError) -> None:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(exc.exit_code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FtError as exc:
            _fail(exc)

    return wrapper


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if not verbose and not _is_main_process():
        level = logging.WARNING  # in a multi-process run only rank 0 reports progress
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _context(config: str, plugin_args, overrides, trace: bool = False):
    from ft.context import load_context

    ctx = load_context(config, plugin_args, overrides)
    if trace:
        ctx.pm.enable_tracing()
    return ctx


class FtGroup(click.Group):
    """Adds plugin commands lazily, and survives broken plugins."""

    _plugins_added = False

    def _add_plugin_commands(self) -> None:
        if self._plugins_added:
            return
        self._plugins_added = True
        try:
            from ft.context import make_plugin_manager

            pm = make_plugin_manager()
            pm.all_hooks.ft_add_commands(cli=self)
        except FtError as exc:  # never let a plugin break `ft --help`
            click.secho(f"warning: plugin commands unavailable: {exc}", fg="yellow", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None:
            self._add_plugin_commands()
            cmd = super().get_command(ctx, name)
        return cmd


@click.group(cls=FtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ft")
def cli() -> None:
    """ft: fine-tune language models from a YAML config, with plugins for every feature."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@plugin_option
@set_option
@trace_option
@click.option("--nproc", type=int, default=None, help="Launch N processes (torch.distributed) on this node.")
@click.option("--nnodes", type=str, default=None, help="Nodes for a multi-node run (torchrun --nnodes).")
@click.option("--node-rank", type=int, default=None, help="This node's rank (torchrun --node-rank).")
@click.option("--rdzv-endpoint", type=str, default=None, help="Rendezvous HOST:PORT (torchrun --rdzv-endpoint).")
@click.option("--rdzv-id", type=str, default=None, help="Rendezvous job id (torchrun --rdzv-id).")
@click.option("--fresh", is_flag=True, help="Start over from step 0, deleting the checkpoints the output dir holds.")
@click.option("--overwrite", is_flag=True,
              help="Train a finished run again from step 0: deletes its checkpoints, replaces its weights.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@handle_errors
def run(config, plugin_args, overrides, trace, nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id, fresh, overwrite, verbose):
    """Train with CONFIG: load, prepare data, fine-tune, save."""
    setup_logging(verbose)
    if nproc or nnodes:
        from ft.launch import launch

        code = launch(sys.argv[1:], nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                      rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
        if code is not None:  # None: already under a launcher, so this process trains
            sys.exit(code)
    from ft.run import train

    ctx = _context(config, plugin_args, overrides, trace)
    result = train(ctx, fresh=fresh, overwrite=overwrite)
    if _is_main_process():
        click.echo(f"done: {result.output_dir}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@plugin_option
@set_option
@trace_option
@click.option("--debug", "debug_n", type=int, default=0, metavar="N",
              help="Print N prepared samples with trained tokens highlighted.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@handle_errors
def preprocess(config, plugin_args, overrides, trace, debug_n, verbose):
    """Tokenize (and pack) the datasets of CONFIG into the cache."""
    setup_logging(verbose)
    from ft.run import preprocess as do_preprocess

    ctx = _context(config, plugin_args, overrides, trace)
    data, tokenizer = do_preprocess(ctx)
    if debug_n:
        from ft.debug import show_samples

        show_samples(data.train, tokenizer, debug_n, where=data.where)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@plugin_option
@set_option
@click.option("--nproc", type=int, default=None, help="Processes the run will use (for the effective batch).")
@handle_errors
def validate(config, plugin_args, overrides, nproc):
    """Check CONFIG and show the plugins it selects; loads no model."""
    from ft.config import config_warnings

    ctx = _context(config, plugin_args, overrides)
    cfg = ctx.cfg
    world = nproc or int(os.environ.get("WORLD_SIZE", "1"))
    click.echo(f"{cfg.source}: valid")
    for warning in config_warnings(cfg):
        click.secho(f"  warning: {warning}", fg="yellow")
    click.echo(f"  base_model: {cfg.base_model}")
    click.echo(f"  datasets: {', '.join(f'{d.path} ({d.type})' for d in cfg.datasets)}")
    click.echo(f"  selected features: {', '.join(cfg.plugins) or 'none'}")
    click.echo(f"  active plugins: {', '.join(ctx.pm.active_names())}")
    click.echo(
        f"  effective batch size: {cfg.effective_batch_size(world)} "
        f"(micro_batch_size {cfg.micro_batch_size} x gradient_accumulation_steps "
        f"{cfg.gradient_accumulation_steps} x {world} process(es))"
    )


@cli.command()
@plugin_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--hook", "hook_name", default=None, help="Show the call order of one hook.")
@handle_errors
def plugins(plugin_args, as_json, hook_name):
    """List installed plugins: name, distribution, version, status, hooks."""
    from ft.context import make_plugin_manager

    pm = make_plugin_manager(plugin_args)
    if hook_name:
        order = pm.call_order(hook_name)
        if as_json:
            click.echo(json.dumps({"hook": hook_name, "order": order}))
        else:
            click.echo(f"{hook_name} calls, in order:")
            for i, name in enumerate(order, 1):
                info = pm.infos[name]
                click.echo(f"  {i}. {name} ({info.status})")
        return
    infos = list(pm.infos.values())
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    width = max([len(i.name) for i in infos] + [4])
    dists = {i.name: f"{i.distribution} {i.version}".strip() for i in infos}
    dwidth = max([len(d) for d in dists.values()] + [12])
    click.echo(f"{'name':<{width}}  {'status':<9}  {'distribution':<{dwidth}}  hooks")
    for i in sorted(infos, key=lambda i: i.name):
        kind = " (feature)" if i.feature else ""
        click.echo(f"{i.name:<{width}}  {i.status:<9}  {dists[i.name]:<{dwidth}}  {', '.join(i.hooks)}{kind}")
        if i.error:
            click.echo(f"{'':<{width}}  -> {i.error}")


@cli.command()
@plugin_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@handle_errors
def schema(plugin_args, output):
    """Print the JSON Schema of the config (core keys and every plugin's section)."""
    from ft.schema import generate_schema

    text = generate_schema(plugin_args)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        click.echo(text, nl=False)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
