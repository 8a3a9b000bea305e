"""`peft methods` answers from the catalogue file written from the registry: the two must be equal."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.methods.catalog import CATALOG, catalog_text, methods_table


def test_catalog_file_matches_the_registry():
    assert CATALOG.read_text(encoding="utf-8") == catalog_text(), \
        "peftcli/methods/catalog.json is stale: run `python -m peftcli.methods.catalog`"


def test_methods_command_lists_every_registered_method():
    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(methods_table()))
