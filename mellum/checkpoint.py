"""Hugging Face checkpoints ⇄ `mellum.model.Transformer`: config.json + safetensors (single file or sharded).

The key table is strict and shared by both families: every tensor in a checkpoint must map to exactly one
parameter of the model built from its config.json, and every parameter must be present with the right shape;
anything else is a `ValueError` naming the key. Loading builds the model on the meta device and assigns the
tensors read from disk, so a 4B checkpoint needs its own size in memory, not twice that.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from mellum.config import ModelConfig

# Our parameter name -> checkpoint key. Main-model modules are named as in transformers minus the "model."
# prefix; the output head and the MTP layer (REFERENCE.md §2: "mtp.*", unconfirmed names) sit at the top level.
_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^lm_head\.(.*)$", r"lm_head.\1"),
    (r"^mtp\.(.*)$", r"mtp.\1"),
    (r"^(.*)$", r"model.\1"),
)
# Checkpoint tensors that are derived data, not weights (older Llama exports store rotary tables): skipped by name.
_DERIVED_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

# The weight files save_pretrained writes (and removes when a later save no longer uses them).
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def checkpoint_key(name: str) -> str:
    """The checkpoint key of one of our parameter names (fused expert tensors keep their fused name)."""
    for pattern, repl in _KEY_RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise AssertionError(name)


class Piece(NamedTuple):
    """Where a checkpoint tensor goes: our parameter `name`, optionally one expert's slice of a fused tensor."""

    name: str
    expert: int | None = None
    part: str | None = None  # "gate" | "up" | "down" for per-expert tensors


def key_table(model: torch.nn.Module) -> dict[str, Piece]:
    """Checkpoint key -> destination, for every tensor of the model as transformers writes it (a tied head is absent).

    transformers 5 holds experts fused in memory (`experts.gate_up_proj` [E, 2I, C], `experts.down_proj`
    [E, C, I]) but saves them per expert (`experts.{e}.gate_proj.weight` [I, C], `up_proj` [I, C], `down_proj`
    [C, I]), the layout of Qwen3-MoE checkpoints; that per-expert layout is the table. `fused_keys` lists the
    fused names, also accepted when loading.
    """
    table: dict[str, Piece] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        key = checkpoint_key(name)
        if name.endswith("experts.gate_up_proj"):
            base = key.removesuffix("gate_up_proj")
            for e in range(tensor.shape[0]):
                table[f"{base}{e}.gate_proj.weight"] = Piece(name, e, "gate")
                table[f"{base}{e}.up_proj.weight"] = Piece(name, e, "up")
        elif name.endswith("experts.down_proj"):
            base = key.removesuffix("down_proj")
            for e in range(tensor.shape[0]):
                table[f"{base}{e}.down_proj.weight"] = Piece(name, e, "down")
        else:
            table[key] = Piece(name)
    return table


def fused_keys(model: torch.nn.Module) -> dict[str, str]:
    """Fused expert checkpoint key -> our parameter name (an alternative layout accepted on load)."""
    return {checkpoint_key(n): n for n in model.state_dict(keep_vars=True)
            if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> the shape its tensor must have in a model of this config (per-expert and fused keys).

    Built from a model on the meta device, this is what a checkpoint is checked against before any tensor is read.
    """
    params = model.state_dict(keep_vars=True)
    shapes = {key: tuple(_piece_view(params[piece.name], piece).shape) for key, piece in key_table(model).items()}
    shapes.update({key: tuple(params[name].shape) for key, name in fused_keys(model).items()})
    return shapes


def _piece_view(full: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The slice of a fused expert tensor that a per-expert checkpoint tensor fills."""
    if piece.expert is None:
        return full
    half = full.shape[1] // 2
    if piece.part == "gate":
        return full[piece.expert, :half]
    if piece.part == "up":
        return full[piece.expert, half:]
    return full[piece.expert]


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---- loading ----------------------------------------------------------------------------------------------
def resolve_path(path: str | os.PathLike) -> Path:
    """A local directory, or a hub id downloaded with huggingface_hub when no such path exists."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"{local} is not a directory (expected a model directory with config.json)")
        return local
    text = str(path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or local.parent.is_dir():
        # `runs/model` where a folder `runs` exists is a mistyped path, not a hub id to look up on the network.
        raise FileNotFoundError(f"model directory {text} does not exist (and it is not a hub id like 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError(
            f"{text} is not a local directory; downloading it from the hub needs `pip install mellum[hub]`"
        ) from exc
    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated: one user-facing line
        raise FileNotFoundError(f"{text} is not a local directory, and taken as a hub id it could not be downloaded "
                                f"from the hub: {_hub_failure(exc)}; for a model on disk, give the path of its "
                                "directory (the one with config.json)") from exc


def _hub_failure(exc: Exception) -> str:
    """Why snapshot_download failed, in one line: huggingface_hub's messages run over several lines."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    if isinstance(exc, GatedRepoError):  # a subclass of RepositoryNotFoundError
        return "the repository is gated: accept its terms on its hub page, then log in with `hf auth login`"
    if isinstance(exc, RepositoryNotFoundError):
        return "the hub has no such repository (a private one needs `hf auth login`)"
    if isinstance(exc, LocalEntryNotFoundError):  # no answer from the hub, and no copy in the hub cache
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set and the hub cache has no copy"
        reason = f" ({type(cause).__name__}: {_first_line(cause)})" if cause is not None else ""
        return f"the hub could not be reached{reason} and the hub cache has no copy: no network, or no such repository"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def model_directory(path: str | os.PathLike) -> Path:
    """The model directory `--model PATH` names: a local directory, or the snapshot of a hub id (downloaded when the
    network allows, else taken from the local hub cache); FileNotFoundError when it holds no config.json."""
    root = resolve_path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"no model at {root} (expected config.json, safetensors weights, tokenizer.json)")
    return root


