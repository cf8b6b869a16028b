"""tools/fetch_weights.py against an HTTP server on 127.0.0.1: a known checksum, a mismatch, the
resume of a partial download (Range), a mirror, and a source with no direct download."""
import hashlib
import os.path as osp
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO, load_script

fetch = load_script(osp.join(REPO, 'tools', 'fetch_weights.py'), 'effb_fetch_weights')
LEVIT = osp.join(REPO, 'configs', 'maskrcnn_levit_128s.py')
LEVIT_FILE = 'checkpoints/LeViT-128S-96703c44.pth'
PAYLOAD = bytes(range(256)) * 4000  # ~1 MB


class _Files(BaseHTTPRequestHandler):
    files = {}
    ranges = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get('Range')
        self.ranges.append(rng)
        start = int(rng.split('=')[1].rstrip('-')) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.send_header('Content-Length', str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Files.files, _Files.ranges = {'/w/LeViT-128S-96703c44.pth': PAYLOAD}, []
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()


def _table(tmp_path, url, sha256):
    path = tmp_path / 'weights.py'
    path.write_text(f'WEIGHTS = {{{LEVIT_FILE!r}: dict(origin="official", url={url!r}, '
                    f'sha256={sha256!r}, manual=None, timm=None)}}\n')
    return str(path)


def _run(tmp_path, *args):
    return fetch.main([*args, '--root', str(tmp_path / 'root')])


def test_download_with_known_checksum(server, tmp_path, capsys):
    table = _table(tmp_path, server + '/w/LeViT-128S-96703c44.pth',
                   hashlib.sha256(PAYLOAD).hexdigest())
    assert _run(tmp_path, LEVIT, '--table', table) == 0
    dst = tmp_path / 'root' / LEVIT_FILE
    assert dst.read_bytes() == PAYLOAD and not osp.exists(str(dst) + '.part')
    out = capsys.readouterr()
    assert '[ok]' in out.out and 'sha256 verified' in out.out
    assert '100%' in out.err  # the progress bar
    # a second run finds it and verifies it again without downloading
    assert _run(tmp_path, LEVIT, '--table', table) == 0
    assert 'already there, sha256 verified' in capsys.readouterr().out
    assert _Files.ranges == [None]


def test_checksum_mismatch_removes_the_file(server, tmp_path, capsys):
    table = _table(tmp_path, server + '/w/LeViT-128S-96703c44.pth', '0' * 64)
    assert _run(tmp_path, LEVIT, '--table', table) == 1
    out = capsys.readouterr().out
    assert '[error]' in out and 'checksum mismatch' in out and 'was removed' in out
    assert not (tmp_path / 'root' / LEVIT_FILE).exists()


def test_partial_download_is_resumed_with_a_range_request(server, tmp_path, capsys):
    part = tmp_path / 'root' / (LEVIT_FILE + '.part')
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:300000])
    table = _table(tmp_path, server + '/w/LeViT-128S-96703c44.pth',
                   hashlib.sha256(PAYLOAD).hexdigest())
    assert _run(tmp_path, LEVIT, '--table', table) == 0
    assert _Files.ranges == ['bytes=300000-']
    assert (tmp_path / 'root' / LEVIT_FILE).read_bytes() == PAYLOAD
    assert 'resuming LeViT-128S-96703c44.pth at 300000 bytes' in capsys.readouterr().err


def test_mirror_replaces_the_origin_and_unknown_checksum_is_reported(server, tmp_path, capsys):
    # the project's own table: LeViT's origin is dl.fbaipublicfiles.com, never contacted here
    assert _run(tmp_path, LEVIT, '--mirror', server + '/w/') == 0
    out = capsys.readouterr().out
    assert 'not verified' in out and hashlib.sha256(PAYLOAD).hexdigest() in out
    assert (tmp_path / 'root' / LEVIT_FILE).read_bytes() == PAYLOAD


def test_source_without_direct_download_prints_the_manual_step(tmp_path, capsys):
    config = osp.join(REPO, 'configs', 'retinanet_mobileformer_26m.py')
    assert _run(tmp_path, config) == 2
    out = capsys.readouterr().out
    assert '[manual]' in out and 'mobile-former-26m.pth.tar' in out
    assert 'https://github.com/AAboys/MobileFormer' in out
    assert not (tmp_path / 'root' / 'checkpoints' / 'mobile-former-26m.pth.tar').exists()


def test_every_paper_config_has_a_source():
    import re
    table = fetch.runpy.run_path(fetch.DEFAULT_TABLE)['WEIGHTS']
    for config in fetch.paper_configs():  # (the literal init_cfg line: Config.fromfile is slow)
        name = re.search(r"type='Pretrained', checkpoint='([^']+)'", open(config).read())[1]
        entry = table[name]
        assert entry['url'] or entry['manual'], config
        if entry['origin'] == 'timm':
            assert entry['url'] == ('https://huggingface.co/timm/' + entry['timm'] +
                                    '/resolve/main/model.safetensors')
