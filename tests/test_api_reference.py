"""docs/api.md stays in step with the code.

Convention parsed here: an API entry is a Markdown heading (``##`` to ``#####``) whose whole text is
one code span, ``qualified.name`` optionally followed by a signature, optionally prefixed by
``class``::

    ### `mettaformat.save_file(tensors: Mapping[str, torch.Tensor], ..., durable: bool = False) -> None`
    ### `class mettaformat.store.LatestN(n: int)`
    #### `mettaformat.MettaAgent.save(path: str | os.PathLike[str], *, ...) -> Path | None`
    ### `mettaformat.MFMT_MAGIC`                       (no signature: constants, properties, enums)

A signature is compared with ``inspect.signature`` of the object the name resolves to: parameter
names, kinds (positional-only / positional-or-keyword / ``*args`` / keyword-only / ``**kwargs``),
which parameters have defaults, default values when both sides are literals, annotations as
written in the code, and the return annotation when the heading gives one. ``self`` is not
written; ``<factory>`` stands for a dataclass default factory. Exception entries are followed by a
``Bases: `A`, `B`.`` line, compared with ``__bases__``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import mettaformat
import mettaformat.errors
import mettaformat.store

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
HEADING = re.compile(r"^#{2,5} `(?P<cls>class )?(?P<name>[A-Za-z_][\w.]*)(?P<sig>\(.*\))?(?P<ret> -> .+)?`\s*$")
_MISSING = object()


@dataclass(frozen=True)
class Source:
    """A default written as an expression that is not a literal (``DEFAULT_LIMITS``): not compared."""

    text: str


@dataclass(frozen=True)
class Entry:
    name: str
    is_class: bool
    signature: str | None  # "(...)" or None
    returns: str | None  # annotation text after "->", or None
    line: int
    bases: tuple[str, ...] | None


def parse_entries(text: str) -> list[Entry]:
    lines = text.splitlines()
    entries = []
    for i, line in enumerate(lines):
        m = HEADING.match(line)
        if m is None:
            continue
        bases = None
        for follow in lines[i + 1 : i + 4]:
            b = re.match(r"^Bases: (.*)\.$", follow)
            if b:
                bases = tuple(re.findall(r"`(\w+)`", b.group(1)))
                break
        ret = m.group("ret")
        entries.append(Entry(m.group("name"), bool(m.group("cls")), m.group("sig"),
                             ret[len(" -> "):] if ret else None, i + 1, bases))
    return entries


ENTRIES = parse_entries(API_MD.read_text())


def resolve(dotted: str) -> Any:
    """Import the longest module prefix of ``dotted``, then walk attributes (raw, so properties
    and classmethods come back as descriptors)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if inspect.isclass(obj) and attr in _class_dict(obj):
                obj = _class_dict(obj)[attr]
            else:
                obj = getattr(obj, attr)
        return obj
    raise LookupError(dotted)


def _class_dict(cls: type) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass))
    return merged


def code_signature(obj: Any) -> inspect.Signature:
    if isinstance(obj, (classmethod, staticmethod)):
        sig = inspect.signature(obj.__func__)
        params = list(sig.parameters.values())
        return sig.replace(parameters=params[1:] if isinstance(obj, classmethod) else params)
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())
    if inspect.isfunction(obj) and params and params[0].name == "self":
        sig = sig.replace(parameters=params[1:])
    return sig


def normalise_annotation(annotation: Any) -> str | None:
    if annotation is inspect.Parameter.empty or annotation is inspect.Signature.empty:
        return None
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return ast.unparse(ast.parse(text, mode="eval"))


@dataclass(frozen=True)
class DocParam:
    name: str
    kind: inspect._ParameterKind
    annotation: str | None
    default: Any  # _MISSING, dataclasses.MISSING for <factory>, a literal value, or a Source