def model_label(given: str | None, path: str | os.PathLike) -> str:
    """How clients, telemetry and a remote backend know a model: a hub id as given, else its directory's name (a hub
    id's directory is a snapshot named by its commit hash)."""
    if given and not Path(given).expanduser().exists():
        return str(given)
    return Path(path).name


def check_export_dir(export: str | os.PathLike, sources: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, before a run starts, an export directory that writing the model would damage: one that exists and is
    not a model directory (its files would end up mixed with the model's), or one that is or contains a source of the
    run (`sources`: what each is called → its path, e.g. {"base model": ...}), which the export would overwrite."""
    export = Path(export).resolve()
    for what, source in sources.items():
        if source is None or not Path(source).exists():
            continue
        source = Path(source).resolve()
        if export == source or export in source.parents:
            raise ValueError(f"the export {export} is or contains the {what} {source}, which it would overwrite: "
                             "choose another --export")
    if export.exists() and not (export / "config.json").is_file():
        raise FileExistsError(f"the export {export} exists and is not a model directory, which it would overwrite: "
                              "choose another --export")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model directory's config.json."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    return ModelConfig.from_hf_config(hf)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{index} is not valid JSON: {exc}") from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} has no \"weight_map\" object (tensor name -> shard file name)")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shard files listed in {index.name} are missing: {', '.join(missing)}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")


def open_weights(file: Path):
    """`safe_open` on one weight file (tensors on the CPU), with an error naming the file if it is not readable."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as exc:  # truncated download, interrupted copy, not a safetensors file
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def load_pretrained(path: str | os.PathLike, dtype=None, device=None):
    """Build a `Transformer` from a Hugging Face directory (or hub id). dtype default float32; device default cpu.

    Only config.json and the safetensors files are read; a tokenizer in the same directory is left to
    `mellum.tokenizer.Tokenizer.from_pretrained`.
    """
    from mellum.model import Transformer

    root = resolve_path(path)
    config = load_config(root)
    dtype = resolve_dtype(dtype) or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(config)
    table, fused = key_table(model), fused_keys(model)
    expected, shapes = model.state_dict(keep_vars=True), expected_shapes(model)
    state: dict[str, torch.Tensor] = {}  # our name -> tensor on the target device (fused experts filled in place)
    seen: set[str] = set()
    for file in weight_files(root):
        with open_weights(file) as f:
            for key in f.keys():
                if _DERIVED_KEYS.match(key) or key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # derived data; a tied head some exports store anyway (it is the embedding)
                if key in seen:
                    raise ValueError(f"{file.name}: tensor {key!r} appears in more than one file")
                seen.add(key)
                piece = table.get(key) or (Piece(fused[key]) if key in fused else None)
                if piece is None:
                    raise ValueError(f"{file.name}: unexpected tensor {key!r} (no such parameter in a "
                                     f"{config.architecture} model with this config.json)")
                check_shape(file, key, tuple(f.get_slice(key).get_shape()), shapes[key])
                tensor = f.get_tensor(key)
                if piece.expert is None and piece.name not in state:
                    state[piece.name] = tensor.to(device=device, dtype=dtype)
                    continue
                if piece.name not in state:
                    state[piece.name] = torch.empty(expected[piece.name].shape, dtype=dtype, device=device)
                _piece_view(state[piece.name], piece).copy_(tensor)
    for key, name in fused.items():
        if key in seen and any(k in seen for k, p in table.items() if p.name == name):
            raise ValueError(f"{root}: {key!r} is stored both fused and per expert")
    missing = [key for key, piece in table.items() if key not in seen and not _fused_present(piece, seen)]
    if missing and all(k.startswith("mtp.") for k in missing):
        raise ValueError(f"{root}: config.json declares {config.num_mtp_layers} MTP layer(s) but the checkpoint has "
                         "no mtp.* tensors (re-saving with transformers drops them); set num_nextn_predict_layers "
                         "to 0 in config.json to load the model without its MTP head")
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{root}: checkpoint is missing tensors: {shown}")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared Parameter: re-tie
    model.to(device)  # rotary tables (non-persistent buffers) follow the weights
    return model.eval()


def check_shape(file: Path, key: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if shape != want:
        raise ValueError(f"{file.name}: tensor {key!r} has shape {list(shape)}, the config.json implies {list(want)}")


def _fused_present(piece: Piece, seen: set[str]) -> bool:
    return piece.expert is not None and checkpoint_key(piece.name) in seen


# ---- saving -----------------------------------------------------------------------------------------------
def save_pretrained(model, path: str | os.PathLike, dtype=None, max_shard_size_mb: float | None = None) -> None:
    """Write config.json, generation_config.json and safetensors weights in the layout transformers writes
    (experts per expert), sharded with model.safetensors.index.json when `max_shard_size_mb` is given. Each
    file is written atomically; weight files of an earlier save that this one does not use are removed; other
    files in the directory (a tokenizer) are left alone."""
    from safetensors.torch import save_file

    prepared = [name for name, m in model.named_modules()
                if any(isinstance(getattr(m, attr, None), torch.nn.Module) for attr in ("qkv_proj", "gate_up_proj"))
                or hasattr(m, "qweight")]
    if prepared:
        raise ValueError(f"this model was prepared for inference by the engine (fused or int8 layers, e.g. "
                         f"{prepared[0]!r}) and no longer has the checkpoint layout: save the model before handing "
                         "it to an engine, or load it again")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype) or model.dtype
    state = model.state_dict()
    pieces = list(key_table(model).items())
    sizes = {key: _piece_view(state[p.name], p).numel() * dtype.itemsize for key, p in pieces}
    shards = _shard(pieces, sizes, max_shard_size_mb)

    def materialise(shard):  # one shard's tensors at a time: saving needs at most one shard of extra memory
        return {key: _piece_view(state[p.name], p).detach().to("cpu", dtype, copy=True).contiguous() for key, p in shard}

    written: list[str] = []
    if len(shards) == 1:
        _atomic(out / "model.safetensors", lambda f: save_file(materialise(shards[0]), f, metadata={"format": "pt"}))
        written.append("model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic(out / name, lambda f, s=shard: save_file(materialise(s), f, metadata={"format": "pt"}))
            weight_map.update({key: name for key, _ in shard})
            written.append(name)
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / "model.safetensors.index.json", index)
        written.append("model.safetensors.index.json")
    config = model.config
    _write_json(out / "config.json", config.to_hf_config(dtype=str(dtype).removeprefix("torch.")))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.eos_token_id}
    _write_json(out / "generation_config.json", generation)
    for stale in out.glob("model*.safetensors*"):  # only names this function writes: other weights stay
        if _WEIGHT_FILE.match(stale.name) and stale.name not in written:
            stale.unlink()


def _shard(pieces: list, sizes: dict[str, int], max_shard_size_mb: float | None) -> list[list]:
    if max_shard_size_mb is None:
        return [pieces]
    limit = max_shard_size_mb * 1024 * 1024
    shards: list[list] = [[]]
    size = 0
    for key, piece in pieces:
        nbytes = sizes[key]
        # A tensor larger than the limit gets a shard of its own (as transformers does); tensors are never split.
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, piece))
        size += nbytes
    return shards


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(target: Path, data) -> None:
    _atomic(target, lambda p: Path(p).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))
