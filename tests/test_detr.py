import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

from detr_variants.model_zoo import get_config
from detr_variants.modeling import DETR
from helpers import build_tiny, image_input, set_prediction_train_step


class PatchBackbone(Backbone):
    """Non-overlapping 32x32 patches: unlike a ResNet, blind to padding beyond the image."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 64, kernel_size=32, stride=32)

    def forward(self, x):
        return {"res5": self.proj(x)}

    def output_shape(self):
        return {"res5": ShapeSpec(channels=64, stride=32)}


TWO_LAYERS = ("model.encoder.num_layers=2", "model.decoder.num_layers=2")


@pytest.fixture(scope="module")
def model():
    return build_tiny("detr/detr_r18_synthetic", *TWO_LAYERS)


def test_registered_and_official_head_sizes(model):
    from detectron2.modeling import META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("DETR") is DETR
    assert model.class_embed.out_features == model.num_classes + 1  # + no-object
    assert model.query_embed.num_embeddings == 50  # the synthetic config's


def test_train_step_gives_finite_losses_and_gradients(model):
    batch = [
        image_input(96, 128, [[10, 10, 60, 50], [30, 40, 90, 90]], [1, 4], seed=0),
        image_input(80, 100, [], [], seed=1),
    ]  # an image without objects
    set_prediction_train_step(model, batch)
    assert model.class_embed.weight.grad.abs().sum() > 0
    assert model.backbone.stem.conv1.weight.grad.abs().sum() > 0


def test_eval_returns_instances_in_original_coordinates(model):
    model.eval()
    x = image_input(96, 128, with_instances=False)
    x.update(height=192, width=256)
    with torch.no_grad():
        out = model([x])[0]["instances"]
    assert out.image_size == (192, 256)
    assert len(out) == model.query_embed.num_embeddings  # one detection per query
    assert out.pred_boxes.tensor[:, 2].max() <= 256 and out.pred_boxes.tensor[:, 3].max() <= 192
    assert (out.pred_classes < model.num_classes).all()  # the no-object class is never predicted
    assert ((out.scores >= 0) & (out.scores <= 1)).all()


def test_results_do_not_depend_on_batch_composition():
    """Padding masks keep a small image's prediction unchanged when batched with a larger one.

    A ResNet's receptive field does see the padding (as in the official code), so a patch backbone
    with image sides at multiples of its stride isolates what this checks: the transformer
    ignores padded tokens.
    """
    model = build_tiny("detr/detr_r18_synthetic", *TWO_LAYERS, backbone=L(PatchBackbone)()).eval()
    small = image_input(64, 96, with_instances=False, seed=3)
    large = image_input(128, 160, with_instances=False, seed=4)
    with torch.no_grad():
        alone = model([small])[0]["instances"]
        batched = model([small, large])[0]["instances"]
    assert torch.allclose(alone.scores, batched.scores, atol=1e-5)
    assert torch.allclose(alone.pred_boxes.tensor, batched.pred_boxes.tensor, atol=1e-3)


def test_image_smaller_than_the_largest_stride(model):
    model.eval()
    with torch.no_grad():
        out = model([image_input(20, 24, with_instances=False)])[0]["instances"]
    assert len(out) > 0 and torch.isfinite(out.pred_boxes.tensor).all()


def test_gt_class_outside_the_model_range_is_an_error(model):
    model.train()
    with pytest.raises(ValueError, match="num_classes"):
        model([image_input(64, 64, [[1, 1, 30, 30]], [model.num_classes])])


@pytest.mark.parametrize(
    "config, value",
    [("detr/detr_r50_500ep", "sigmoid"), ("deformable_detr/deformable_detr_r50_50ep", "softmax")],
)
def test_one_classification_override_switches_head_loss_and_matching(config, value):
    from detr_variants.engine.lazy_train import apply_overrides

    cfg = apply_overrides(get_config(config), [f"model.classification={value}"])
    assert cfg.model.criterion.classification == value
    assert cfg.model.criterion.matcher.classification == value


def test_sigmoid_detr_has_one_logit_per_class_and_a_variant_rejects_what_it_lacks():
    cfg = get_config("detr/detr_r18_synthetic")
    cfg.model.update(classification="sigmoid", num_queries=4)
    cfg.model.encoder.num_layers = cfg.model.decoder.num_layers = 1
    model = instantiate(cfg.model)
    assert model.class_embed.out_features == model.num_classes  # no no-object column
    assert model.criterion.classification == model.criterion.matcher.classification == "sigmoid"
    cfg = get_config("conditional_detr/conditional_detr_r18_synthetic")
    cfg.model.classification = "softmax"
    with pytest.raises(ValueError, match="classification must be one of \\['sigmoid'\\]"):
        instantiate(cfg.model)
