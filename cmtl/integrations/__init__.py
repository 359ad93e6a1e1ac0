"""Bridges to other continual-learning libraries.

Each submodule imports its library only inside its functions, so ``import cmtl``
(and ``import cmtl.integrations``) never imports them. Import the submodule you
need, e.g. ``from cmtl.integrations import avalanche``.
"""
