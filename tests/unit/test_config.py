"""Settings: every field documented, defaults < file < environment, and one clear line for a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import (
    ConfigError,
    LoadedSettings,
    Settings,
    is_secret_name,
    iter_documented_fields,
    load_settings,
    public_value,
    source_kind,
)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sources(loaded: LoadedSettings) -> dict[str, str]:
    return {info.key: info.source for info in loaded.describe()}


def test_settings_are_documented() -> None:
    fields = list(iter_documented_fields(Settings))
    assert len(fields) > 20  # sections recurse to their leaves, not stop at the section itself
    undocumented = [key for key, help_text in fields if not help_text.strip()]
    assert undocumented == []
    keys = [key for key, _ in fields]
    assert len(keys) == len(set(keys))
    assert {"server.port", "models.keep_alive", "llamacpp.flash_attn", "supervisor.restart_backoff"} <= set(keys)


def test_describe_lists_every_setting_with_its_help(tmp_path: Path) -> None:
    loaded = load_settings(env={}, data_dir=tmp_path)
    described = {info.key: info for info in loaded.describe()}
    assert set(described) == {key for key, _ in iter_documented_fields(Settings)}
    assert described["server.port"].value == 8080
    assert described["server.port"].help == "TCP port of the HTTP server."


def test_defaults_without_file_or_environment(tmp_path: Path) -> None:
    loaded = load_settings(env={}, data_dir=tmp_path)
    assert loaded.config_file is None
    assert loaded.settings.server.port == 8080
    assert loaded.settings.server.host == "127.0.0.1"
    assert loaded.settings.data_dir == str(tmp_path)
    described = sources(loaded)
    assert described["data_dir"] == "command line"
    assert {source for key, source in described.items() if key != "data_dir"} == {"default"}


def test_file_overrides_defaults_and_environment_overrides_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "appliance.toml",
                          '[server]\nport = 9000\nhost = "0.0.0.0"\n[models]\nkeep_alive = 10\n')
    env = {"APPLIANCE_SERVER__PORT": "9100", "APPLIANCE_LLAMACPP__N_CTX": "2048"}
    loaded = load_settings(env=env, data_dir=tmp_path)

    assert loaded.config_file == config  # found in the data dir without APPLIANCE_CONFIG
    s = loaded.settings
    assert s.server.port == 9100  # env beats file
    assert s.server.host == "0.0.0.0"  # file beats default
    assert s.models.keep_alive == 10.0
    assert s.llamacpp.n_ctx == 2048  # env beats default
    assert s.llamacpp.n_batch == 2048  # untouched default
    described = sources(loaded)
    assert described["server.port"] == "env APPLIANCE_SERVER__PORT"
    assert described["server.host"] == f"file {config}"
    assert described["models.keep_alive"] == f"file {config}"
    assert described["llamacpp.n_ctx"] == "env APPLIANCE_LLAMACPP__N_CTX"
    assert described["llamacpp.n_batch"] == "default"


def test_explicit_config_file_and_data_dir_from_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path / "elsewhere.toml", '[logging]\nlevel = "debug"\n')
    data = tmp_path / "data"
    loaded = load_settings(env={"APPLIANCE_CONFIG": str(config), "APPLIANCE_DATA_DIR": str(data)})
    assert loaded.config_file == config
    assert loaded.settings.logging.level == "debug"
    assert loaded.settings.data_dir == str(data)
    assert sources(loaded)["data_dir"] == "env APPLIANCE_DATA_DIR"


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="APPLIANCE_CONFIG") as info:
        load_settings(env={"APPLIANCE_CONFIG": str(missing)}, data_dir=tmp_path)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(("raw", "expected"), [
    ("true", True), ("1", True), ("yes", True), ("on", True), ("TRUE", True),
    ("false", False), ("0", False), ("no", False), ("off", False),
])
def test_booleans_from_environment(tmp_path: Path, raw: str, expected: bool) -> None:
    loaded = load_settings(env={"APPLIANCE_LLAMACPP__FLASH_ATTN": raw, "APPLIANCE_MODELS__PIN_DEFAULT": raw},
                           data_dir=tmp_path)
    assert loaded.settings.llamacpp.flash_attn is expected
    assert loaded.settings.models.pin_default is expected


def test_numbers_and_lists_from_environment(tmp_path: Path) -> None:
    loaded = load_settings(env={"APPLIANCE_MODELS__KEEP_ALIVE": "2.5", "APPLIANCE_GATEWAY__MAX_QUEUE": "3",
                                "APPLIANCE_VLLM__EXTRA_ARGS": '["--max-model-len", "4096"]',
                                "APPLIANCE_MODELS__DEFAULT": "123"}, data_dir=tmp_path)
    s = loaded.settings
    assert s.models.keep_alive == 2.5
    assert s.gateway.max_queue == 3
    assert s.vllm.extra_args == ["--max-model-len", "4096"]
    assert s.models.default == "123"  # a string setting stays a string even when it looks like a number


def assert_one_line_naming(exc: ConfigError, *needles: str) -> None:
    message = str(exc)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(("env", "field"), [
    ({"APPLIANCE_SERVER__PORT": "abc"}, "server.port"),
    ({"APPLIANCE_SERVER__PORT": "70000"}, "server.port"),
    ({"APPLIANCE_SERVER__PORT": "0"}, "server.port"),
    ({"APPLIANCE_VLLM__GPU_MEMORY_UTILIZATION": "1.5"}, "vllm.gpu_memory_utilization"),
    ({"APPLIANCE_LOGGING__LEVEL": "loud"}, "logging.level"),
    ({"APPLIANCE_VLLM__EXTRA_ARGS": "--flag"}, "vllm.extra_args"),
])
def test_invalid_environment_value_names_the_field(tmp_path: Path, env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env, data_dir=tmp_path)
    assert_one_line_naming(info.value, field)


@pytest.mark.parametrize(("text", "needles"), [
    ("[server]\nport = 70000\n", ("server.port", "65535")),
    ('[server]\nport = "abc"\n', ("server.port",)),
    ("[server]\nbogus = 1\n", ("bogus", "server")),
    ("[nonsense]\nx = 1\n", ("nonsense",)),
    ("[server\n", ("appliance.toml",)),
])
def test_invalid_file_names_the_file_and_the_field(tmp_path: Path, text: str, needles: tuple[str, ...]) -> None:
    write_config(tmp_path / "appliance.toml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, data_dir=tmp_path)
    assert_one_line_naming(info.value, *needles)


@pytest.mark.parametrize("name", ["APPLIANCE_SERVER__NOPE", "APPLIANCE_NOSUCHSECTION__PORT"])
def test_unknown_environment_setting_is_an_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={name: "1"}, data_dir=tmp_path)
    assert_one_line_naming(info.value, name)


def test_invalid_boolean_from_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"APPLIANCE_LLAMACPP__FLASH_ATTN": "maybe"}, data_dir=tmp_path)
    assert_one_line_naming(info.value, "APPLIANCE_LLAMACPP__FLASH_ATTN", "maybe")


def test_unrelated_environment_variables_are_ignored(tmp_path: Path) -> None:
    loaded = load_settings(env={"APPLIANCE_TEST_URL": "http://x", "PATH": "/bin", "OTHER__THING": "1"},
                           data_dir=tmp_path)
    assert loaded.settings == load_settings(env={}, data_dir=tmp_path).settings


def test_invalid_environment_value_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    write_config(tmp_path / "appliance.toml", "[server]\nport = 9000\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env={"APPLIANCE_SERVER__PORT": "abc"}, data_dir=tmp_path)
    assert_one_line_naming(info.value, "APPLIANCE_SERVER__PORT")


def test_scalar_section_in_file_with_environment_override_is_a_config_error(tmp_path: Path) -> None:
    write_config(tmp_path / "appliance.toml", "server = 5\n")
    with pytest.raises(ConfigError):
        load_settings(env={"APPLIANCE_SERVER__PORT": "9000"}, data_dir=tmp_path)


@pytest.mark.parametrize("name", ["rag.api_key", "upstream.password", "x.hf_token", "x.client_secret", "x.passphrase",
                                  "x.token_file", "x.dbpassword", "--api-key", "--hf-token"])
def test_settings_named_like_secrets_are_never_shown(name: str) -> None:
    assert is_secret_name(name)
    assert public_value(name, "hunter2") == "(set)" and public_value(name, "") is None


@pytest.mark.parametrize("name", ["crypto.key_source", "rag.chunk_tokens", "server.port", "vllm.extra_args",
                                  "models.keep_alive", "--max-tokens"])
def test_ordinary_settings_are_shown(name: str) -> None:
    assert not is_secret_name(name)


def test_secrets_inside_values_are_redacted() -> None:
    assert public_value("vllm.extra_args", ["--api-key", "s3cret", "--port", "1", "--hf-token=abc"]) == [
        "--api-key", "(set)", "--port", "1", "--hf-token=(set)"]
    assert public_value("rag.chroma_url", "https://bob:pa55@chroma.lan:8000/x") == "https://bob:(set)@chroma.lan:8000/x"
    assert public_value("rag.chroma_url", "https://chroma.lan:8000/x") == "https://chroma.lan:8000/x"
    assert public_value("server.port", 8080) == 8080


def test_every_setting_has_one_kind_of_source(tmp_path: Path) -> None:
    config = write_config(tmp_path / "appliance.toml", "[server]\nport = 9000\n")
    loaded = load_settings(env={"APPLIANCE_CONFIG": str(config), "APPLIANCE_MODELS__KEEP_ALIVE": "5"},
                           data_dir=tmp_path / "d")
    kinds = {info.key: source_kind(info.source) for info in loaded.describe()}
    assert kinds["server.port"] == "file" and kinds["models.keep_alive"] == "env"
    assert kinds["data_dir"] == "cli" and kinds["server.host"] == "default"
    assert set(kinds.values()) == {"default", "file", "env", "cli"}
