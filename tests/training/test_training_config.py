from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.experiment import ConfigError, load_experiment
from training.config import EvaluateConfig, FinetuneConfig, LossWeights, PretrainConfig

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_defaults_are_the_papers_loss_weights_and_clip_shape():
    w = LossWeights()
    assert (w.depth, w.normals, w.segmentation, w.pose, w.action) == (0.5, 0.5, 0.1, 3.0, 1.0)
    cfg = PretrainConfig()
    assert (cfg.num_frames, cfg.img_size, cfg.tubelet_size) == (16, 224, 2)
    assert FinetuneConfig(data_root="x").synthetic_ratio == 1.0


def test_demo_config_has_valid_training_sections():
    cfg = load_experiment(DEMO)
    assert cfg.require("pretrain").variant == "pvit"
    assert cfg.require("finetune").data_format == "list"
    assert cfg.require("evaluate").spatial_crops == 3


@pytest.mark.parametrize("section, bad, field", [
    ({"pretrain": {"epochs": 0}}, None, "pretrain.epochs"),
    ({"pretrain": {"bogus": 1}}, None, "pretrain.bogus"),
    ({"pretrain": {"model": "pvit_huge"}}, None, "model"),
    ({"pretrain": {"num_frames": 5}}, None, "num_frames"),
    ({"pretrain": {"variant": "vit"}}, None, "variant"),
    ({"finetune": {"epochs": 1}}, None, "data_root"),
    ({"finetune": {"data_root": "x", "synthetic": None}}, None, "synthetic"),
])
def test_bad_sections_fail_naming_the_field(tmp_path, section, bad, field):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(section))
    with pytest.raises(ConfigError, match=field) as err:
        load_experiment(path)
    assert "\n" not in str(err.value)


def test_overrides_are_validated_like_keys():
    cfg = load_experiment(DEMO, {"pretrain.epochs": 7, "finetune.variant": "mt"})
    assert cfg.pretrain.epochs == 7 and cfg.finetune.variant == "mt"
    with pytest.raises(ConfigError, match="variant"):
        load_experiment(DEMO, {"finetune.variant": "resnet"})


def test_vit_variant_needs_no_synthetic_batches():
    cfg = FinetuneConfig(data_root="x", variant="vit", synthetic_ratio=1.0)
    assert cfg.synthetic_batch_size == 0
    half = FinetuneConfig(data_root="x", batch_size=8, synthetic_ratio=0.5)
    assert half.synthetic_batch_size == 4
    with pytest.raises(ValidationError):
        EvaluateConfig(data_root="x", spatial_crops=4)


def test_paper_and_videomae_configs_hold_the_papers_recipe():
    paper = load_experiment(DEMO.with_name("paper_ssv2.yaml")).require("finetune")
    assert (paper.model, paper.init_format, paper.variant) == ("mvitv2_s", "torchvision_mvit",
                                                                "pvit")
    assert (paper.num_frames, paper.img_size, paper.frame_stride) == (16, 224, 4)
    assert (paper.lr, paper.epochs, paper.synthetic_batch_size * 8) == (7e-5, 100, 64)
    assert paper.loss_weights == LossWeights()  # the paper's weights
    mae = load_experiment(DEMO.with_name("videomae_s_ssv2.yaml")).require("finetune")
    assert (mae.model, mae.init_format) == ("videomae_vit_s", "videomae")


def test_init_format_names_a_known_source_and_needs_init():
    with pytest.raises(ValidationError, match="init_format"):
        FinetuneConfig(data_root="x", init_format="caffe", init="w.pth")
    with pytest.raises(ValidationError, match="init_format"):
        FinetuneConfig(data_root="x", init_format="videomae")
    assert FinetuneConfig(data_root="x", init="w.pth", init_format="videomae_hf").init
