"""The module map in the README stays true: who may import whom."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIBLINGS = "accounts admin analytics cli discovery errors keys runtime settings store usage validate".split()


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_is_on_the_map():
    on_disk = {p.stem for p in ROOT.glob("*.py")} - {"kleis"}
    assert on_disk == set(SIBLINGS)
    readme = (ROOT / "README.md").read_text()
    for name in [*SIBLINGS, "kleis"]:
        assert f"| `{name}.py` |" in readme, name


def test_nothing_imports_kleis_only_the_store_imports_peewee_only_the_cli_imports_rich():
    for name in SIBLINGS:
        names = imported(ROOT / f"{name}.py")
        assert "kleis" not in names, name
        assert name == "store" or not names & {"peewee", "peewee_async"}, name
        assert name == "cli" or "rich" not in names, name
        assert name in ("admin",) or "sanic" not in names, name  # the app is kleis.py's; admin is a Blueprint
    for path in (ROOT / "providers").glob("*.py"):
        names = imported(path)
        assert not names & {"kleis", "sanic", "peewee", "peewee_async", *SIBLINGS}, path.name
    assert not imported(ROOT / "kleis.py") & {"peewee", "peewee_async", "rich"}
