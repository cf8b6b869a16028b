# Where each paper config's ImageNet init_cfg file comes from (read by tools/fetch_weights.py).
#
# Key: the path the configs give to init_cfg=dict(type='Pretrained', checkpoint=...).
#   url     a direct download (the official release where it has one, else timm's
#           model.safetensors on the Hugging Face Hub: the official weights in timm's layout,
#           which effbackbones reads and converts the same way; saved under the key's path)
#   origin  'official' or 'timm' (for the url); timm: the Hub model id
#   manual  the step for a user when no direct url is known (Google Drive folders)
#   sha256  the published checksum, or None where none was published or recorded here: the tool
#           then prints the sha256 it computed and says it could not verify the file
_HF = 'https://huggingface.co/timm/{}/resolve/main/model.safetensors'
_LEVIT = 'https://dl.fbaipublicfiles.com/LeViT/{}.pth'
_EF_MANUAL = ('the official {} file is on Google Drive (links in '
              'https://github.com/snap-research/EfficientFormer#readme)')


def _timm(hub_id, official_note=None):
    return dict(origin='timm', timm=hub_id, url=_HF.format(hub_id), sha256=None,
                manual=official_note)


WEIGHTS = {
    # EfficientFormer (snap-research/EfficientFormer, 300 epochs, distilled)
    **{f'checkpoints/efficientformer_{v}_300d.pth': _timm(
        f'efficientformer_{v}.snap_dist_in1k', _EF_MANUAL.format(f'efficientformer_{v}_300d.pth'))
       for v in ('l1', 'l3', 'l7')},
    # EfficientFormerV2 (same repository, 450 epochs, distilled)
    **{f'checkpoints/eformer_{v}_450.pth': _timm(
        f'efficientformerv2_{v}.snap_dist_in1k', _EF_MANUAL.format(f'eformer_{v}_450.pth'))
       for v in ('s0', 's1', 's2', 'l')},
    # SwiftFormer (Amshaker/SwiftFormer: Google Drive links in its README)
    **{f'checkpoints/SwiftFormer_{v.upper()}.pth': _timm(
        f'swiftformer_{v}.dist_in1k',
        f'the official SwiftFormer_{v.upper()}.pth is on Google Drive (links in '
        'https://github.com/Amshaker/SwiftFormer#readme)')
       for v in ('xs', 's', 'l1', 'l3')},
    # LeViT (facebookresearch/LeViT: direct links; timm: levit_*.fb_dist_in1k, same weights)
    **{f'checkpoints/{name}.pth': dict(origin='official', url=_LEVIT.format(name), sha256=None,
                                       timm=f'levit_{v}.fb_dist_in1k', manual=None)
       for v, name in (('128s', 'LeViT-128S-96703c44'), ('128', 'LeViT-128-b88c2750'),
                       ('192', 'LeViT-192-92712e41'), ('256', 'LeViT-256-13b5763e'),
                       ('384', 'LeViT-384-9bdaf2e2'))},
    # Mobile-Former (AAboys/MobileFormer): no direct link known, timm has no Mobile-Former
    **{f'checkpoints/mobile-former-{v}.pth.tar': dict(
        origin='official', url=None, timm=None, sha256=None,
        manual=f'download mobile-former-{v}.pth.tar from the links in '
               'https://github.com/AAboys/MobileFormer#readme')
       for v in ('26m', '52m', '96m', '151m', '214m', '294m', '508m')},
}
