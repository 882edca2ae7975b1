# Plain DETR with the `make demo` recipe (configs/common/demo.py) on the shapes_demo level: the
# baseline for projects/deformable_detr/configs/deformable_detr_demo.py (README "The demo").
from ....configs.common.demo import dataloader, lr_multiplier, make_demo_sized
from .detr_r50_500ep import model, optimizer, train

make_demo_sized(model, optimizer, train, max_iter=850, output_dir="./output/demo_detr")
