"""LazyConfig training and evaluation, used by ``tools/train_net.py`` (and the tests)."""

import difflib
import inspect
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import Checkpointer, load_inference_weights
from .devices import resolve_device
from .ema import EMAHook, ModelEMA
from .trainer import (
    ReleaseFreedMemory,
    SetPredictionTrainer,
    autocast_dtype,
    create_ddp_model,
)

logger = logging.getLogger("detr_variants")


# ------------------------------------------------------------------ configuration
def apply_overrides(cfg: DictConfig, overrides: List[str]) -> DictConfig:
    """detectron2's ``LazyConfig.apply_overrides``, but an unknown key raises instead of being
    added silently. Keys of a LazyCall node may name any argument its target accepts; a new key
    can still be added on purpose with a ``+`` prefix (hydra syntax)."""
    checked = []
    for override in overrides:
        key = override.split("=", 1)[0]
        if key.startswith("+"):
            checked.append(override[1:])
            continue
        _check_key_exists(cfg, key)
        checked.append(override)
    return LazyConfig.apply_overrides(cfg, checked)


def _check_key_exists(cfg: DictConfig, key: str) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if OmegaConf.is_dict(node) and part in node:
            node = node[part]
            continue
        if OmegaConf.is_list(node) and part.lstrip("-").isdigit():
            node = node[int(part)]
            continue
        if (
            OmegaConf.is_dict(node)
            and "_target_" in node
            and i == len(parts) - 1
            and part in _accepted_arguments(node["_target_"])
        ):
            return
        siblings = list(node.keys()) if OmegaConf.is_dict(node) else []
        if OmegaConf.is_dict(node) and "_target_" in node:
            siblings += _accepted_arguments(node["_target_"])
        close = difflib.get_close_matches(part, [str(s) for s in siblings], n=3)
        prefix = ".".join(parts[:i]) or "<root>"
        hint = (
            f"; did you mean {', '.join(prefix + '.' + c if i else c for c in close)}?"
            if close
            else ""
        )
        raise KeyError(
            f"Unknown config key {key!r}: {prefix!r} has no {part!r}{hint} "
            f"(prefix the key with '+' to add a new one)"
        )


