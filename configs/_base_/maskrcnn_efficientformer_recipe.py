# EfficientFormer paper recipe for Mask R-CNN 1x (snap-research/EfficientFormer detection/configs):
# AdamW lr 2e-4, weight decay 1e-4, 12 epochs (steps 8/11), 500 linear warm-up iterations from
# ratio 1e-6, batch 2 x 8 GPUs, 1333x800. Also used, as OUR choice, for Mobile-Former Mask R-CNN.
# Caveat: the 1e-6 warm-up ratio is in the official repo's schedule file (warmup_ratio=1e-6,
# commented '# 0.001') added with V2; the older v1 configs may have trained with mmdet's 1e-3.
_base_ = ['./maskrcnn_fpn_1x_coco_adamw.py']

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
