"""``marblekeep completion bash|zsh|fish``: print click's shell completion script."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

__all__ = ["completion"]

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_MARBLEKEEP_COMPLETE"


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print a shell completion script (bash, zsh or fish) for marblekeep.

    Commands, options and file arguments complete with Tab once the script is loaded.

    \b
    Example:
      eval "$(marblekeep completion bash)"                   # this shell; add it to ~/.bashrc
      marblekeep completion zsh > "${fpath[1]}/_marblekeep"  # zsh
      marblekeep completion fish > ~/.config/fish/completions/marblekeep.fish
    """
    from marblekeep.cli.main import main  # noqa: PLC0415 (main imports this module lazily)

    cls = get_completion_class(shell)
    assert cls is not None  # click ships all three
    click.echo(cls(main, {}, "marblekeep", COMPLETE_VAR).source())
