"""Every public function, class and method of perk_fast carries a docstring."""

import importlib
import inspect
import pkgutil

import perk_fast


def _public_objects():
    for info in pkgutil.walk_packages(perk_fast.__path__, "perk_fast."):
        if info.name.endswith("__main__"):  # importing it runs the command line
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != mod.__name__:
                continue  # imported from elsewhere: checked where it is defined
            yield f"{mod.__name__}.{name}", obj
            if inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    if not meth_name.startswith("_") and inspect.isfunction(meth):
                        yield f"{mod.__name__}.{name}.{meth_name}", meth


def test_the_walk_finds_the_public_api():
    names = {name for name, _ in _public_objects()}
    assert {"perk_fast.encode.encode", "perk_fast.train.meta_train", "perk_fast.runs.RunLog.metrics"} <= names


def _documented(obj) -> bool:
    doc = (obj.__doc__ or "").strip()
    # a dataclass or NamedTuple without a docstring gets its signature as __doc__
    return bool(doc) and not (inspect.isclass(obj) and doc.startswith(obj.__name__ + "("))


def test_every_public_function_class_and_method_has_a_docstring():
    missing = [name for name, obj in _public_objects() if not _documented(obj)]
    assert missing == []
