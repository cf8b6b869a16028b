# EfficientFormerV2 paper recipe for Mask R-CNN 1x: the EfficientFormer one with weight decay 0.05
# (official mask_rcnn_efficientformerv2_*_fpn_1x_coco.py), a warm-up from ratio 1e-6 and BatchNorm
# as in the official runs.
_base_ = ['./maskrcnn_efficientformer_recipe.py']

optim_wrapper = dict(optimizer=dict(weight_decay=0.05))

# Warm-up ratio 1e-6: the official _base_/schedules/schedule_1x.py as of the V2 commit 733456e
# (warmup_ratio=1e-6, which the V2 runs trained with; v1 used 1e-3, see
# maskrcnn_efficientformer_recipe.py).
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

# The official V2 dense backbone converts its BNs to SyncBatchNorm after loading the ImageNet
# weights, and its train() override only freezes nn.BatchNorm2d, so the BN statistics train,
# synchronised across GPUs. Reproduced with the backbone's norm_eval=False (its default) and
# sync_bn='torch': mmengine converts every BN of the model to SyncBN when training distributed
# (the backbone holds the only BNs of Mask R-CNN).
sync_bn = 'torch'
