"""``.safetensors`` checkpoints (the timm Hub files) through every door a checkpoint path enters:
``init_cfg`` Pretrained, ``tools/convert_checkpoint.py``, ``load_checkpoint_file``; and the same
refusals as ``.pth`` files (empty, truncated, not the format, non-finite)."""
import struct

import pytest
import torch
from safetensors.torch import save_file

from effbackbones import CheckpointError, load_checkpoint_file
from effbackbones.models import EfficientFormer, EfficientFormerV2, LeViT, MobileFormer, SwiftFormer

import test_efficientformer
import test_efficientformer_v2
import test_levit
import test_swiftformer
from conftest import check_pack_parity, load_pack, make_weights


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# The official dense layout of each family's smallest variant: same outputs as the official code.
@pytest.mark.parametrize('model_cls,family,variant,kw', [
    (SwiftFormer, 'swiftformer', 'xs', {}),
    (EfficientFormer, 'efficientformer', 'l1', {}),
    (EfficientFormerV2, 'efficientformerv2', 's0', {}),
    (LeViT, 'levit', '128s', dict(out_indices=(0, 1, 2, 3, 4))),
    (MobileFormer, 'mobileformer', '26m', {}),
])
def test_official_layout_safetensors_gives_pack_outputs(model_cls, family, variant, kw, tmp_path):
    check_pack_parity(model_cls, family, variant, tmp_path, wrapper='safetensors', deploy=False,
                      **kw)


def test_levit_timm_layout_safetensors_gives_pack_outputs(tmp_path):
    check_pack_parity(LeViT, 'levit', '128s', tmp_path, wrapper='safetensors', deploy=False,
                      out_indices=(0, 1, 2, 3, 4),
                      state_dict=lambda pack: test_levit._timm_state_dict(
                          pack, make_weights().state_dict_from_pack(pack), conv=True))


def _timm_swiftformer(pack, cls_sd):
    return dict(zip(test_swiftformer._timm_order_keys(pack),
                    test_swiftformer._values_in_timm_order(pack, cls_sd)))


def _timm_efficientformer(pack, cls_sd):
    return {test_efficientformer._official_to_timm_key(k): v for k, v in cls_sd.items()}


# timm's layout of the released ImageNet weights (what model.safetensors on the Hub holds): the
# file loads through init_cfg into the same tensors as the official layout given as a .pth file.
@pytest.mark.parametrize('model_cls,family,variant,cls_state_dict,to_timm', [
    (SwiftFormer, 'swiftformer', 'xs', test_swiftformer._cls_state_dict, _timm_swiftformer),
    (EfficientFormer, 'efficientformer', 'l1', test_efficientformer._random_cls_state_dict,
     _timm_efficientformer),
    (EfficientFormerV2, 'efficientformerv2', 's0', test_efficientformer_v2.cls_state_dict,
     test_efficientformer_v2.timm_state_dict),
    (LeViT, 'levit', '128s', test_levit._cls_state_dict, test_levit._timm_state_dict),
])
def test_timm_layout_safetensors_loads_like_official_pth(model_cls, family, variant,
                                                         cls_state_dict, to_timm, tmp_path):
    pack = load_pack(family, variant)
    cls_sd = cls_state_dict(pack)
    pth = tmp_path / 'official.pth'
    torch.save({'model': cls_sd}, pth)
    official = model_cls(variant, init_cfg=dict(type='Pretrained', checkpoint=str(pth)))
    official.init_weights()
    path = _save(to_timm(pack, cls_sd), tmp_path / 'model.safetensors')
    model = model_cls(variant, init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    reference = official.state_dict()
    compared = [k for k in reference if not k.startswith('out_norms')]  # dense-only: in no file
    assert len(compared) > 200
    for k in compared:
        assert torch.equal(model.state_dict()[k], reference[k]), k


def test_safetensors_report_names_the_timm_layout(tmp_path):
    from effbackbones.checkpoint import load_pretrained
    pack = load_pack('levit', '128s')
    path = _save(test_levit._timm_state_dict(pack, test_levit._cls_state_dict(pack)),
                 tmp_path / 'model.safetensors')
    report = load_pretrained(LeViT('128s'), path)
    assert report['layout'] == 'timm' and not report['missing'] and not report['unexpected']


def test_renamed_safetensors_file_is_recognised_by_its_bytes(tmp_path):
    sd = {'a': torch.arange(6.).view(2, 3), 'b': torch.ones(4, dtype=torch.int64)}
    src = _save(sd, tmp_path / 'x.safetensors')
    renamed = tmp_path / 'model.bin'
    renamed.write_bytes(open(src, 'rb').read())
    got = load_checkpoint_file(renamed)
    assert set(got) == {'a', 'b'} and torch.equal(got['a'], sd['a'])


@pytest.fixture
def good_file(tmp_path):
    sd = {'stem.weight': torch.randn(8, 3, 3, 3), 'stem.bias': torch.randn(8)}
    return _save(sd, tmp_path / 'good.safetensors'), sd


def test_empty_safetensors_is_refused(tmp_path):
    path = tmp_path / 'model.safetensors'
    path.write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'corrupt checkpoint .*empty \(0 bytes\)'):
        load_checkpoint_file(path)


