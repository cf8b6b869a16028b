# LeViT optimiser (OURS; the LeViT paper has no dense-prediction runs): AdamW lr 1e-4, wd 0.05 and
# no weight decay on the attention-bias tables (every `*.attention_biases` parameter of the
# backbone), as used for the LeViT-derived EfficientViT (microsoft/Cream) detection configs.
_base_ = ['./semfpn_ade20k_40k_adamw.py']

optim_wrapper = dict(
    optimizer=dict(lr=1e-4, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'attention_biases': dict(decay_mult=0.0)}))
