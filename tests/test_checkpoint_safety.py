"""Loading checkpoints from elsewhere (issue #18) and checkpoint faults (issue #14 §4)."""

import argparse
import hashlib
import importlib.util
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from detr_variants.checkpoint import (
    COCO_THING_IDS,
    Checkpointer,
    CheckpointMismatchError,
    ChecksumError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint_file,
    safe_load,
)
from detr_variants.engine import DefaultPredictor
from detr_variants.engine.lazy_train import evaluate, train
from detr_variants.model_zoo import get


# ------------------------------------------------------------------ helpers
class _CreatesFile:
    """Unpickling this creates ``path`` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(tmp_path, ext):
    """A checkpoint-shaped file whose unpickling creates ``tmp_path/pwned``; (file, marker)."""
    marker = tmp_path / "pwned"
    path = tmp_path / f"crafted{ext}"
    weights = np.zeros(1) if ext == ".pkl" else torch.zeros(1)
    data = {"model": {"w": weights}, "__author__": "x", "payload": _CreatesFile(marker)}
    if ext == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=2)
    else:
        torch.save(data, path)
    return str(path), marker


def _load_tool(repo_root):
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint_tool", os.path.join(repo_root, "tools", "convert_checkpoint.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _run_tool(repo_root, monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["convert_checkpoint.py", *map(str, args)])
    _load_tool(repo_root).main()


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    """``PathManager.get_local_path`` for URLs, with no network: ``serve[url] = file`` publishes
    a file; a download copies it into a cache folder. Returns (serve, downloaded urls)."""
    serve, downloads = {}, []
    cache = tmp_path / "cache"
    cache.mkdir()

    def get_local_path(url, **kwargs):
        if "://" not in url:  # detectron2 also passes local paths through
            return url
        downloads.append(url)
        local = cache / os.path.basename(url)
        shutil.copyfile(serve[url], local)
        return str(local)

    monkeypatch.setattr(safe_load.PathManager, "get_local_path", get_local_path)
    return serve, downloads


def _linear(seed):
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


# ------------------------------------------------------------------ crafted pickles are refused
ENTRY_POINTS = ["tool", "checkpointer", "train", "evaluate", "predictor", "model_zoo"]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_crafted_checkpoint_is_refused_by_every_entry_point(
    entry, ext, tmp_path, tiny_cfg, repo_root, monkeypatch
):
    path, marker = _crafted(tmp_path, ext)
    tiny_cfg.train.init_checkpoint = path
    load = {
        "tool": lambda: _run_tool(
            repo_root,
            monkeypatch,
            "--source",
            "official",
            "--arch",
            "deformable_detr",
            path,
            tmp_path / "out.pth",
        ),
        "checkpointer": lambda: Checkpointer(_linear(0)).load(path),
        "train": lambda: train(tiny_cfg),
        "evaluate": lambda: evaluate(tiny_cfg),
        "predictor": lambda: DefaultPredictor(tiny_cfg),
        "model_zoo": lambda: get("detr/detr_r18_synthetic", trained=path),
    }[entry]
    with pytest.raises(
        UnsafeCheckpointError, match=r"needs (io|builtins)\.open, .*trust_checkpoint=True"
    ):
        load()
    assert not marker.exists()


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_the_trusted_opt_in_unpickles_anything(ext, tmp_path):
    """The crafted files are live: with the opt-in their payload runs."""
    path, marker = _crafted(tmp_path, ext)
    load_checkpoint_file(path, trust=True)
    assert marker.exists()


# ------------------------------------------------------------------ released layouts still load
def _released_model_dict(arch):
    """A few tensors under the released names of ``arch`` and the names and values they must
    have after conversion (a class head indexed by the 91 COCO ids keeps rows 1, 2, ... 90)."""
    g = torch.Generator().manual_seed(0)
    conv, norm, head = (torch.randn(s, generator=g) for s in ((4, 3, 1, 1), (8,), (91, 8)))
    if arch.startswith("tsp"):
        released = {
            "backbone.bottom_up.res2.0.conv1.weight": conv,
            "backbone.top_block.p6.conv.weight": conv,
            "pixel_mean": torch.zeros(3, 1, 1),  # dropped
        }
        expected = {
            "backbone.bottom_up.res2.0.conv1.weight": conv,
            "backbone.top_block.p6.weight": conv,
        }
        return released, expected
    head_name = "class_embed.0.weight" if arch == "deformable_detr" else "class_embed.weight"
    released = {
        "backbone.0.body.layer1.0.conv1.weight": conv,
        "backbone.0.body.bn1.num_batches_tracked": torch.tensor(7),  # dropped
        "transformer.encoder.layers.0.norm1.weight": norm,
        head_name: head,
    }
    expected = {
        "backbone.res2.0.conv1.weight": conv,
        "encoder.layers.0.norm.weight": norm,
        head_name: head[torch.tensor(COCO_THING_IDS)],
    }
    return released, expected


def _released_checkpoint(arch, model_dict):
    """What the official repositories save: the DETR-family ``main.py`` saves model,
    optimizer, lr_scheduler, epoch and its ``argparse.Namespace``; TSP's detectron2
    checkpointer saves model, optimizer, scheduler and iteration."""
    params = [nn.Parameter(torch.randn(2, 2))]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    params[0].grad = torch.ones(2, 2)
    optimizer.step()  # optimizer state holds tensors and a step count
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    if arch.startswith("tsp"):
        return {
            "model": model_dict,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iteration": 269999,
        }
    args = argparse.Namespace(
        lr=2e-4,
        lr_backbone_names=["backbone.0"],
        lr_backbone=2e-5,
        batch_size=2,
        epochs=50,
        clip_max_norm=0.1,
        frozen_weights=None,
        backbone="resnet50",
        dilation=False,
        position_embedding="sine",
        num_queries=300,
        masks=False,
        dataset_file="coco",
        output_dir="exps/r50",
        device="cuda",
        seed=42,
        resume="",
        eval=False,
        distributed=True,
        dist_url="env://",
    )
    return {
        "model": model_dict,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": 49,
        "args": args,
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
@pytest.mark.parametrize(
    "arch", ["deformable_detr", "conditional_detr", "smca", "tsp_fcos", "tsp_rcnn"]
)
def test_released_checkpoint_layouts_load_and_convert(
    arch, zip_format, tmp_path, repo_root, monkeypatch
):
    """The tool reads each release's layout without the opt-in (``args`` included; the 2020
    releases predate torch's zip format) and writes the converted names and rows."""
    released, expected = _released_model_dict(arch)
    checkpoint = _released_checkpoint(arch, released)
    path = tmp_path / "released.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_checkpoint_file(str(path))
    assert set(loaded) == set(checkpoint)
    if "args" in loaded:
        assert loaded["args"] == checkpoint["args"]
    assert loaded["optimizer"]["state"][0]["exp_avg"].equal(
        checkpoint["optimizer"]["state"][0]["exp_avg"]
    )
    _run_tool(
        repo_root, monkeypatch, "--source", "official", "--arch", arch, path, tmp_path / "out.pth"
    )
    converted = load_checkpoint_file(str(tmp_path / "out.pth"))["model"]
    assert set(converted) == set(expected)
    for name, value in expected.items():
        assert torch.equal(converted[name], value), name


