# Semantic FPN, ADE20K 512x512, 40k iterations, AdamW lr 2e-4 (weight decay 1e-4), poly lr with
# power 0.9, 4 images x 8 GPUs = batch 32: the recipe of the EfficientFormer / SwiftFormer papers
# (PoolFormer's protocol: mmseg's 80k x 4-GPU schedule run as 40k on 8 GPUs with lr x 2).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/schedules/schedule_40k.py',
    'mmseg::_base_/default_runtime.py',
    './effbackbones_runtime.py',
]

crop_size = (512, 512)
model = dict(
    # size: pad training crops to 512x512; size_divisor: pad test images to a multiple of 32
    # (the padding is cropped off the prediction again by mmseg before the metric)
    data_preprocessor=dict(size=crop_size, size_divisor=None),
    pretrained=None,
    backbone=dict(_delete_=True, type='effbackbones.SwiftFormer', arch='xs', out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[48, 56, 112, 220], out_channels=256, num_outs=4),
    decode_head=dict(num_classes=150))

# The official repos resize test images so both sides are multiples of 32 (their AlignResize);
# AlignResize does the same after mmseg's keep-ratio resize to 2048x512.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='effbackbones.AlignResize', size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4))
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0, end=40000, by_epoch=False),
]
train_dataloader = dict(batch_size=4)
auto_scale_lr = dict(enable=False, base_batch_size=32)
