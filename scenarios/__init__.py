"""Benchmark scenarios: the YAML files here are installed as package data ``cmtl.scenario_files`` (see
``pyproject.toml``), so ``cmtl bench text5`` works from an installed package. The Python files are
runner scripts (``python scenarios/merging.py``), not modules to import."""