def test_numpy_arrays_and_scalars_are_allowed_in_pth(tmp_path):
    data = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "step": np.int64(3)}
    torch.save(data, tmp_path / "np.pth")
    loaded = load_checkpoint_file(str(tmp_path / "np.pth"))
    assert np.array_equal(loaded["model"]["w"], data["model"]["w"]) and loaded["step"] == 3


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_model_zoo_pkl_loads_through_the_restricted_unpickler(protocol, tmp_path):
    """detectron2's model-zoo layout (numpy arrays, ``__author__``, ``matching_heuristics``)."""
    model = _linear(1)
    blobs = {k: v.numpy() for k, v in model.state_dict().items()}
    with open(tmp_path / "zoo.pkl", "wb") as f:
        data = {"model": blobs, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
        pickle.dump(data, f, protocol=protocol)
    target = _linear(2)
    Checkpointer(target, strict=True).load(str(tmp_path / "zoo.pkl"))
    assert torch.equal(target.weight, model.weight) and torch.equal(target.bias, model.bias)


# ------------------------------------------------------------------ URLs carry a SHA-256
def _published(tmp_path, name="model.pth", seed=1):
    model = _linear(seed)
    path = tmp_path / name
    torch.save({"model": model.state_dict()}, path)
    return str(path), model


def test_url_with_the_published_hash_loads(tmp_path, fake_download):
    serve, downloads = fake_download
    path, model = _published(tmp_path)
    url = "https://example.org/ckpt/model.pth"
    serve[url] = path
    target = _linear(2)
    Checkpointer(target, strict=True).load(f"{url}?sha256={_sha256(path)}")
    assert torch.equal(target.weight, model.weight)
    assert downloads == [url]  # the query is not part of the download
    # detectron2's own query passes through: name-matching heuristics find "0.weight"
    target = nn.Sequential(_linear(3))
    Checkpointer(target).load(f"{url}?matching_heuristics=True&sha256={_sha256(path)}")
    assert torch.equal(target[0].weight, model.weight)


def test_torch_hub_file_name_hash_prefix_is_checked(tmp_path, fake_download):
    serve, _ = fake_download
    path, model = _published(tmp_path)
    good = f"https://example.org/detr-r50-{_sha256(path)[:8]}.pth"
    serve[good] = path
    assert torch.equal(load_checkpoint_file(good)["model"]["weight"], model.weight)
    bad = f"https://example.org/detr-r50-{'0' * 8}.pth"
    serve[bad] = path
    with pytest.raises(ChecksumError, match="00000000"):
        load_checkpoint_file(bad)


def test_a_corrupted_download_fails_the_hash_check_before_unpickling(tmp_path, fake_download):
    """The published hash is of a good file; the download is another (here a crafted pickle):
    refused, without running it, even for a trusted load."""
    serve, _ = fake_download
    published, _ = _published(tmp_path)
    crafted, marker = _crafted(tmp_path, ".pth")
    url = "https://example.org/model.pth"
    serve[url] = crafted
    for trust in (False, True):
        with pytest.raises(
            ChecksumError, match=rf"{url} failed its hash check.*expected {_sha256(published)}"
        ):
            Checkpointer(_linear(0), trust=trust).load(f"{url}?sha256={_sha256(published)}")
    assert not marker.exists()
    # a truncated download of the good file fails too
    with open(published, "rb") as f:
        truncated = tmp_path / "truncated.pth"
        truncated.write_bytes(f.read()[:-100])
    serve[url] = str(truncated)
    with pytest.raises(ChecksumError, match="failed its hash check"):
        load_checkpoint_file(f"{url}?sha256={_sha256(published)}")


def test_a_url_without_a_known_hash_loads_with_a_warning_naming_its_hash(
    tmp_path, fake_download, caplog
):
    serve, downloads = fake_download
    path, model = _published(tmp_path)
    url = "https://example.org/R-50.pth"  # '-50.' is no hash: fewer than 8 hex digits
    serve[url] = path
    target = _linear(2)
    with caplog.at_level(logging.WARNING):
        Checkpointer(target).load(url)
    assert torch.equal(target.weight, model.weight)
    assert f"unverified (SHA-256 {_sha256(path)})" in caplog.text
    assert f"?sha256={_sha256(path)}" in caplog.text


def test_model_zoo_get_loads_a_checkpoint_path_or_url(tmp_path, fake_download):
    serve, _ = fake_download
    name = "detr/detr_r18_synthetic"
    reference = get(name)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(1.0)  # differs from any fresh initialisation
    path = tmp_path / "converted.pth"
    torch.save({"model": reference.state_dict()}, path)
    url = f"https://example.org/converted.pth?sha256={_sha256(path)}"
    serve["https://example.org/converted.pth"] = str(path)
    for source in (str(path), url):
        model = get(name, trained=source)
        for (n, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="has no train.init_checkpoint"):
        get(name, trained=True)


# ------------------------------------------------------------------ no silent random weights
def test_eval_and_predictor_without_a_checkpoint_are_errors(tiny_cfg, caplog):
    tiny_cfg.train.init_checkpoint = ""
    for run in (lambda: evaluate(tiny_cfg), lambda: DefaultPredictor(tiny_cfg)):
        with pytest.raises(ValueError, match="random.*train.allow_random_weights=True"):
            run()
    tiny_cfg.train.allow_random_weights = True
    with caplog.at_level(logging.WARNING):
        DefaultPredictor(tiny_cfg)
    assert "random initial weights" in caplog.text


# ------------------------------------------------------------------ atomic saves, resume faults
def _checkpointer(tmp_path, seed=0):
    model = _linear(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Checkpointer(model, str(tmp_path), optimizer=optimizer), model


def test_a_kill_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    checkpointer, model = _checkpointer(tmp_path)
    checkpointer.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()
    real_save = torch.save

    def killed(obj, f, **kwargs):  # writes part of the file, then the process dies
        real_save(obj, f, **kwargs)
        f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000001")
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002")
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def _three_checkpoints(tmp_path):
    checkpointer, model = _checkpointer(tmp_path)
    weights = {}
    for name in ("model_0000001", "model_0000002", "model_final"):
        with torch.no_grad():
            model.weight.add_(1.0)
        weights[name] = model.weight.detach().clone()
        checkpointer.save(name, iteration=int(name[-1]) if name[-1].isdigit() else 3)
    return weights


@pytest.mark.parametrize(
    "fault", ["truncated", "bit flip", "empty model file", "empty last_checkpoint", "missing"]
)
def test_resume_falls_back_to_the_newest_intact_checkpoint(fault, tmp_path, caplog):
    weights = _three_checkpoints(tmp_path)
    final = tmp_path / "model_final.pth"
    if fault == "truncated":
        final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    elif fault == "bit flip":  # in the weight's bytes: the zip member's CRC no longer matches
        data = bytearray(final.read_bytes())
        data[data.index(weights["model_final"].numpy().tobytes())] ^= 0x01
        final.write_bytes(bytes(data))
    elif fault == "empty model file":
        final.write_bytes(b"")
    elif fault == "empty last_checkpoint":
        (tmp_path / "last_checkpoint").write_text("")
        (tmp_path / "model_0000002.pth").write_bytes(b"garbage")  # newest intact: model_final
    else:
        final.unlink()
    expected = "model_final" if fault == "empty last_checkpoint" else "model_0000002"
    checkpointer, model = _checkpointer(tmp_path, seed=5)
    with caplog.at_level(logging.WARNING):
        extra = checkpointer.resume_or_load("", resume=True)
    assert torch.equal(model.weight, weights[expected])
    assert extra["iteration"] == (3 if expected == "model_final" else 2)
    assert f"resuming from {tmp_path / (expected + '.pth')}" in caplog.text


def test_resume_with_no_intact_checkpoint_is_an_error_naming_the_file(tmp_path):
    _three_checkpoints(tmp_path)
    for name in ("model_0000001.pth", "model_0000002.pth", "model_final.pth"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=r"model_final\.pth, which is truncated"):
        _checkpointer(tmp_path)[0].resume_or_load("", resume=True)


def test_loading_a_truncated_file_names_it(tmp_path):
    path, _ = _published(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(CorruptCheckpointError, match=rf"{path} is truncated or corrupt"):
        Checkpointer(_linear(0), strict=True).load(path)
    with open(tmp_path / "empty.pkl", "wb"):
        pass
    with pytest.raises(CorruptCheckpointError, match=r"empty\.pkl is truncated or corrupt"):
        Checkpointer(_linear(0)).load(str(tmp_path / "empty.pkl"))


def test_resume_after_a_change_of_parameter_shapes_names_them(tiny_cfg):
    """Resuming with another num_classes: an error naming the head, before any optimizer step
    (it used to fail inside the optimizer with a size mismatch)."""
    tiny_cfg.train.max_iter = 1
    train(tiny_cfg)
    tiny_cfg.model.num_classes = 3
    tiny_cfg.train.max_iter = 2
    with pytest.raises(
        CheckpointMismatchError, match=r"class_embed\.weight: \(\d+, \d+\) in the checkpoint"
    ):
        train(tiny_cfg, resume=True)
