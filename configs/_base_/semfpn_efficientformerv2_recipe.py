# EfficientFormerV2 paper recipe for Semantic FPN: the shared 40k AdamW recipe with a poly floor of
# 1e-6 (official fpn_efficientformerv2_*_ade20k_40k.py) and SyncBN in train mode as the official
# runs (see maskrcnn_efficientformerv2_recipe.py; mmseg's FPN head already uses SyncBN).
_base_ = ['./semfpn_ade20k_40k_adamw.py']

sync_bn = 'torch'
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=1e-6, begin=0, end=40000, by_epoch=False),
]
