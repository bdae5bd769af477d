"""``python -m swarmnet.ui``: the status, plot and init commands on their own typer app."""

from __future__ import annotations

import typer

from swarmnet.ui.commands import init_command, plot_command, status_command


def build_app() -> typer.Typer:
    app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    app.command("status")(status_command)
    app.command("plot")(plot_command)
    app.command("init")(init_command)
    return app


if __name__ == "__main__":
    build_app()()
