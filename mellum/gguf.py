"""GGUF export: a Llama-architecture Mellum model directory written as one GGUF file that llama.cpp runs.

Users who serve at scale with llama.cpp (`llama-server -m model.gguf`) reach it through the OpenAI-compatible
remote backend (`mellum.engine.openai`); the engine benchmark uses the same file to compare against llama.cpp on
identical weights. Only the Llama family (Mellum-4B and the bundled reference model) has a llama.cpp architecture
here; Mellum 2's sliding-window/MoE/MTP layout does not, and an MTP head on a Llama checkpoint is left out.

Two facts of the format shape the conversion:
- llama.cpp's "llama" architecture rotates adjacent pairs of each head's dimensions, Hugging Face checkpoints
  rotate halves (dims i and i + D/2), so q_proj and k_proj rows are reordered per head to give the same products.
- Our tokenizer splits digits one per token and then applies the GPT-2 byte-level regex, which is the pre-tokenizer
  llama.cpp calls "starcoder"; a plain byte-level one is "gpt2". Anything else is refused rather than exported
  with a tokenizer llama.cpp would apply differently.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from mellum.checkpoint import check_shape, expected_shapes, load_config, open_weights, resolve_path, weight_files

# Output tensor types by name. Norms (1-D) are always F32, as llama.cpp requires.
TYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # Q8_0 quantizes blocks of 32 values along a row (one fp16 scale each)

# Hugging Face key -> GGUF tensor name (llama.cpp's names for the "llama" architecture).
_NAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.embed_tokens\.weight$", "token_embd.weight"),
    (r"^model\.norm\.weight$", "output_norm.weight"),
    (r"^lm_head\.weight$", "output.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"blk.\1.attn_norm.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", r"blk.\1.attn_q.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$", r"blk.\1.attn_k.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$", r"blk.\1.attn_v.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"blk.\1.attn_output.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"blk.\1.ffn_norm.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"blk.\1.ffn_gate.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"blk.\1.ffn_up.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"blk.\1.ffn_down.weight"),
)
_SKIPPED = re.compile(r"^mtp\.|^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def gguf_name(key: str) -> str | None:
    """The GGUF tensor name of a Hugging Face checkpoint key; None for tensors llama.cpp has no use for (the MTP
    head, stored rotary tables). Unknown keys raise: a silently dropped weight would make a different model."""
    for pattern, name in _NAMES:
        if re.match(pattern, key):
            return re.sub(pattern, name, key)
    if _SKIPPED.match(key):
        return None
    raise ValueError(f"checkpoint tensor {key} has no GGUF counterpart in the llama architecture")


def pairs_from_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection [H*D, C] so that each head's rotate-half pairs (i, i + D/2)
    become adjacent pairs (2i, 2i + 1), llama.cpp's rotary layout. The attention scores are unchanged."""
    out, cols = w.shape
    d = out // heads
    return w.reshape(heads, 2, d // 2, cols).transpose(1, 2).reshape(out, cols)  # [H, 2, D/2, C] -> [H, D/2, 2, C]


def halves_from_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `pairs_from_halves`."""
    out, cols = w.shape
    d = out // heads
    return w.reshape(heads, d // 2, 2, cols).transpose(1, 2).reshape(out, cols)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization ("starcoder" or "gpt2"); other kinds raise."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or not byte_level.get("use_regex", True) or byte_level.get("add_prefix_space", False):
        raise ValueError(f"pre-tokenizer {kinds} is not one llama.cpp reproduces (byte-level BPE with the GPT-2 regex)")
    if kinds == ["ByteLevel"]:
        return "gpt2"
    digits = parts[0]
    if (kinds == ["Split", "ByteLevel"] and digits.get("pattern") == {"Regex": r"\p{N}"}
            and digits.get("behavior") == "Isolated" and not digits.get("invert", False)):
        return "starcoder"
    raise ValueError(f"pre-tokenizer {kinds} is not one llama.cpp reproduces (digits split, then GPT-2 byte level)")


def vocabulary(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings by id, their llama.cpp token types, and the merges as "a b" strings. Rows of the embedding
    beyond the tokenizer's vocabulary (padding) get unused placeholder tokens."""
    from gguf import TokenType

    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r} is not BPE")
    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has id {max(by_id)} but the model's vocabulary has {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


_CONTROL = r"(<[^<>{}\s]+>)"  # a control token in a prompt template, e.g. <fim_prefix> or <|file_sep|>


