"""``python -m cmtl.cli``: the same as the ``cmtl`` command."""

from cmtl.cli.commands import app

app()
