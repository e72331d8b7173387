"""The composition root (appliance/app.py) wires services through their public interfaces: no reach into another
object's private members (`self.store._plaintext` was one; the store now offers `gguf_header`)."""

from __future__ import annotations

import ast
from pathlib import Path

import appliance.app


def test_the_composition_root_uses_no_private_member_of_the_services() -> None:
    tree = ast.parse(Path(appliance.app.__file__).read_text())
    reached = [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert reached == []
