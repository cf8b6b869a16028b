# Mask R-CNN + FPN, COCO 1x, AdamW: the recipe shared by the EfficientFormer / SwiftFormer papers
# (official EfficientFormer configs: AdamW lr 2e-4, 12 epochs, steps at 8 and 11, 500 linear
# warm-up iterations, 2 images x 8 GPUs = batch 16, 1333x800). Family configs / recipe files set
# the backbone, the FPN in_channels, and the weight decay, warm-up ratio and batch where their
# paper differs (SwiftFormer: total batch 32, maskrcnn_swiftformer_recipe.py).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    './effbackbones_runtime.py',
]

model = dict(
    # every effbackbones backbone needs sides that are multiples of 32
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(_delete_=True, type='effbackbones.SwiftFormer', arch='xs', out_indices=(0, 1, 2, 3)),
    neck=dict(type='FPN', in_channels=[48, 56, 112, 220], out_channels=256, num_outs=5))

optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
# 8 GPUs x 2 images, as in the papers; scale lr linearly with --auto-scale-lr on other set-ups
train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
