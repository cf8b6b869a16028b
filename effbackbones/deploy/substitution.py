"""Export stand-ins: modules traced in place of a model's own, on a copy of the model.

A runtime's table (:mod:`.runtimes`) maps a module type to a factory ``module -> stand-in or
None``; :func:`substitute` applies it to every sub-module of exactly that type. A stand-in is
usually a subclass of the module's class that overrides one step of its forward and holds the
very same parameters, buffers and children (:func:`adopt`), so the traced graph changes only
where the runtime runs another form faster; the values stay the same.

A stand-in reports whether the traced forward took its own form (:attr:`RuntimeForm.applied`):
a file is tagged as tuned for a runtime only where one did.
"""


class RuntimeForm:
    """Mixin of a runtime's stand-ins: ``applied`` is set by the forward that takes the
    runtime's own graph form (it may keep the model's form for some shapes)."""

    applied = False

    def mark_applied(self):
        self.applied = True


def adopt(cls, module):
    """An instance of ``cls`` (a subclass of ``type(module)``) that shares ``module``'s
    parameters, buffers, children and attributes: meant for a copy of the model that is
    traced and thrown away (``module`` and the stand-in alias the same tensors)."""
    if not issubclass(cls, type(module)):
        raise TypeError(f'{cls.__name__} is no stand-in for {type(module).__name__}')
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    new.applied = False
    return new


def substitute(root, table):
    """Replace every sub-module of ``root`` (``root`` included) whose exact type is a key of
    ``table`` by what the factory returns for it (``None``: kept). Children of replaced
    modules are visited too. Returns ``(root, stand_ins)``: the root may be replaced itself."""
    made = []
    if not table:
        return root, made
    for name, module in list(root.named_modules()):
        make = table.get(type(module))
        new = make(module) if make is not None else None
        if new is None:
            continue
        made.append(new)
        if not name:
            root = new
            continue
        parent, _, attr = name.rpartition('.')
        setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root, made


def replace_modules(root, make):
    """``make(module)`` -> replacement or None, applied to every sub-module below ``root`` (not
    ``root`` itself); returns ``root``."""
    for name, module in list(root.named_modules()):
        new = make(module) if name else None
        if new is not None:
            parent, _, attr = name.rpartition('.')
            setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root


__all__ = ['RuntimeForm', 'adopt', 'substitute', 'replace_modules']
