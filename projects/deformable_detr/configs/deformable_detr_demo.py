# The `make demo` recipe (configs/common/demo.py) with Deformable DETR's iterative box refinement
# and two-stage proposals, the variant that learned fastest per CPU-second on the shapes_demo
# level (README "The demo"). projects/detr/configs/detr_demo.py is plain DETR with the same recipe.
from ....configs.common.demo import dataloader, lr_multiplier, make_demo_sized
from .deformable_detr_r50_50ep import model, optimizer, train

model.update(with_box_refine=True, two_stage=True)
make_demo_sized(model, optimizer, train, max_iter=850, output_dir="./output/demo")
