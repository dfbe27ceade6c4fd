"""`mellum info`: a model's architecture and its total and active-per-token parameter counts, without weights."""

from __future__ import annotations

import json
from pathlib import Path


def configure(parser) -> None:
    parser.add_argument("model", metavar="NAME_OR_PATH",
                        help="a preset name (mellum-4b, mellum2-12b-a2.5b, tiny-dense, tiny-moe) or a model directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def describe(name_or_path: str) -> dict:
    """Architecture summary and parameter counts; the model is built on the meta device (nothing allocated)."""
    import torch

    from mellum.config import PRESETS, get_config
    from mellum.checkpoint import load_config
    from mellum.model import Transformer

    if name_or_path in PRESETS:
        config = get_config(name_or_path)
    elif Path(name_or_path).exists():
        config = load_config(name_or_path)
    else:
        raise FileNotFoundError(f"{name_or_path} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    with torch.device("meta"):
        model = Transformer(config)
    counts = parameter_counts(model)
    return {
        "model": name_or_path,
        "architecture": config.architecture,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "full_attention_layers": config.layer_types.count("full_attention"),
        "sliding_attention_layers": config.layer_types.count("sliding_attention"),
        "sliding_window": config.sliding_window,
        "dense_mlp_layers": config.mlp_types.count("dense"),
        "sparse_mlp_layers": config.mlp_types.count("sparse"),
        "experts": config.num_experts,
        "experts_per_token": config.num_experts_per_tok,
        "mtp_layers": config.num_mtp_layers,
        "max_position_embeddings": config.max_position_embeddings,
        "yarn": config.rope_scaling,
        **counts,
    }


def parameter_counts(model) -> dict[str, int]:
    """Total and per-token active parameters of the main model (embeddings and head included, MTP excluded),
    plus the MTP layer's own parameters. Active counts only K of E experts in each sparse layer."""
    from mellum.model.moe import Experts

    config = model.config
    main = {id(p): p for name, p in model.named_parameters() if not name.startswith("mtp.")}
    total = sum(p.numel() for p in main.values())
    inactive = 0
    for name, module in model.named_modules():
        if isinstance(module, Experts) and not name.startswith("mtp."):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.num_experts
            inactive += per_expert * (module.num_experts - config.num_experts_per_tok)
    mtp = sum(p.numel() for name, p in model.named_parameters() if name.startswith("mtp."))
    return {"total_params": total, "active_params": total - inactive, "mtp_params": mtp}


def run(args) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model']}: {info['architecture']}, {info['layers']} layers, width {info['hidden_size']}, "
          f"{info['heads']} heads / {info['kv_heads']} KV heads x {info['head_dim']}, vocabulary {info['vocab_size']}")
    if info["sliding_attention_layers"]:
        print(f"  attention: {info['full_attention_layers']} full, {info['sliding_attention_layers']} sliding "
              f"(window {info['sliding_window']})")
    if info["sparse_mlp_layers"]:
        print(f"  MLP: {info['dense_mlp_layers']} dense, {info['sparse_mlp_layers']} sparse "
              f"({info['experts_per_token']} of {info['experts']} experts per token)")
    print(f"  parameters: {info['total_params']:,} total ({_short(info['total_params'])}), "
          f"{info['active_params']:,} active per token ({_short(info['active_params'])})")
    if info["mtp_layers"]:
        print(f"  MTP layer: {info['mtp_params']:,} more parameters (output head shared)")
    return 0


def _short(count: int) -> str:
    """4.02B, 23.2M, 205.1K: a model of 23M parameters is not "0.02B"."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(count)
