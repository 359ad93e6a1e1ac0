"""The `cmtl` command line."""

from cmtl.cli.commands import app

__all__ = ["app"]