def _accepted_arguments(target) -> List[str]:
    """Names of the keyword arguments a LazyCall target accepts (through its class hierarchy)."""
    fn = _callable(target)
    names = []
    for f in (
        [c.__init__ for c in inspect.getmro(fn) if "__init__" in vars(c)]
        if inspect.isclass(fn)
        else [fn]
    ):
        try:
            names += [
                p.name
                for p in inspect.signature(f).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
        except (TypeError, ValueError):
            pass
    return names


def _callable(target):
    """A LazyCall ``_target_``: the callable itself, or its dotted path."""
    return locate(target) if isinstance(target, str) else target


# ------------------------------------------------------------------ data and schedule
def build_train_loader(cfg) -> Tuple[object, int]:
    """The training loader and the number of training images (to turn epochs into iterations)."""
    loader_cfg = cfg.dataloader.train
    dataset = instantiate(loader_cfg.dataset)
    kwargs = {
        k: instantiate(v) if OmegaConf.is_config(v) else v
        for k, v in loader_cfg.items()
        if k not in ("_target_", "dataset")
    }
    return _callable(loader_cfg._target_)(dataset=dataset, **kwargs), len(dataset)


def resolve_max_iter(train_cfg, num_images: int, total_batch_size: int) -> int:
    """``train.max_iter`` when given, otherwise ``train.epochs`` worth of iterations."""
    max_iter, epochs = train_cfg.get("max_iter"), train_cfg.get("epochs")
    if max_iter:
        return int(max_iter)
    if not epochs:
        raise ValueError("set train.epochs or train.max_iter")
    return max(1, math.ceil(epochs * num_images / total_batch_size))


# ------------------------------------------------------------------ evaluation
def do_test(cfg, model) -> Dict:
    """Runs ``cfg.dataloader.evaluator`` over ``cfg.dataloader.test``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    evaluator = instantiate(cfg.dataloader.evaluator)
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def build_model(cfg):
    model = instantiate(cfg.model).to(resolve_device(cfg.train.get("device", "auto")))
    logger.info("Model:\n%s", model)
    return model


def evaluate(cfg) -> Dict:
    """``--eval-only``: load ``train.init_checkpoint`` strictly and evaluate (an empty one
    raises unless ``train.allow_random_weights``)."""
    model = build_model(cfg)
    load_inference_weights(
        model,
        cfg.train.init_checkpoint,
        trust=cfg.train.get("trust_checkpoint", False),
        allow_random_weights=cfg.train.get("allow_random_weights", False),
    )
    return do_test(cfg, create_ddp_model(model))


# ------------------------------------------------------------------ training
def clip_parameters(model, name_filter: Optional[str]) -> Optional[List]:
    """The trainable parameters whose name contains ``train.clip_grad.params`` (e.g.
    ``"encoder."``: TSP clips its transformer only), or None (clip all) when it is unset."""
    if not name_filter:
        return None
    params = [p for name, p in model.named_parameters() if p.requires_grad and name_filter in name]
    if not params:
        raise ValueError(f"train.clip_grad.params={name_filter!r} matches no trainable parameter")
    return params


def train(
    cfg,
    resume: bool = False,
    extra_hooks: Optional[Callable[[Callable[[], Dict]], Sequence[hooks.HookBase]]] = None,
) -> Dict:
    """Trains ``cfg.model`` with ``cfg.optimizer``, ``cfg.lr_multiplier`` and ``cfg.train``:

    AMP (``train.amp``), gradient clipping (``train.clip_grad``), EMA (``train.ema``), periodic
    checkpoints (``train.checkpointer``) that ``resume=True`` continues from (iteration,
    optimizer, scheduler, EMA), periodic evaluation (``train.eval_period``) and console (with
    ETA) / JSON / TensorBoard writers in ``train.output_dir``.

    Args:
        extra_hooks: builds more hooks from the evaluation function (``dataloader.evaluator``
            on the EMA weights when enabled). They run after each step's EMA and LR updates and
            before the periodic checkpoint, so the checkpoint holds their ``state_dict`` as of
            the iteration it saves.
    """
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader, num_images = build_train_loader(cfg)
    max_iter = resolve_max_iter(cfg.train, num_images, cfg.dataloader.train.total_batch_size)
    logger.info(
        "Training %d iterations (%d images, batch %d)",
        max_iter,
        num_images,
        cfg.dataloader.train.total_batch_size,
    )

    ema = (
        ModelEMA(model, **{k: v for k, v in cfg.train.ema.items() if k != "enabled"})
        if cfg.train.ema.enabled
        else None
    )
    clip = cfg.train.clip_grad
    trainer = SetPredictionTrainer(
        create_ddp_model(model, **cfg.train.ddp),
        loader,
        optimizer,
        amp_dtype=autocast_dtype(cfg.train.amp.enabled, cfg.train.amp.dtype, model.device.type),
        clip_max_norm=clip.max_norm if clip.enabled else 0.0,
        clip_params=clip_parameters(model, clip.get("params")),
    )
    checkpointables = {"trainer": trainer} | ({"ema": ema} if ema is not None else {})
    checkpointer = Checkpointer(
        model,
        cfg.train.output_dir,
        trust=cfg.train.get("trust_checkpoint", False),
        **checkpointables,
    )
    eval_model = ema.module if ema is not None else model
    last_results: Dict = {}

    def evaluate_and_keep() -> Dict:
        last_results.update(do_test(cfg, eval_model))
        return last_results

    trim_growth = cfg.train.get("release_memory_growth_mib", 512)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            ReleaseFreedMemory(trim_growth) if trim_growth else None,
            EMAHook(ema, model) if ema is not None else None,
            hooks.LRScheduler(
                scheduler=LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), max_iter)
            ),
            *(extra_hooks(evaluate_and_keep) if extra_hooks is not None else ()),
            hooks.PeriodicCheckpointer(checkpointer, max_iter=max_iter, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate_and_keep)
            if cfg.train.eval_period >= 0
            else None,
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, max_iter), period=cfg.train.log_period
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, max_iter)
    return last_results
