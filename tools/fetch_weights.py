#!/usr/bin/env python
"""Download the ImageNet files that the paper configs' ``init_cfg`` names, verified.

    python tools/fetch_weights.py configs/maskrcnn_levit_128s.py [CONFIG ...]
    python tools/fetch_weights.py --all                        # every paper config's file
    python tools/fetch_weights.py --all --mirror http://host/ckpts   # an offline mirror

Where each file comes from is in ``configs/_base_/weights.py`` (the official release URL or the
timm Hub file, its sha256 where one is known). A file is downloaded to the path the config names
(``checkpoints/...`` under the repository, or ``--root``) through ``<path>.part`` with a progress
bar; an interrupted download is resumed (HTTP Range) by running the command again. A known
checksum is verified: a mismatch removes the file and says "checksum". Where no checksum is
known, the sha256 computed is printed and the file is reported as not verified. A file that has
no direct download (Google Drive folders) gets the manual step printed instead.

``--mirror URL`` replaces every origin: the file is fetched as ``URL/<file name>`` (a folder of
checkpoints served over HTTP, e.g. ``python -m http.server`` on a machine that has them).

Exit status: 0 when every requested file is in place, 2 when only manual steps remain, 1 after a
failed download or a checksum mismatch.
"""
import argparse
import glob
import hashlib
import os
import os.path as osp
import runpy
import sys
import time
import urllib.error
import urllib.request

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_TABLE = osp.join(REPO, 'configs', '_base_', 'weights.py')
CHUNK = 1 << 20


class FetchError(RuntimeError):
    pass


def init_cfg_checkpoint(config):
    """The checkpoint path of a config's backbone ``init_cfg`` (None when it has none)."""
    from mmengine.config import Config
    init = Config.fromfile(config).model.get('backbone', {}).get('init_cfg') or {}
    return init.get('checkpoint') if init.get('type') == 'Pretrained' else None


def paper_configs():
    return sorted(glob.glob(osp.join(REPO, 'configs', '*.py')))


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(CHUNK), b''):
            digest.update(block)
    return digest.hexdigest()


class Progress:
    """A one-line progress bar on a terminal; a line per 10% elsewhere (logs)."""

    def __init__(self, name, total, start):
        self.name, self.total, self.done, self.start = name, total, start, start
        self.t0, self.tty, self.last = time.time(), sys.stderr.isatty(), -1

    def update(self, n):
        self.done += n
        if not self.total:
            return
        pct = int(100 * self.done / self.total)
        if self.tty or pct // 10 != self.last // 10:
            rate = (self.done - self.start) / max(time.time() - self.t0, 1e-6) / 1e6
            bar = '#' * (pct // 4)
            line = (f'  {self.name} [{bar:<25}] {pct:3d}% {self.done / 1e6:.1f}/'
                    f'{self.total / 1e6:.1f} MB {rate:.1f} MB/s')
            print(line, end='\r' if self.tty else '\n', file=sys.stderr, flush=True)
        self.last = pct

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def download(url, dst):
    """``url`` -> ``dst`` through ``dst.part``, resuming a partial ``.part`` with a Range request
    (a server that ignores Range sends the whole file again: the part is then restarted)."""
    part = dst + '.part'
    have = osp.getsize(part) if osp.exists(part) else 0
    request = urllib.request.Request(url, headers={'User-Agent': 'effbackbones-fetch'})
    if have:
        request.add_header('Range', f'bytes={have}-')
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part already holds the whole file
            os.replace(part, dst)
            return
        raise FetchError(f'{url}: HTTP {err.code} {err.reason}') from None
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f'{url}: {getattr(err, "reason", err)}') from None
    with response:
        resumed = have and response.status == 206
        if have:
            print(f'  resuming {osp.basename(dst)} at {have} bytes' if resumed else
                  f'  the server ignored the range request: downloading {osp.basename(dst)} '
                  'again', file=sys.stderr)
        start = have if resumed else 0
        length = response.headers.get('Content-Length')
        total = start + int(length) if length else None
        progress = Progress(osp.basename(dst), total, start)
        try:
            with open(part, 'ab' if resumed else 'wb') as f:
                for block in iter(lambda: response.read(CHUNK), b''):
                    f.write(block)
                    progress.update(len(block))
        except OSError as err:
            raise FetchError(f'{url}: interrupted ({err}); run the command again to resume '
                             f'from {part}') from None
        finally:
            progress.close()
    if total is not None and osp.getsize(part) != total:
        raise FetchError(f'{url}: got {osp.getsize(part)} of {total} bytes; run the command '
                         f'again to resume from {part}')
    os.replace(part, dst)


def verify(path, entry):
    """'verified' or 'not verified (sha256 ...)'; a mismatch removes the file (FetchError)."""
    got = sha256_of(path)
    want = (entry.get('sha256') or '').lower()
    if not want:
        return f'not verified: no published checksum is recorded; its sha256 is {got}'
    if got != want:
        os.remove(path)
        raise FetchError(f'{path}: checksum mismatch (sha256 {got}, expected {want}); the file '
                         'was removed. Download it again, or check the mirror')
    return f'sha256 verified ({want[:12]}...)'


def fetch_one(name, entry, root, mirror):
    """Fetch ``name`` (an init_cfg path) per its table ``entry``. Returns (status, message)
    with status 'ok', 'manual' or 'error'."""
    dst = osp.join(root, name)
    os.makedirs(osp.dirname(dst) or '.', exist_ok=True)
    url = f'{mirror.rstrip("/")}/{osp.basename(name)}' if mirror else entry.get('url')
    try:
        if osp.isfile(dst):
            return 'ok', f'{name}: already there, {verify(dst, entry)}'
        if not url:
            return 'manual', (f'{name}: no direct download. Manual step: {entry["manual"]}; '
                              f'save it as {dst}')
        source = 'mirror' if mirror else (
            f'timm {entry["timm"]} (model.safetensors, saved under the configured name)'
            if entry.get('origin') == 'timm' else 'the official release')
        print(f'{name}: downloading from {source}: {url}', file=sys.stderr)
        download(url, dst)
        return 'ok', f'{name}: downloaded, {verify(dst, entry)}'
    except FetchError as err:
        return 'error', f'{name}: {err}'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('configs', nargs='*', help='paper configs (configs/*.py)')
    p.add_argument('--all', action='store_true', help="every paper config's init_cfg file")
    p.add_argument('--mirror', help='fetch URL/<file name> instead of each origin')
    p.add_argument('--root', default=REPO, help='where the configs\' relative paths start '
                                                '(default: the repository)')
    p.add_argument('--table', default=DEFAULT_TABLE,
                   help='the sources table (a Python file defining WEIGHTS)')
    args = p.parse_args(argv)
    if bool(args.configs) == args.all:
        p.error('give CONFIG... or --all')
    return args


def main(argv=None):
    args = parse_args(argv)
    table = runpy.run_path(args.table)['WEIGHTS']
    names = []
    for config in (paper_configs() if args.all else args.configs):
        name = init_cfg_checkpoint(config)
        if name is None:
            print(f'{config}: its backbone has no Pretrained init_cfg: nothing to fetch',
                  file=sys.stderr)
        elif name not in table:
            print(f'{config}: {name} is not in {args.table}; add its source there',
                  file=sys.stderr)
            return 1
        elif name not in names:
            names.append(name)
    results = [fetch_one(n, table[n], args.root, args.mirror) for n in names]
    for status, message in results:
        print(f'[{status}] {message}')
    statuses = {s for s, _ in results}
    return 1 if 'error' in statuses else 2 if 'manual' in statuses else 0


if __name__ == '__main__':
    sys.exit(main())
