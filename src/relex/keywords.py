"""Public functions that take option groups as plain keyword arguments (`@takes`)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import fields

from relex.options import OptionGroup


def takes(*groups: type[OptionGroup] | tuple, required: tuple[str, ...] = ()):
    """Let a public function take its option groups' fields as keyword arguments.

    groups: option group classes, or (class, [field names]) for the part of a group that the
    function uses. The decorated function is written as fn(*, inputs, fit, ..., own keywords)
    and receives the filled groups; callers pass plain keywords (run_dir may come first, by
    position), as documented in the signature and docstring this sets. Unknown keywords are a
    TypeError, as for any function; `required` names fields without a default."""
    spec = [(g, g.names()) if isinstance(g, type) else (g[0], list(g[1])) for g in groups]
    names = {n: g for g, used in spec for n in used}

    def wrap(fn):
        sig = inspect.signature(fn)
        keys = {g.key for g, _ in spec}
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in sig.parameters.values() if p.name not in keys]

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if args:
                if len(args) > 1 or "run_dir" in kwargs or "run_dir" not in names:
                    raise TypeError(f"{fn.__name__}() takes at most run_dir by position")
                kwargs["run_dir"] = args[0]
            missing = [n for n in required if kwargs.get(n) is None]
            if missing:
                raise TypeError(f"{fn.__name__}() missing required keyword argument "
                                f"'{missing[0]}'")
            filled: dict[str, dict] = {g.key: {} for g, _ in spec}
            rest = {}
            for k, v in kwargs.items():
                if k in names:
                    filled[names[k].key][k] = v
                elif k in sig.parameters and k not in keys:
                    rest[k] = v
                else:
                    raise TypeError(f"{fn.__name__}() got an unexpected keyword argument '{k}'")
            return fn(**{g.key: g(**filled[g.key]) for g, _ in spec}, **rest)

        params = []
        if "run_dir" in names:
            params.append(inspect.Parameter("run_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=None))
        docs = []
        for g, used in spec:
            for f in fields(g):
                if f.name not in used:
                    continue
                docs.append(g.doc_line(f))
                if f.name != "run_dir":
                    params.append(inspect.Parameter(
                        f.name, inspect.Parameter.KEYWORD_ONLY,
                        default=inspect.Parameter.empty if f.name in required else f.default))
        call.__signature__ = sig.replace(parameters=params + own)
        call.__doc__ = (inspect.cleandoc(fn.__doc__ or "") + "\n\nOptions (declared in "
                        "relex.options):\n" + "\n".join(docs) + "\n")
        return call
    return wrap
