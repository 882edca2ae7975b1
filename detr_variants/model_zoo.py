"""``get_config`` / ``get`` over the packaged experiment configs, like ``detectron2.model_zoo``.

Config paths are relative to the repository root, e.g.
``get_config("projects/detr/configs/detr_r18_synthetic.py")``,
``get_config("configs/common/data/custom.py")`` or the short form
``get_config("detr/detr_r18_synthetic")`` (project/name). An installed package reads the copies
that ``setup.py`` puts in ``detr_variants/model_zoo_configs`` (same layout); a source checkout
(editable install) reads the files themselves.
"""

import os
from typing import Union

from detectron2.config import LazyConfig, instantiate


def _config_root() -> str:
    """Where ``configs/`` and ``projects/`` are: the installed copy, else the checkout."""
    package = os.path.dirname(os.path.abspath(__file__))
    packaged = os.path.join(package, "model_zoo_configs")
    return packaged if os.path.isdir(packaged) else os.path.dirname(package)


_ROOT = _config_root()


def config_path(name: str) -> str:
    """Absolute path of a packaged config; raises ``FileNotFoundError`` listing the choices."""
    candidates = [
        name,
        os.path.join("projects", name.split("/")[0], "configs", *name.split("/")[1:]),
    ]
    for rel in candidates:
        path = os.path.join(_ROOT, rel if rel.endswith(".py") else rel + ".py")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no config {name!r}; available: {', '.join(list_configs())}")


def list_configs():
    """Short names (``project/name``) of every experiment config."""
    projects = os.path.join(_ROOT, "projects")
    names = []
    for project in sorted(os.listdir(projects)) if os.path.isdir(projects) else []:
        folder = os.path.join(projects, project, "configs")
        if os.path.isdir(folder):
            names += [
                f"{project}/{f[:-3]}" for f in sorted(os.listdir(folder)) if f.endswith(".py")
            ]
    return names


def get_config(name: str):
    """The LazyConfig of a packaged experiment."""
    return LazyConfig.load(config_path(name))


def get(name: str, trained: Union[bool, str] = False, *, trust: bool = False):
    """The model of a packaged experiment, built on CPU (like ``detectron2.model_zoo.get``).

    Args:
        trained: False for the initial weights; a path or URL of a trained or converted
            checkpoint (``tools/convert_checkpoint.py``) to load strictly into the model; True
            for the config's ``train.init_checkpoint``. A URL is verified against its SHA-256
            (``?sha256=<hex>`` or a torch.hub file name) before it is read.
        trust: unpickle the checkpoint unrestricted and accept a URL without a known hash
            (only for files you trust; see :mod:`detr_variants.checkpoint.safe_load`).
    """
    cfg = get_config(name)
    model = instantiate(cfg.model)
    if trained is False:
        return model
    path = cfg.train.init_checkpoint if trained is True else trained
    if not path:
        raise ValueError(
            f"{name} has no train.init_checkpoint: pass trained=<path or URL of a checkpoint>"
        )
    from .checkpoint import load_inference_weights

    load_inference_weights(model, path, trust=trust)
    return model
