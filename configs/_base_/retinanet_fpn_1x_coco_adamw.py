# RetinaNet + FPN, COCO 1x (1333x800), AdamW: the detection framework of the Mobile-Former paper
# (RetinaNet, 1x schedule). The paper's optimiser settings could not be verified here, so the
# optimiser below is OURS: PVT's RetinaNet 1x recipe (AdamW lr 1e-4, weight decay 1e-4), with
# mmdet's 1x schedule (12 epochs, steps at 8 and 11, 500 linear warm-up iterations from 1e-3)
# and 2 images x 8 GPUs = batch 16. Family configs set the backbone and the FPN in_channels.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    './effbackbones_runtime.py',
]

model = dict(
    # every effbackbones backbone needs sides that are multiples of 32
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(_delete_=True, type='effbackbones.MobileFormer', arch='26m',
                  out_indices=(0, 1, 2, 3)),
    # RetinaNet's FPN: all four maps in, P3-P5 from strides 8/16/32 (start_level=1), P6/P7 from
    # extra stride-2 convs on the stride-32 map (add_extra_convs='on_input')
    neck=dict(type='FPN', in_channels=[12, 24, 64, 96], out_channels=256, start_level=1,
              add_extra_convs='on_input', num_outs=5))

optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
# 8 GPUs x 2 images; scale lr linearly with --auto-scale-lr on other set-ups
train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
