"""`appliance models convert`: a GGUF model turned into a Hugging Face folder, so that vLLM can serve it.

transformers reads GGUF (with the `gguf` package) but keeps quantised weights packed and refuses to save them, so
the weights are dequantised while loading and the quantizer is dropped before `save_pretrained`: the folder holds
bf16 safetensors, the tokenizer and the chat template. The folder is written to private tmpfs only and goes into
the store like any model, so no plaintext weights touch persistent disk."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from appliance.errors import RegistryError
from appliance.registry.folder import private_tmpfs_dir
from appliance.registry.service import ModelRecord, ModelRegistry

INSTALL_HINT = "install the conversion dependencies: pip install 'appliance[convert]' (after torch)"


def gguf_to_folder(gguf: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Write the GGUF model at `gguf` as a Hugging Face folder into `out`, weights dequantised to `dtype`."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise RegistryError(f"converting needs torch and transformers ({exc}); {INSTALL_HINT}",
                            code="convert_unavailable") from exc
    # transformers names the file relative to a folder; /proc/self/fd/N (the store's memfd) works as well
    folder, name = str(gguf.parent), gguf.name
    quiet = contextlib.redirect_stderr(io.StringIO())  # its progress bars would bury the command's own output
    try:
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype),
                                                         quantization_config=GgufConfig(dequantize=True))
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise RegistryError(f"transformers cannot read this GGUF ({exc}); only architectures transformers supports "
                            "(llama, qwen2, mistral, gemma, phi3 ...) can be converted",
                            code="unsupported_format") from exc
    # the weights are dense now: drop the GGUF quantizer, which would refuse to save them
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with quiet:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def convert_model(registry: ModelRegistry, source: str, name: str | None = None, *,
                  actor: str = "system") -> ModelRecord:
    """Convert the stored GGUF model `source` into a Hugging Face folder model `name` (default `<source>-hf`)."""
    record = registry.get(source)
    if record.format != "gguf":
        raise RegistryError(f"model '{source}' is a {record.format} model; only GGUF models can be converted",
                            param="model", code="unsupported_format")
    target = name or f"{source}-hf"
    with registry.store.open_for_load(record.sha256) as weights, private_tmpfs_dir("appliance-convert-") as out:
        gguf_to_folder(weights.path, out)
        return registry.add_folder(target, out, source=f"convert:{source}", licence=record.licence, actor=actor)
