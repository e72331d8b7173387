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


class Catalog(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    models: dict[str, CatalogEntry]


def load_catalog(path: str | Path = "") -> Catalog:
    """Read the catalog: an explicit path (settings `models.catalog`), else the checkout's models/catalog.toml."""
    candidate = Path(path) if path else SHIPPED_CATALOG
    if not candidate.is_file():
        raise FileNotFoundError(f"no model catalog at {candidate}; set models.catalog to the catalog's path")
    return msgspec.convert(tomllib.loads(candidate.read_text()), Catalog)
