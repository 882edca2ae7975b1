from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import MultiStepParamScheduler


def step_schedule(total_epochs: int, drop_epochs=(), factor: float = 0.1):
    """A learning-rate multiplier written in epochs: x``factor`` at each of ``drop_epochs``.

    detectron2 evaluates it at ``iteration / max_iter``, so the drops land at the same fraction
    of training whatever the dataset size and batch size.
    """
    return L(MultiStepParamScheduler)(
        values=[factor**i for i in range(len(drop_epochs) + 1)],
        milestones=list(drop_epochs),
        num_updates=total_epochs,
    )
