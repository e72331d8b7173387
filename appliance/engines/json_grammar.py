"""JSON schemas to GBNF grammars for constrained generation (response_format and tool arguments).

Built on llama-cpp-python's `SchemaConverter` (a port of llama.cpp's converter), with what tool arguments need
and it lacks: numeric bounds (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`) become digit-range
rules, so a bounded number is always in range, and strings never hold raw control characters (JSON forbids them,
so a parser would refuse the arguments). A bounded `number` is generated as an integer or a non-negative decimal
whose integer part leaves room for any fraction: a subset of the range, never a value outside it."""

from __future__ import annotations

import json
import math
from typing import Any

from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

CHAR = BuiltinRule(r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', [])
MAX_DIGITS = 15  # the longest unbounded integer part, as llama.cpp's own rules


class SchemaNotSupported(ValueError):
    """The schema uses something a grammar cannot express here; the message says what."""


def _same_length(lo: str, hi: str) -> str:
    """Alternatives matching the decimal strings from `lo` to `hi` (same length, lo <= hi)."""
    if lo == hi:
        return f'"{lo}"'
    if len(lo) == 1:
        return f"[{lo}-{hi}]"
    a, b = lo[0], hi[0]
    rest = len(lo) - 1
    if a == b:
        return f'"{a}" ({_same_length(lo[1:], hi[1:])})'
    parts = [f'"{a}" ({_same_length(lo[1:], "9" * rest)})']
    if int(b) - int(a) > 1:
        parts.append(f"[{int(a) + 1}-{int(b) - 1}]" + " [0-9]" * rest)
    parts.append(f'"{b}" ({_same_length("0" * rest, hi[1:])})')
    return " | ".join(parts)


def natural_range(lo: int, hi: int | None) -> str:
    """A GBNF expression for the integers lo..hi (hi None: unbounded) with 0 <= lo, written without leading zeros."""
    parts = []
    width = len(str(lo))
    top = hi if hi is not None else 10 ** MAX_DIGITS - 1
    while width <= len(str(top)):
        first = max(lo, 10 ** (width - 1) if width > 1 else 0)
        last = min(top, 10**width - 1)
        if first <= last:
            if hi is None and first == 10 ** (width - 1) and width > len(str(lo)):  # every longer number
                parts.append(f"[1-9] [0-9]{{{width - 1},{MAX_DIGITS - 1}}}")
                break
            parts.append(_same_length(str(first), str(last)))
        width += 1
    return "(" + " | ".join(parts) + ")"


def integer_range(lo: int | None, hi: int | None) -> str:
    """A GBNF expression for the integers lo..hi, either side open when None."""
    if lo is not None and hi is not None and lo > hi:
        raise SchemaNotSupported(f"no integer lies between {lo} and {hi}")
    parts = []
    if hi is None or hi >= 0:  # the non-negative side
        parts.append(natural_range(max(lo or 0, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:  # the negative side: "-" then |n| from max(1, -hi) to -lo
        low = max(1, -hi) if hi is not None else 1
        parts.append('"-" ' + natural_range(low, -lo if lo is not None else None))
    return "(" + " | ".join(parts) + ")"


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """(lower, lower exclusive, upper, upper exclusive); draft-4 booleans and later numbers both understood."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo_ex = hi_ex = False
    ex_min, ex_max = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(ex_min, bool):
        lo_ex = ex_min
    elif isinstance(ex_min, int | float) and (lo is None or ex_min >= lo):
        lo, lo_ex = ex_min, True
    if isinstance(ex_max, bool):
        hi_ex = ex_max
    elif isinstance(ex_max, int | float) and (hi is None or ex_max <= hi):
        hi, hi_ex = ex_max, True
    return lo, lo_ex, hi, hi_ex


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    lo, lo_ex, hi, hi_ex = _bounds(schema)
    low = None if lo is None else (math.floor(lo) + 1 if lo_ex else math.ceil(lo))
    high = None if hi is None else (math.ceil(hi) - 1 if hi_ex else math.floor(hi))
    return low, high


class BoundedSchemaConverter(SchemaConverter):
    """llama-cpp-python's converter with bounded numbers and JSON-valid string characters."""

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return str(super()._add_primitive(name, CHAR if name == "char" else rule))

    def visit(self, schema: dict[str, Any], name: str) -> str:
        kind = schema.get("type")
        bounded = any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
        if kind in ("integer", "number") and bounded:
            return str(self._add_rule(name or "root", self._bounded(schema, kind) + " space"))  # type: ignore[no-untyped-call]
        return str(super().visit(schema, name))  # type: ignore[no-untyped-call]

    def _bounded(self, schema: dict[str, Any], kind: str) -> str:
        low, high = _integer_bounds(schema)
        if kind == "integer":
            return integer_range(low, high)
        lo, lo_ex, hi, hi_ex = _bounds(schema)
        if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_ex or hi_ex))):
            raise SchemaNotSupported(f"no number lies between {lo} and {hi}"
                                     f"{' (bounds exclusive)' if lo == hi else ''}")
        if low is not None and high is not None and low > high:  # a range without an integer: its midpoint
            assert lo is not None and hi is not None
            return f'"{(lo + hi) / 2!r}"'
        whole = integer_range(low, high)
        # a fraction after integer part i gives a value in [i, i + 1): allowed for i >= 0 when i + 1 <= high
        frac_low = max(low if low is not None else 0, 0)
        frac_high = None if high is None else high - 1
        if frac_high is not None and frac_high < frac_low:
            return whole
        return f'({whole} | {natural_range(frac_low, frac_high)} "." [0-9]{{1,{MAX_DIGITS}}})'


def schema_to_gbnf(schema: dict[str, Any], prop_order: list[str] | None = None) -> str:
    """The grammar (rule `root`) of the JSON documents that `schema` accepts; raises SchemaNotSupported."""
    return grammar_with_root("document", {"document": schema}, prop_order)


def grammar_with_root(root: str, schemas: dict[str, dict[str, Any]], prop_order: list[str] | None = None) -> str:
    """A grammar whose `root` rule is `root`, a GBNF expression that may name each of `schemas` by its key (the rule
    of the JSON documents that schema accepts); raises SchemaNotSupported."""
    converter = BoundedSchemaConverter(prop_order={n: i for i, n in enumerate(prop_order or [])},  # type: ignore[no-untyped-call]
                                       allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        for name, schema in schemas.items():
            resolved = converter.resolve_refs(json.loads(json.dumps(schema)), name)
            if converter.visit(resolved, name) != name:
                raise SchemaNotSupported(f"the rule name {name!r} is taken")
    except SchemaNotSupported:
        raise
    except Exception as exc:  # the converter raises bare assertions and ValueErrors for what it cannot express
        raise SchemaNotSupported(f"the JSON schema cannot be turned into a grammar: {exc or type(exc).__name__}; "
                                 "simplify the schema") from exc
    converter._rules["root"] = root
    return str(converter.format_grammar())  # type: ignore[no-untyped-call]
