# Input normalisation of the two ImageNet weight families, in the channel order each was trained
# in. A model config takes one with `**` (imported with a leading underscore, which keeps LazyConfig
# from exporting it as a config key); its dataloader's mapper takes the same `image_format`.
TORCHVISION_RGB = dict(  # torchvision's statistics (DETR, Deformable DETR, Conditional DETR, SMCA)
    pixel_mean=[123.675, 116.280, 103.530], pixel_std=[58.395, 57.120, 57.375], input_format="RGB"
)
MSRA_BGR = dict(  # detectron2's MSRA (caffe) statistics (TSP)
    pixel_mean=[103.530, 116.280, 123.675], pixel_std=[1.0, 1.0, 1.0], input_format="BGR"
)
