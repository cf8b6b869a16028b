# RetinaNet + Mobile-Former-508M + FPN, COCO 1x (1333x800): the Mobile-Former paper's detection
# framework (RetinaNet 1x; the paper reports +8.6 AP over MobileNetV3 there). Optimiser OURS (the
# paper's could not be verified): AdamW lr 1e-4, wd 1e-4, 12 epochs (steps 8/11), 500 warm-up
# iters, batch 2 x 8 GPUs; see ./_base_/retinanet_fpn_1x_coco_adamw.py.
_base_ = ['./_base_/retinanet_fpn_1x_coco_adamw.py']

model = dict(
    backbone=dict(
        type='effbackbones.MobileFormer', arch='508m', drop_path_rate=0.0,
        # ImageNet-1k weights released by AAboys/MobileFormer (Google-Drive files of the model
        # mobile-former-508m, timm-0.3.4 CheckpointSaver layout: 'state_dict' / 'state_dict_ema')
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/mobile-former-508m.pth.tar')),
    neck=dict(in_channels=[40, 72, 176, 240]))
