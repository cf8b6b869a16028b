"""The one compare-and-report step of every loader: which tensors of a converted state dict
match the model, which are new, ignored, missing, unexpected or of another shape, and the
one-screen report that says so."""
import fnmatch
import re
from collections import OrderedDict
from dataclasses import dataclass, field


def match_any(key, patterns):
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


@dataclass
class Comparison:
    """Keys of a converted state dict against a model's own (see :func:`compare_state_dicts`)."""
    matched: list = field(default_factory=list)
    new: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)     # (key, file shape, model shape)

    @property
    def problems(self):
        """Anything that would leave the model partly random or drop tensors of the file."""
        return bool(self.missing or self.unexpected or self.mismatched)


def compare_state_dicts(converted, own, ignored_patterns=(), new_patterns=()):
    """Sort the keys of ``converted`` (already in the model's layout) against ``own`` (the
    model's state dict).

    ``ignored_patterns`` (fnmatch): tensors of the file the model has no place for on purpose
    (a classification head, the official index buffers); ``new_patterns``: model tensors a file
    of that kind cannot provide (a classification file has no output norms). A model tensor
    ending in ``num_batches_tracked`` is never required (BatchNorm bookkeeping).
    """
    out = Comparison()
    for k, v in converted.items():
        if k not in own:
            (out.ignored if match_any(k, ignored_patterns) else out.unexpected).append(k)
        elif v.shape != own[k].shape:
            out.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            out.matched.append(k)
    for k in own:
        if k not in converted:
            optional = k.endswith('num_batches_tracked') or match_any(k, new_patterns)
            (out.new if optional else out.missing).append(k)
    return out


def summarise(keys, limit=6):
    """Keys grouped with their block indices collapsed, so a report stays on one screen."""
    groups = OrderedDict()
    for k in sorted(keys):
        g = re.sub(r'\.\d+\.', '.*.', k)
        groups[g] = groups.get(g, 0) + 1
    items = [f'{g} (x{n})' if n > 1 else g for g, n in groups.items()]
    more = '' if len(items) <= limit else f' ... (+{len(items) - limit} more)'
    return ', '.join(items[:limit]) + more


def names(keys, limit=12):
    """Every name when there are few (an error must say exactly what is wrong), else groups."""
    keys = sorted(keys)
    return ', '.join(keys) if len(keys) <= limit else summarise(keys, limit)


def report_text(header, matched, comparison, rows=('new', 'ignored', 'missing', 'unexpected'),
                exact=(), mismatch_limit=8):
    """The load report: a header, ``matched``, one line per row of ``comparison`` (the rows in
    ``exact`` list every name when there are few), and the shape mismatches (file vs model)."""
    lines = [header, f'  matched   : {matched}']
    for label in rows:
        keys = getattr(comparison, label)
        fmt = names if label in exact else summarise
        lines.append(f'  {label:<10}: {len(keys)}' + (f'  ({fmt(keys)})' if keys else ''))
    bad = comparison.mismatched
    if bad:
        lines.append(f'  shape mismatch: {len(bad)}  (' + ', '.join(
            f'{k}: file {a} vs model {b}' for k, a, b in bad[:mismatch_limit]) +
            (' ...' if len(bad) > mismatch_limit else '') + ')')
    return '\n'.join(lines)
