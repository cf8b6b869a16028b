# EfficientFormer (v1) paper recipe for Mask R-CNN 1x (snap-research/EfficientFormer
# detection/configs/mask_rcnn_efficientformer_lX_fpn_1x_coco.py): AdamW lr 2e-4, weight decay
# 1e-4, 12 epochs (steps 8/11), 500 linear warm-up iterations from ratio 1e-3, batch 2 x 8 GPUs,
# 1333x800. Also used, as OUR choice, for Mobile-Former Mask R-CNN.
#
# Warm-up ratio 1e-3: the schedule of the v1 code release (commit 7916a85: schedule_1x.py with
# mmdet's warmup_ratio=0.001), with which the v1 detection results were published. The later
# EfficientFormerV2 commit 733456e changed that shared file to warmup_ratio=1e-6 (commented
# '# 0.001' at the repository's HEAD); the V2 recipe (maskrcnn_efficientformerv2_recipe.py) uses
# 1e-6. Evidence and what was checked: docs/efficientformer.md.
_base_ = ['./maskrcnn_fpn_1x_coco_adamw.py']

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