@pytest.mark.parametrize('keep,match', [
    (5, r'truncated \(5 bytes'),                         # inside the length field
    (20, r'truncated: its header announces \d+ bytes'),  # inside the JSON header
    (-10, r"truncated: tensor 'stem\.\w+' ends at byte"),  # inside the tensor data
])
def test_truncated_safetensors_is_refused(good_file, tmp_path, keep, match):
    data = open(good_file[0], 'rb').read()
    path = tmp_path / 'cut.safetensors'
    path.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(CheckpointError, match='corrupt checkpoint .*' + match):
        load_checkpoint_file(path)


def test_foreign_bytes_named_safetensors_are_refused(tmp_path):
    path = tmp_path / 'model.safetensors'
    torch.save({'w': torch.ones(2)}, path)  # a torch zip archive under the wrong name
    with pytest.raises(CheckpointError, match='not a safetensors file'):
        load_checkpoint_file(path)
    header = b'not json at all!'
    path.write_bytes(struct.pack('<Q', len(header)) + header)
    with pytest.raises(CheckpointError, match='header is not JSON'):
        load_checkpoint_file(path)


def test_nonfinite_safetensors_is_refused_through_init_cfg(tmp_path):
    pack = load_pack('swiftformer', 'xs')
    sd = make_weights().state_dict_from_pack(pack)
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() == 4)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[:3] = float('nan')
    path = _save(sd, tmp_path / 'nan.safetensors')
    model = SwiftFormer('xs', init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(CheckpointError, match=rf'non-finite.*{key} \(3/'):
        model.init_weights()


def test_converter_takes_safetensors(tmp_path):
    """tools/convert_checkpoint.py: a timm model.safetensors -> a clean backbone .pth."""
    from conftest import load_script, REPO
    import os.path as osp
    pack = load_pack('levit', '128s')
    cls_sd = test_levit._cls_state_dict(pack)
    src = _save(test_levit._timm_state_dict(pack, cls_sd), tmp_path / 'model.safetensors')
    dst = tmp_path / 'clean.pth'
    convert = load_script(osp.join(REPO, 'tools', 'convert_checkpoint.py'), 'effb_convert')
    convert.main([src, str(dst)])
    clean = torch.load(dst, weights_only=True)
    state = clean.get('state_dict', clean)
    model = LeViT('128s')
    model.load_state_dict(state)
    test_levit._check_matches_official(model, cls_sd)


def test_export_backbone_takes_safetensors(tmp_path):
    """tools/export_onnx.py --model X --checkpoint model.safetensors builds through this."""
    from effbackbones.deploy.export import build_backbone
    pack = load_pack('efficientformerv2', 's0')
    cls_sd = test_efficientformer_v2.cls_state_dict(pack)
    path = _save(test_efficientformer_v2.timm_state_dict(pack, cls_sd), tmp_path / 'm.safetensors')
    model = build_backbone('EfficientFormerV2', 's0', checkpoint=path)
    assert torch.equal(model.state_dict()['stem.conv1.conv.weight'], cls_sd['patch_embed.0.weight'])


def test_hub_urls_in_init_cfg_are_cached_per_repository(tmp_path, monkeypatch):
    """Every Hub file is called model.safetensors: two models' URLs must not share a cache file."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    pack = load_pack('levit', '128s')
    sds = [test_levit._timm_state_dict(pack, test_levit._cls_state_dict(pack, seed=s))
           for s in (1, 2)]
    for name, sd in zip(('a', 'b'), sds):
        folder = tmp_path / 'www' / 'timm' / name / 'resolve' / 'main'
        folder.mkdir(parents=True)
        _save(sd, folder / 'model.safetensors')

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(
        Quiet, directory=str(tmp_path / 'www')))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    try:
        for name, sd in zip(('a', 'b'), sds):
            url = (f'http://127.0.0.1:{httpd.server_address[1]}/timm/{name}/resolve/main/'
                   'model.safetensors')
            model = LeViT('128s', init_cfg=dict(type='Pretrained', checkpoint=url))
            model.init_weights()
            assert torch.equal(model.state_dict()['stem.conv1.c.weight'],
                               sd['stem.conv1.linear.weight'])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sorted(p.name for p in (tmp_path / 'hub' / 'checkpoints').iterdir()) == [
        'timm--a--model.safetensors', 'timm--b--model.safetensors']
