"""DeltaModel.forward shows the wrapped model's own forward signature to tools that inspect it.

Hugging Face `Trainer` keeps only the dataset columns named in `inspect.signature(model.forward)` (with
the default `remove_unused_columns=True`); a `(*args, **kwargs)` forward matches none ("No columns in the
dataset match the model's forward method signature"). Following the wrapped model, not a fixed list, a
causal LM shows `input_ids, attention_mask, ..., labels`, a sequence classifier adds `token_type_ids`, an
encoder-decoder `decoder_input_ids`, and a column the wrapped model cannot take is dropped, not passed in.
DeltaModel's own keywords (`adapter_names`, `task_ids`) are added as keyword-only parameters.

`model.forward` stays a real bound method (accelerate and torch.compile read `forward.__func__`); only its
function is a copy that carries `__signature__`, made once per wrapped forward and kept while that lives.
"""

from __future__ import annotations

import inspect
import types
import weakref

import torch

OWN_KEYWORDS = ("adapter_names", "task_ids")
_signed: weakref.WeakKeyDictionary[object, types.FunctionType] = weakref.WeakKeyDictionary()


def signature_like(base_forward, own_keywords=OWN_KEYWORDS) -> inspect.Signature:
    """`self`, the (bound) `base_forward`'s parameters, then `own_keywords` keyword-only (None default),
    then the base's `**kwargs` if it has one."""
    params = list(inspect.signature(base_forward).parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    own = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
           for name in own_keywords if name not in taken]
    plain = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([self_param, *plain, *own, *var_keyword])


class SignedForward:
    """Descriptor for DeltaModel.forward: on an instance, the method bound with the signature of
    `instance.model.forward` (see the module docstring); on the class, the plain function."""

    def __init__(self, function) -> None:
        self.function = function
        self.__doc__ = function.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self.function
        base = obj.__dict__.get("_modules", {}).get("model")
        if base is None or torch.compiler.is_compiling():  # still being built; or traced, where none reads it
            return types.MethodType(self.function, obj)
        base_forward = base.forward
        key = getattr(base_forward, "__func__", base_forward)
        try:
            function = _signed.get(key)
        except TypeError:  # a forward that cannot be weakly referenced: sign it on every access
            function, key = None, None
        if function is None:
            original = self.function
            function = types.FunctionType(original.__code__, original.__globals__, original.__name__,
                                          original.__defaults__, original.__closure__)
            function.__kwdefaults__ = original.__kwdefaults__
            function.__dict__.update(original.__dict__)
            function.__qualname__, function.__module__ = original.__qualname__, original.__module__
            function.__signature__ = signature_like(base_forward)
            if key is not None:
                _signed[key] = function
        return types.MethodType(function, obj)
