"""The data package's imports point one way: no circle, not even through function-level imports."""

import pathlib
import textwrap

from importgraph import find_cycle, import_graph

JAXLM = pathlib.Path(__file__).resolve().parents[1] / "jaxlm"


def _package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_the_graph_sees_function_level_and_relative_imports_and_skips_type_checking(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "import os\nfrom . import b\ndef f():\n    return b\n",
        "b.py": "def g():\n    from pkg.sub import c\n    return c\n",
        "sub/__init__.py": "",
        "sub/c.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                     "else:\n    import pkg.sub.d as d\n    from pkg.sub import not_a_module\n"),
        "sub/d.py": "from ..a import f\n",
    })
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.sub.d", "pkg.sub"}, "pkg.sub.d": {"pkg.a"}}
    # a -> b -> (inside a function) c -> d -> a
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.sub.d", "pkg.a"]
    assert find_cycle(graph, within="pkg.sub") is None
    (pkg / "sub" / "d.py").write_text("import json\n")
    assert find_cycle(import_graph(pkg)) is None


def test_jaxlm_data_has_no_import_circle():
    graph = import_graph(JAXLM)
    assert "jaxlm.data.sources" in graph and "jaxlm.data.token_shards" in graph["jaxlm.data.sources"]
    assert find_cycle(graph, within="jaxlm.data") is None


def test_jaxlm_data_reaches_only_down_to_config_and_errors():
    """Data sits below the train step and beside the models: it imports neither (docs/DATA.md)."""
    graph = import_graph(JAXLM)
    outside = {target for module, targets in graph.items() if module.startswith("jaxlm.data")
               for target in targets if not target.startswith("jaxlm.data")}
    assert outside <= {"jaxlm.config", "jaxlm.errors"}, outside
