"""The classes bk makes while converting: a bk mixin put before a user's class in the MRO
(generic path, subclass adapters, transformers' Conv1D, MoE experts, ...).

Each is made once per (factory, args) and pickles as that call: `factory(*args)`, both found by
name. So a whole converted model can be torch.save'd and loaded in another process (where
importing bk_kernels is enough: the load makes the class again), and the made class keeps the
user's class name in reprs and error messages.
"""
import copyreg
import inspect
import sys

_MADE = {}          # (factory, args) -> the class it made
_METACLASSES = {}   # the user class's metaclass -> the metaclass of the classes made from it


def made_class(factory, args, name, bases, attrs):
    """The class `type(name, bases, attrs)`, made once for `factory(*args)` (a module-level
    function whose args pickle: classes, strings, tuples of them)."""
    key = (factory, args)
    if key not in _MADE:
        meta = _metaclass_for(bases)
        made = meta(name, bases, dict(attrs))
        made._bk_made_by = key
        _MADE[key] = made
    return _MADE[key]


def source_of(fn):
    """The source of a function or class, "" where it has none (built at run time, C)."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def names_in_init(cls):
    """The attribute and global names cls.__init__ uses (what it assigns to self among them)."""
    return getattr(cls.__init__, "__code__", compile("", "", "exec")).co_names


def takes(cls, method, names):
    """Whether cls.<method> has exactly these arguments after self: a bk mixin that copies a
    library's forward is made only for the version whose signature it read."""
    return list(inspect.signature(getattr(cls, method)).parameters) == ["self", *names]


def library_class(cls):
    """The transformers class a bk mixin class was made from (the first in its MRO)."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("transformers."))


def library_module(cls):
    """The module of library_class(cls): where transformers keeps the helper functions its
    forward calls (the scans, the mask draws)."""
    return sys.modules[library_class(cls).__module__]


def mixin_class(cls, mixin):
    """cls with the bk mixin before it in the MRO, named as cls (the families' usual made class)."""
    return made_class(mixin_class, (cls, mixin), cls.__name__, (mixin, cls),
                      {"__module__": mixin.__module__, "__qualname__": f"{mixin.__name__}_{cls.__name__}"})


def _metaclass_for(bases):
    winner = type
    for base in bases:  # the most derived metaclass, as class creation requires
        if issubclass(type(base), winner):
            winner = type(base)
    if winner not in _METACLASSES:
        _METACLASSES[winner] = type(f"Made{winner.__name__}", (winner,), {"__module__": __name__})
        copyreg.pickle(_METACLASSES[winner], _reduce_made_class)
    return _METACLASSES[winner]


def _reduce_made_class(cls):
    if "_bk_made_by" not in cls.__dict__:  # a user's subclass of a made class: pickled by its name
        return cls.__qualname__
    factory, args = cls._bk_made_by
    return factory, args