def doc_parameters(signature: str, returns: str | None) -> tuple[list[DocParam], str | None]:
    source = f"def _f{signature.replace('<factory>', '...')}: pass"
    fn = ast.parse(source).body[0]
    assert isinstance(fn, ast.FunctionDef)
    a = fn.args
    out: list[DocParam] = []

    def ann(node: ast.expr | None) -> str | None:
        return ast.unparse(node) if node is not None else None

    def default(node: ast.expr | None) -> Any:
        if node is None:
            return _MISSING
        if isinstance(node, ast.Constant) and node.value is Ellipsis:
            return dataclasses.MISSING  # <factory>
        try:
            return ast.literal_eval(node)
        except ValueError:
            return Source(ast.unparse(node))

    positional = [*a.posonlyargs, *a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (p, d) in enumerate(zip(positional, defaults, strict=True)):
        kind = inspect.Parameter.POSITIONAL_ONLY if i < len(a.posonlyargs) else inspect.Parameter.POSITIONAL_OR_KEYWORD
        out.append(DocParam(p.arg, kind, ann(p.annotation), default(d)))
    if a.vararg is not None:
        out.append(DocParam(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL, ann(a.vararg.annotation), _MISSING))
    for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        out.append(DocParam(p.arg, inspect.Parameter.KEYWORD_ONLY, ann(p.annotation), default(d)))
    if a.kwarg is not None:
        out.append(DocParam(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD, ann(a.kwarg.annotation), _MISSING))
    ret = ast.unparse(ast.parse(returns, mode="eval")) if returns else None
    return out, ret


def _literal(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes, tuple))


# -- coverage ----------------------------------------------------------------------------------------
def documented() -> dict[str, Entry]:
    return {e.name: e for e in ENTRIES}


@pytest.mark.parametrize("name", mettaformat.__all__)
def test_top_level_name_documented(name: str) -> None:
    assert f"mettaformat.{name}" in documented(), f"docs/api.md has no entry for mettaformat.{name}"


@pytest.mark.parametrize("name", mettaformat.store.__all__)
def test_store_name_documented(name: str) -> None:
    target = getattr(mettaformat.store, name)
    candidates = [e for e in ENTRIES if e.name.rsplit(".", 1)[-1] == name]
    assert any(resolve(e.name) is target for e in candidates), f"docs/api.md has no entry for mettaformat.store.{name}"


@pytest.mark.parametrize("name", mettaformat.errors.__all__)
def test_error_documented_with_bases(name: str) -> None:
    entry = documented().get(f"mettaformat.errors.{name}")
    assert entry is not None, f"docs/api.md has no entry for mettaformat.errors.{name}"
    assert entry.is_class and entry.signature is not None
    cls = getattr(mettaformat.errors, name)
    assert entry.bases == tuple(b.__name__ for b in cls.__bases__), f"line {entry.line}: Bases: line is wrong"


def test_error_tree_in_docs_matches_code() -> None:
    """Every exception class of mettaformat.errors appears in the tree diagram (```text block)."""
    text = API_MD.read_text()
    tree = text[text.index("```text\nMettaFormatError"):]
    tree = tree[: tree.index("\n```\n")]
    for name in mettaformat.errors.__all__:
        assert re.search(rf"\b{name}\b", tree), name


@pytest.mark.parametrize(
    "name",
    [
        "mettaformat.migrations.Migration",
        "mettaformat.migrations.register_migration",
        "mettaformat.convert.convert",
        "mettaformat.migrate.migrate",
        "mettaformat.legacy.import_legacy",
        "mettaformat.legacy.export.export_v1",
        "mettaformat.legacy.export.export_v2",
        "mettaformat.legacy.export.export_v2_full",
        "mettaformat.legacy.export.export_state_dict",
        "mettaformat.legacy.export.export_safetensors",
        "mettaformat.validate.validate",
        "mettaformat.repair.repair",
        "mettaformat.diff.diff_checkpoints",
    ],
)
def test_module_function_documented(name: str) -> None:
    entry = documented().get(name)
    assert entry is not None and entry.signature is not None, f"docs/api.md has no signature entry for {name}"


@pytest.mark.parametrize("cls_name", ["MettaAgent", "PolicyStore", "LazyCheckpoint"])
def test_public_methods_documented(cls_name: str) -> None:
    cls = getattr(mettaformat, cls_name)
    inherited = set(dir(torch.nn.Module)) if issubclass(cls, torch.nn.Module) else set()
    public = {n for n, v in vars(cls).items() if not n.startswith("_") and n not in inherited
              and (callable(v) or isinstance(v, (property, classmethod, staticmethod)))}
    missing = sorted(n for n in public if f"mettaformat.{cls_name}.{n}" not in documented())
    assert not missing, f"undocumented {cls_name} members: {missing}"


def test_cli_reference_lists_every_subcommand() -> None:
    from mettaformat.cli.main import build_parser

    text = API_MD.read_text()
    section = text[text.index("## 11. Command line"):]
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in action.choices.items():
        assert f"| `{command}" in section, f"CLI table lacks {command}"
        for action in parser._actions:
            for option in action.option_strings:
                if option in ("-h", "--help", "--debug", "-q", "--quiet", "-v", "--verbose"):
                    continue
                assert option in section, f"CLI reference lacks {command} {option}"


# -- signatures ----------------------------------------------------------------------------------------
SIGNED = [e for e in ENTRIES if e.signature is not None]


