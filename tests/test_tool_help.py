"""``--help`` of tools/train_net.py and tools/convert_checkpoint.py: the project's own usage."""

import os
import subprocess
import sys

from detr_variants.checkpoint import known_converters


def tool_help(repo_root, tool):
    out = subprocess.run(
        [sys.executable, os.path.join(repo_root, "tools", tool), "--help"],
        env=dict(os.environ, PYTHONPATH=repo_root, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_train_net_help_shows_the_project_usage(repo_root):
    text = " ".join(tool_help(repo_root, "train_net.py").split())  # argparse wraps lines
    assert "Train or evaluate a detr_variants LazyConfig" in text
    assert "+key=value" in text and "unknown key is an error" in text
    assert "--config-file projects/detr/configs/detr_r18_synthetic.py" in text
    assert "Run on single machine" not in text  # detectron2's own epilog


def test_convert_checkpoint_help_lists_the_registered_pairs(repo_root):
    text = tool_help(repo_root, "convert_checkpoint.py")
    pairs = known_converters()
    assert ("official", "deformable_detr") in pairs and len(pairs) >= 5
    for source, arch in pairs:
        assert f"--source {source} --arch {arch}\n" in text
