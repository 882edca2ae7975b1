"""Training faults: divergence is reported with the iteration and the loss terms."""

import pytest
import torch

from detr_variants.engine.lazy_train import train
from detr_variants.engine.trainer import SetPredictionTrainer
from detr_variants.modeling.criterion import check_finite_predictions


def _poison_at(monkeypatch, iteration, parameter):
    """Makes ``parameter`` of the model NaN just before step ``iteration`` runs."""
    original = SetPredictionTrainer.run_step

    def run_step(self):
        if self.iter == iteration:
            with torch.no_grad():
                dict(self.model.named_parameters())[parameter].fill_(float("nan"))
        original(self)

    monkeypatch.setattr(SetPredictionTrainer, "run_step", run_step)


def test_diverged_predictions_raise_before_matching_with_the_iteration_and_terms(
    tiny_cfg, monkeypatch
):
    """NaN boxes at iteration 2 (the box head's last layer is NaN): a FloatingPointError naming
    the iteration, the non-finite outputs of every decoder layer and their loss terms, not the
    GIoU's "expects xyxy boxes" ValueError from inside the matcher."""
    _poison_at(monkeypatch, 2, "bbox_embed.layers.2.bias")
    with pytest.raises(FloatingPointError) as info:
        train(tiny_cfg)
    msg = str(info.value)
    assert msg.startswith("iteration 2: non-finite predictions")
    assert "pred_boxes (loss_bbox, loss_giou)" in msg
    assert "aux_outputs[0].pred_boxes (loss_bbox_0, loss_giou_0)" in msg
    assert "pred_logits" not in msg  # the class head is still finite


def test_check_finite_predictions_names_each_output():
    finite = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    check_finite_predictions([("", finite), ("_0", finite)])  # no error
    bad = {
        "pred_logits": torch.tensor([[[0.0, float("inf"), 0.0]]]),
        "pred_boxes": finite["pred_boxes"],
    }
    with pytest.raises(FloatingPointError, match=r"enc_outputs\.pred_logits \(loss_class_enc\)$"):
        check_finite_predictions([("", finite), ("_enc", bad)])


class _LossModel(torch.nn.Module):
    """Returns fixed losses; ``loss_b`` becomes NaN from iteration 1."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, data):
        self.calls += 1
        b = self.w * (float("nan") if self.calls > 1 else 2.0)
        return {"loss_a": self.w * 1.0, "loss_b": b}


def test_non_finite_loss_term_is_named_with_the_iteration():
    model = _LossModel()
    trainer = SetPredictionTrainer(
        model, iter([[{}]] * 3), torch.optim.SGD(model.parameters(), 0.1)
    )
    with pytest.raises(
        FloatingPointError, match=r"^iteration 1: non-finite loss terms \{'loss_b': nan\}"
    ):
        trainer.train(0, 3)


def _record_losses(monkeypatch) -> dict:
    """{iteration: {loss name: value}} of every step run from now on (raw values, not the
    metrics.json medians, which restart their window after a resume)."""
    record = {}
    original = SetPredictionTrainer._write_metrics

    def write_metrics(self, loss_dict, data_time, *args, **kwargs):
        record[self.iter] = {k: v.item() for k, v in loss_dict.items()}
        return original(self, loss_dict, data_time, *args, **kwargs)

    monkeypatch.setattr(SetPredictionTrainer, "_write_metrics", write_metrics)
    return record


def test_resume_continues_the_data_order_augmentation_and_dropout_exactly(
    tiny_cfg, tmp_path, monkeypatch
):
    """2k = 6 iterations straight against k = 3, a crash, --resume and 3 more, same seed, with 2
    data-loader workers, aspect-ratio grouping, random augmentation and dropout: every loss term
    of every iteration is equal (exactly: same CPU kernels, same inputs, same random draws)."""
    from detectron2.utils.env import seed_all_rng

    tiny_cfg.train.max_iter = 6
    tiny_cfg.train.checkpointer.period = 1
    tiny_cfg.dataloader.train.num_workers = 2
    assert tiny_cfg.model.encoder.layer.dropout > 0 and tiny_cfg.model.decoder.layer.dropout > 0
    losses = _record_losses(monkeypatch)

    seed_all_rng(0)
    straight_dir = str(tmp_path / "straight")
    tiny_cfg.train.output_dir = straight_dir
    train(tiny_cfg)
    straight = dict(losses)
    assert sorted(straight) == list(range(6))

    losses.clear()
    tiny_cfg.train.output_dir = str(tmp_path / "resumed")
    original = SetPredictionTrainer.run_step

    def crash_at_3(self):
        if self.iter == 3:
            raise RuntimeError("simulated crash")
        original(self)

    seed_all_rng(0)
    with monkeypatch.context() as m:
        m.setattr(SetPredictionTrainer, "run_step", crash_at_3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tiny_cfg)
    seed_all_rng(1)  # a different process state: the checkpoint must carry what matters
    train(tiny_cfg, resume=True)
    assert sorted(losses) == list(range(6))
    for it in range(6):
        assert losses[it] == straight[it], it
    # a sanity check that the comparison can fail: consecutive iterations differ
    assert straight[3] != straight[4]


def _fake_dataset(n=23):
    """Dataset dicts of mixed aspect ratio; the mapper draws from np.random (like the
    augmentations) and skips every 7th image (like an unreadable file)."""
    return [{"id": i, "width": 40 + 7 * (i % 3), "height": 50} for i in range(n)]


def _fake_mapper(d):
    import numpy as np

    if d["id"] % 7 == 3:
        return None
    return {**d, "draw": float(np.random.rand())}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_state_continues_the_stream(num_workers):
    """2k batches from one loader against k batches, state_dict, a fresh loader and k more: the
    same images with the same random draws, with aspect-ratio grouping (the state holds the
    images waiting in a group) and skipped images; and 4 epochs' worth visit every image."""
    from itertools import islice

    from detr_variants.data import build_resumable_train_loader

    def loader():
        return build_resumable_train_loader(
            _fake_dataset(),
            mapper=_fake_mapper,
            total_batch_size=3,
            num_workers=num_workers,
            seed=5,
        )

    first, head = loader(), []
    for batch in islice(iter(first), 40):  # stop where images wait in a group: the hard case
        head.append(batch)
        if len(head) >= 4 and any(first.state_dict()["groups"]):
            break
    state, k = first.state_dict(), len(head)
    assert any(state["groups"]) and k < 40
    straight = list(islice(iter(loader()), 2 * k))
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + list(islice(iter(resumed), k)) == straight
    for batch in straight:
        assert len({d["width"] > d["height"] for d in batch}) == 1  # one group per batch
    seen = {d["id"] for batch in straight for d in batch}
    assert seen == {i for i in range(23) if i % 7 != 3}
