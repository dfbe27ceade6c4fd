"""Recipes as data (published numbers, overrides) and checkpoint atomicity."""

from __future__ import annotations

import pytest
import torch

from mellum.model import Transformer
from mellum.train import checkpointing
from mellum.train.optim import OptimConfig, build_optimizers
from mellum.train.recipes import RECIPES, get_recipe


def test_recipes_build_and_published_numbers():
    for name in RECIPES:
        assert get_recipe(name).name == name
    m2 = get_recipe("mellum2")
    assert m2.schedule.warmup_steps == 2000 and m2.seq_len == 8192 and m2.optim.muon and m2.fp8
    assert m2.batch_ramp.batch_size(0) == 2048 and m2.batch_ramp.batch_size(10**13) == 4096
    assert m2.model.num_experts == 64 and m2.model.num_mtp_layers == 1 and m2.model.router_z_loss_coef > 0
    assert len(m2.phases) == 3 and m2.phases[-1].until == 1.0
    assert get_recipe("mellum-4b").model.hidden_size == 3072
    long = get_recipe("mellum-tiny-long")
    assert long.model.rope_scaling["factor"] == 4.0 and long.seq_len == 4096 and long.init_from


def test_reference_model_size_budget():
    config = get_recipe("mellum-tiny").model
    with torch.device("meta"):
        model = Transformer(config)
    params = sum(p.numel() for p in model.parameters())
    assert 15e6 <= params <= 25e6 and params * 2 <= 50e6  # ≤ 50 MB of bf16 weights
    assert config.architecture == "llama" and config.num_kv_heads == config.num_heads  # Mellum-4B: no GQA
    assert config.prompt_format == "mellum" and not config.tie_word_embeddings


def test_overrides():
    c = get_recipe("tiny-cpu", ["optim.lr=5e-4", "model.num_layers=3", "max_minutes=2.5", "batch_ramp=16",
                                "data=some/dir"])
    assert (c.optim.lr, c.model.num_layers, c.max_minutes, c.data) == (5e-4, 3, 2.5, "some/dir")
    assert c.batch_ramp.batch_size(0) == 16
    with pytest.raises(ValueError, match="unknown setting 'optim.nope'"):
        get_recipe("tiny-cpu", ["optim.nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        get_recipe("tiny-cpu", ["lr"])
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("gpt-5")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        get_recipe("tiny-cpu", ["seq_len=4096"])


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_recipe("tiny-cpu").model)
    optimizers = build_optimizers(model, OptimConfig())
    for step in (10, 20, 30):
        checkpointing.save_checkpoint(tmp_path, model, optimizers, {"step": step, "progress": {}},
                                      {"pos": step}, {"recipe": "tiny-cpu"}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000020", "step_000030"]
    # A crash while writing step 40 leaves a .tmp directory: the newest complete checkpoint is still used.
    (root / "step_000040.tmp").mkdir()
    (root / "step_000040.tmp" / "state.pt").write_bytes(b"partial")
    assert checkpointing.latest_checkpoint(tmp_path).name == "step_000030"
    fresh = Transformer(get_recipe("tiny-cpu").model)
    fresh_opts = build_optimizers(fresh, OptimConfig())
    trainer, loader = checkpointing.load_checkpoint(root / "step_000030", fresh, fresh_opts)
    assert trainer["step"] == 30 and loader == {"pos": 30}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    # Saving step 40 again replaces the partial directory.
    checkpointing.save_checkpoint(tmp_path, model, optimizers, {"step": 40, "progress": {}}, {}, {}, keep=2)
    assert checkpointing.latest_checkpoint(tmp_path).name == "step_000040"
    assert not (root / "step_000040.tmp").exists()


def test_num_layers_override_resizes_uniform_patterns_and_refuses_mixed_ones():
    # docs/training.md's own example (`--set model.num_layers=4`) must give a model with that many layers.
    config = get_recipe("tiny-cpu", ["model.num_layers=3"])
    assert config.model.layer_types == ("full_attention",) * 3 and config.model.mlp_types == ("dense",) * 3
    assert len(Transformer(config.model).layers) == 3
    moe = get_recipe("tiny-moe-cpu")
    shallower = get_recipe("tiny-moe-cpu", ["model.num_layers=3"]).model  # the first layers of the same design
    assert shallower.layer_types == moe.model.layer_types[:3] and shallower.mlp_types == moe.model.mlp_types[:3]
    with pytest.raises(ValueError, match="cannot be extended"):
        get_recipe("tiny-moe-cpu", ["model.num_layers=6"])  # a sliding/full pattern to more layers: give it anew
    with pytest.raises(ValueError, match="1 entries for 2 layers"):
        get_recipe("tiny-cpu", ["model.layer_types=('full_attention',)"])
    moe = get_recipe("tiny-moe-cpu", ["model.num_layers=2", "model.layer_types=('sliding_attention', 'full_attention')",
                                      "model.mlp_types=('dense', 'sparse')"])
    assert len(Transformer(moe.model).layers) == 2


def test_time_budget_must_be_positive():
    for minutes in ("0", "-1"):
        with pytest.raises(ValueError, match="max_minutes must be positive"):
            get_recipe("tiny-cpu", [f"max_minutes={minutes}"])
    assert get_recipe("tiny-cpu", ["max_minutes=0.5"]).max_minutes == 0.5


def test_a_setting_added_since_a_checkpoint_was_written_does_not_block_its_resume():
    """A DPO checkpoint from before the reference was recorded must still resume; a recorded one must match."""
    from mellum.train.checkpointing import refuse_changed_settings

    refuse_changed_settings({"beta": 0.1}, {"beta": 0.1, "reference": "sha256 ab"}, "run")
    with pytest.raises(ValueError, match="reference: 'sha256 ab' → 'sha256 cd'"):
        refuse_changed_settings({"beta": 0.1, "reference": "sha256 ab"}, {"beta": 0.1, "reference": "sha256 cd"}, "run")
    with pytest.raises(ValueError, match="beta: 0.1 → None"):  # a recorded setting the run no longer has
        refuse_changed_settings({"beta": 0.1}, {}, "run")
