# What Conditional DETR and SMCA change in DETR's recipe besides the decoder (both papers train
# this way): 300 queries, sigmoid focal classification with the focal criterion (top 100 kept at
# test), 50 epochs with a x0.1 drop at 40, batch 16.
from .criterion import focal_criterion
from .schedule import step_schedule


def focal_detr_recipe(model, dataloader, train):
    """Applies that recipe to a DETR config in place; returns its ``lr_multiplier``."""
    model.update(
        num_queries=300, classification="sigmoid", test_topk=100, criterion=focal_criterion
    )
    dataloader.train.total_batch_size = 16
    train.epochs = 50
    return step_schedule(total_epochs=50, drop_epochs=[40])