def fim_token_ids(prompt_format: str, tokens: list[str]) -> dict[str, int]:
    """GGUF key -> token id of the FIM tokens, read from the model's prompt format (`ModelConfig.prompt_format`): the
    tokens before `{prefix}` and `{suffix}`, the one that ends the FIM section (middle), the one that opens each
    context file (llama.cpp's file separator), the repository header's, and the pad token named like the prefix one.

    llama.cpp ends generation at the pad, repository and file-separator tokens and builds /infill's project context
    from the last two; of Mellum's tokens it recognises `<reponame>` by its text but not `<filename>`, so without
    this entry a llama.cpp server would write a completion on into the next file (REFERENCE.md §1: stop there).
    """
    from gguf import Keys

    from mellum.prompt import get_format

    fmt = get_format(prompt_format)
    found = {
        Keys.Tokenizer.FIM_PRE_ID: re.search(_CONTROL + r"\{prefix\}", fmt.fim),
        Keys.Tokenizer.FIM_SUF_ID: re.search(_CONTROL + r"\{suffix\}", fmt.fim),
        Keys.Tokenizer.FIM_MID_ID: re.search(_CONTROL + "$", fmt.fim),
        Keys.Tokenizer.FIM_SEP_ID: re.match(_CONTROL, fmt.context_file),
        Keys.Tokenizer.FIM_REP_ID: re.match(_CONTROL, fmt.repo),
    }
    names = {key: m.group(1) for key, m in found.items() if m}
    if Keys.Tokenizer.FIM_PRE_ID in names:  # <fim_prefix> -> <fim_pad>, <|fim_prefix|> -> <|fim_pad|>
        names[Keys.Tokenizer.FIM_PAD_ID] = names[Keys.Tokenizer.FIM_PRE_ID].replace("prefix", "pad")
    ids = {t: i for i, t in enumerate(tokens)}
    return {key: ids[name] for key, name in names.items() if name in ids}


def _encode(w: torch.Tensor, kind: str):
    """(numpy data, GGML type) for one tensor. 1-D tensors stay F32; Q8_0 applies to rows whose length divides
    into its 32-value blocks, the others fall back to F16."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if w.dim() == 1 or kind == "f32":
        return w.float().numpy(), GGMLQuantizationType.F32
    if kind == "bf16":
        return w.bfloat16().view(torch.int16).numpy().view(np.uint16), GGMLQuantizationType.BF16
    if kind == "q8_0" and w.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(w.float().numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return w.half().numpy(), GGMLQuantizationType.F16


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, kind: str = "f32", progress: bool = True) -> dict:
    """Write the Llama-architecture model directory `model` (config.json, safetensors, tokenizer.json) as the GGUF
    file `out` with weights in `kind` (f32, f16, bf16 or q8_0). The file appears only once complete.
    Returns a summary: path, tensors, bytes, skipped checkpoint keys, pre-tokenizer."""
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("GGUF export needs the gguf package: pip install 'mellum[export]'") from exc
    from tqdm import tqdm

    from mellum.model import Transformer

    if kind not in TYPES:
        raise ValueError(f"unknown GGUF weight type {kind!r}; use one of {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise FileExistsError(f"{out} is a directory; give the path of the GGUF file to write")
    root = resolve_path(model)
    config = load_config(root)
    if config.architecture != "llama":
        raise ValueError(f"{root}: GGUF export supports the Llama architecture (Mellum-4B family); this model is "
                         f"{config.architecture!r} (sliding-window attention and experts have no llama.cpp "
                         "architecture here)")
    if config.rope_scaling:
        raise ValueError(f"{root}: rope scaling {config.rope_scaling} is not exported (llama.cpp's YaRN parameters "
                         "differ); export the unscaled model")
    tokenizer_file = root / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{root} has no tokenizer.json (GGUF files carry their tokenizer)")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    pre = pre_tokenizer_name(tokenizer_json)
    tokens, types, merges = vocabulary(tokenizer_json, config.vocab_size)
    # The metadata below comes from config.json; every tensor must have the shape it implies, or llama.cpp would
    # refuse the file (or, for q/k with another head count, reorder rows into a different model).
    with torch.device("meta"):
        shapes = expected_shapes(Transformer(config))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_name(root.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    if kind == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(config.eos_token_id)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    writer.add_add_bos_token(False)  # Mellum prompts start with their own tokens, never a BOS
    for key, token_id in fim_token_ids(config.prompt_format, tokens).items():
        writer.add_uint32(key, token_id)

    skipped, count = [], 0
    files = weight_files(root)
    for file in tqdm(files, desc=f"GGUF {kind}", unit="file", disable=not progress or len(files) < 2):
        with open_weights(file) as f:
            for key in sorted(f.keys()):
                name = gguf_name(key)
                # A tied head that an export stored anyway is the embedding (load_pretrained skips it too); writing
                # it would also make llama.cpp read an untied model.
                if name is None or key == "lm_head.weight" and config.tie_word_embeddings:
                    skipped.append(key)
                    continue
                if key not in shapes:
                    raise ValueError(f"{file.name}: unexpected tensor {key!r} (no such weight in a model with this "
                                     "config.json)")
                check_shape(file, key, tuple(f.get_slice(key).get_shape()), shapes[key])
                w = f.get_tensor(key)
                if name.endswith("attn_q.weight"):
                    w = pairs_from_halves(w, config.num_heads)
                elif name.endswith("attn_k.weight"):
                    w = pairs_from_halves(w, config.num_kv_heads)
                data, dtype = _encode(w, kind)
                writer.add_tensor(name, data, raw_dtype=dtype)
                count += 1
    expected = 3 + 9 * config.num_layers - (1 if config.tie_word_embeddings else 0)
    if count != expected:
        writer.close()
        partial.unlink(missing_ok=True)
        raise ValueError(f"{root}: found {count} llama tensors, expected {expected} for {config.num_layers} layers")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)  # nothing half-written is left behind (a full disk, Ctrl-C)
        raise
    writer.close()
    os.replace(partial, out)
    return {"path": str(out), "type": kind, "tensors": count, "bytes": out.stat().st_size,
            "skipped": skipped, "pre_tokenizer": pre}