def test_entries_were_parsed() -> None:
    assert len(SIGNED) > 60, "the heading convention changed? few signatures parsed from docs/api.md"


@pytest.mark.parametrize("entry", SIGNED, ids=lambda e: e.name)
def test_signature_matches_code(entry: Entry) -> None:
    obj = resolve(entry.name)
    assert entry.is_class == inspect.isclass(obj), f"line {entry.line}: 'class' prefix does not match the object"
    sig = code_signature(obj)
    assert entry.signature is not None
    doc_params, doc_ret = doc_parameters(entry.signature, entry.returns)
    code_params = list(sig.parameters.values())
    where = f"docs/api.md line {entry.line} ({entry.name})"
    assert [p.name for p in doc_params] == [p.name for p in code_params], where
    for d, c in zip(doc_params, code_params, strict=True):
        assert d.kind == c.kind, f"{where}: {d.name} is {d.kind.description}, code says {c.kind.description}"
        assert (d.default is _MISSING) == (c.default is inspect.Parameter.empty), f"{where}: default of {d.name}"
        code_factory = repr(c.default) == "<factory>"
        assert (d.default is dataclasses.MISSING) == code_factory, f"{where}: <factory> default of {d.name}"
        if d.default is not _MISSING and not isinstance(d.default, Source) and _literal(c.default):
            assert d.default == c.default and type(d.default) is type(c.default), (
                f"{where}: default of {d.name} is {d.default!r}, code says {c.default!r}"
            )
        assert d.annotation == normalise_annotation(c.annotation), f"{where}: annotation of {d.name}"
    if not entry.is_class:
        assert doc_ret == normalise_annotation(sig.return_annotation), f"{where}: return annotation"
    else:
        assert doc_ret is None, f"{where}: a class entry has no return annotation"


GOOD_SAVE_FILE = ("(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: Mapping[str, Any] "
                  "| None = None, compression: Compression | Codec = 'raw', level: int | str | None = None, "
                  "durable: bool = False, base: str | os.PathLike[str] | LazyCheckpoint | None = None)")


@pytest.mark.parametrize(
    ("name", "is_class", "signature", "returns"),
    [
        ("mettaformat.save_file", False, GOOD_SAVE_FILE.replace("Codec = 'raw'", "Codec = 'none'"), "None"),
        ("mettaformat.save_file", False, GOOD_SAVE_FILE.replace("path: str | os.PathLike[str]", "path: str"), "None"),
        ("mettaformat.save_file", False, GOOD_SAVE_FILE.replace("*, ", ""), "None"),
        ("mettaformat.save_file", False, GOOD_SAVE_FILE.replace(", durable: bool = False", ""), "None"),
        ("mettaformat.save_file", False, GOOD_SAVE_FILE, "bytes"),
        ("mettaformat.save_file", True, GOOD_SAVE_FILE, None),
        ("mettaformat.store.LatestN", True, "(n: int = 1)", None),
        ("mettaformat.TrainingState", True, "(optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] "
         "| None = None, trainer_state: dict[str, Any] = None, rng: dict[str, Any] = <factory>)", None),
        ("mettaformat.PolicyStore.prune", False, "(policy: RetentionPolicy, uri: str | os.PathLike[str] | None = None, "
         "*, dry_run: bool = False, temp_grace_s: float = 3600, allow_delete_all: bool = False)", "PruneReport"),
    ],
    ids=["default", "annotation", "kind", "missing-param", "return", "class-prefix", "spurious-default", "factory",
         "default-type"],
)
def test_checker_catches_drift(name: str, is_class: bool, signature: str, returns: str | None) -> None:
    """The checker itself: each kind of drift between a heading and the code is noticed."""
    good = Entry("mettaformat.save_file", False, GOOD_SAVE_FILE, "None", 0, None)
    test_signature_matches_code(good)
    with pytest.raises(AssertionError):
        test_signature_matches_code(Entry(name, is_class, signature, returns, 0, None))


# -- documented behaviour that the code contradicts ------------------------------------------------------
def test_load_for_training_of_a_policy_only_file_has_empty_training_state(tmp_path: Path) -> None:
    mettaformat.MettaAgent(torch.nn.Linear(2, 2), model_type="api-ref-linear").save(tmp_path / "policy.mfmt")
    agent = mettaformat.MettaAgent.load_for_training(tmp_path / "policy.mfmt", model=torch.nn.Linear(2, 2))
    assert agent.training_state is not None and agent.trainer_state == {}
    assert "empty" in (mettaformat.MettaAgent.load_for_training.__doc__ or "")
