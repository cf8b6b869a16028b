# SwiftFormer paper recipe for Mask R-CNN 1x (paper Sec. 4.1; results in its Table 3): COCO 2017,
# 12 epochs, 1333x800, AdamW lr 2e-4, total batch 32. We split the batch as 4 images x 8 GPUs (the
# 8-GPU machine of every other recipe here). Other set-ups: keep 32 in total (e.g. 2 x 16), or
# pass --auto-scale-lr to scale the lr linearly from base 32. Weight decay 1e-4, steps 8/11 and
# the 500-iteration linear warm-up from ratio 1e-3 are the shared 1x settings of
# maskrcnn_fpn_1x_coco_adamw.py (the SwiftFormer repository has no detection configs).
_base_ = ['./maskrcnn_fpn_1x_coco_adamw.py']

train_dataloader = dict(batch_size=4)
auto_scale_lr = dict(enable=False, base_batch_size=32)
