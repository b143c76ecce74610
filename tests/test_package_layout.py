"""The shape of the package: imports point one way, and generic code knows no family.

Read from the source with ``ast`` (``tests/importgraph.py``): every import counts, at the top of a
module or inside a function.
"""

import pathlib

from importgraph import find_cycle, import_graph

from jaxlm import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
GRAPH = import_graph(ROOT / "jaxlm")


def family_modules() -> tuple[str, ...]:
    """Each registered family's package and naming module (and what lives inside them)."""
    out = []
    for fam in models.all_families():
        out += [fam.model.__module__.rsplit(".", 1)[0], fam.naming]
    return tuple(out)


def test_the_package_has_no_import_circle():
    assert find_cycle(GRAPH) is None


def test_no_generic_module_imports_a_family():
    owned = family_modules()
    # Modules of a family's own (its package, its naming module and readers only it uses).
    own = lambda m: any(m == f or m.startswith(f + ".") for f in owned) or m == "jaxlm.formats.llama2c_bin"
    offenders = {m: sorted(d for d in deps if own(d)) for m, deps in GRAPH.items() if not own(m)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_family_file_sits_flat_in_models():
    flat = sorted(p.name for p in (ROOT / "jaxlm" / "models").iterdir() if p.is_file())
    assert flat == ["__init__.py", "cuda_build.py", "family.py", "kv_cache.py", "layers.py", "splash.py"]


def test_jaxlm_never_imports_tools():
    assert not [m for m, deps in GRAPH.items() if any(d.startswith("tools") for d in deps)]
    text = "\n".join(p.read_text() for p in (ROOT / "jaxlm").rglob("*.py"))
    assert "import tools" not in text and "from tools" not in text
