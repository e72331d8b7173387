"""The model catalog (models/catalog.toml): names the appliance knows how to fetch."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from appliance.resources import shipped

SHIPPED_CATALOG = shipped("models/catalog.toml")


class CatalogEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    source: str
    sha256: str
    format: Literal["gguf", "hf"]
    licence: str
    description: str = ""
    size_bytes: int | None = None  # the model file's size, when the catalog says it (shown before a pull)
    # vLLM's `--tool-call-parser` for this model's call format (hermes, llama3_json, mistral, ...): served by vLLM,
    # the model then takes `tools`; empty: vLLM serves it without tool calling
    tool_call_parser: str = ""


class Catalog(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    models: dict[str, CatalogEntry]


def tool_call_parser(catalog: Catalog, name: str, source: str) -> str:
    """The vLLM tool-call parser the catalog names for a model (by name, else by the source it was pulled from)."""
    entry = catalog.models.get(name) or next((e for e in catalog.models.values() if e.source == source), None)
    return entry.tool_call_parser if entry is not None else ""


def load_catalog(path: str | Path = "") -> Catalog:
    """Read the catalog: an explicit path (settings `models.catalog`), else the checkout's models/catalog.toml."""
    candidate = Path(path) if path else SHIPPED_CATALOG
    if not candidate.is_file():
        raise FileNotFoundError(f"no model catalog at {candidate}; set models.catalog to the catalog's path")
    return msgspec.convert(tomllib.loads(candidate.read_text()), Catalog)
