# Mask R-CNN + Mobile-Former-294M + FPN, COCO 1x. Recipe OURS (the paper has no Mask R-CNN run):
# the EfficientFormer one, AdamW lr 2e-4, wd 1e-4, 12 epochs (steps 8/11), 500 linear warm-up
# iterations from ratio 1e-3, batch 2 x 8 GPUs, 1333x800; BatchNorms train (per-GPU BN).
_base_ = ['./_base_/maskrcnn_efficientformer_recipe.py']

model = dict(
    backbone=dict(
        type='effbackbones.MobileFormer', arch='294m', drop_path_rate=0.0,
        # ImageNet-1k weights released by AAboys/MobileFormer (Google-Drive files of the model
        # mobile-former-294m, timm-0.3.4 CheckpointSaver layout: 'state_dict' / 'state_dict_ema')
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/mobile-former-294m.pth.tar')),
    neck=dict(in_channels=[24, 48, 128, 192]))
