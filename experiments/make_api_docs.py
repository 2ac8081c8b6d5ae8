"""Writes docs/api.md from the docstrings of the names `pr2_jax` exports.

    python -m experiments.make_api_docs            # rewrite docs/api.md
    python -m experiments.make_api_docs --check    # exit 1 if docs/api.md is stale
"""

import ast
import dataclasses
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize

import pr2_jax

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "api.md")
HEADER = """# API

Everything below is importable as `import pr2_jax as p2; p2.<name>`. This page is generated
from the docstrings by `python -m experiments.make_api_docs` (a test checks it is current).
"""


def public_names() -> list[str]:
  return sorted(n for n in dir(pr2_jax) if not n.startswith("_") and n not in ("viz",)
                and not inspect.ismodule(getattr(pr2_jax, n)))


def field_table(cls) -> str:
  """A dataclass's or NamedTuple's fields with the comments they carry in the source (the one
  place their shapes and meanings are written), as a markdown table; "" for other objects.

  A field's meaning: comment lines right above it at its indent, its trailing comment, and
  comment lines below that are indented deeper (a trailing comment's continuation). Fields
  the class's own source does not declare (inherited: flax's parent and name) are left out.
  """
  if not inspect.isclass(cls):
    return ""
  if dataclasses.is_dataclass(cls):
    names = [f.name for f in dataclasses.fields(cls)]
  else:
    names = list(getattr(cls, "_fields", ()))
  if not names:
    return ""
  source = textwrap.dedent(inspect.getsource(cls))
  lines = source.splitlines()
  comment = {tok.start[0]: tok.string.lstrip("#").strip()  # 1-based line -> its comment
             for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT}
  only_comment = lambda i: 1 <= i <= len(lines) and lines[i - 1].lstrip().startswith("#")
  indent = lambda i: len(lines[i - 1]) - len(lines[i - 1].lstrip())
  meaning = {}
  for node in ast.parse(source).body[0].body:
    if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and node.target.id in names):
      continue
    above, below = node.lineno - 1, node.end_lineno + 1
    while only_comment(above) and indent(above) == node.col_offset:
      above -= 1
    text = [comment[i] for i in range(above + 1, node.end_lineno + 1) if i in comment]
    while node.end_lineno in comment and only_comment(below) and indent(below) > node.col_offset:
      text.append(comment[below])
      below += 1
    meaning[node.target.id] = " ".join(text)
  rows = "".join(f"| `{n}` | {meaning[n].replace('|', '/')} |\n" for n in names if n in meaning)
  return "\n| field | meaning |\n|---|---|\n" + rows if rows else ""


def signature(obj, drop_self: bool = False) -> str:
  try:
    sig = inspect.signature(obj)
  except (TypeError, ValueError):
    return "(...)"
  if drop_self:
    sig = sig.replace(parameters=list(sig.parameters.values())[1:])
  # Default values that print an object id would make the page differ run to run.
  text = re.sub(r" at 0x[0-9a-f]+", "", str(sig))
  return re.sub(r"ForwardRef\(('[^']*')\)", r"\1", text)


def method_entries(cls) -> str:
  """The documented methods a class's own body defines (public ones and `__call__`, where a
  Flax module's forward arguments are), each under the class; "" for other objects."""
  if not inspect.isclass(cls):
    return ""
  out = []
  for name, fn in vars(cls).items():
    fn = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
    if not (inspect.isfunction(fn) and (name == "__call__" or not name.startswith("_"))
            and fn.__qualname__ == f"{cls.__qualname__}.{name}" and inspect.getdoc(fn)):
      continue  # private, generated (a dataclass's replace) or undocumented
    drop_self = not isinstance(vars(cls)[name], staticmethod)
    out.append(f"\n#### `{cls.__name__}.{name}`\n\n```python\ndef {name}"
               f"{signature(fn, drop_self)}\n```\n\n{inspect.getdoc(fn)}\n")
  return "".join(out)


def entry(name: str) -> str:
  obj = getattr(pr2_jax, name)
  if callable(obj):
    sig = signature(obj)
    kind = "class" if inspect.isclass(obj) else "def"
    head = f"### `{name}`\n\n```python\n{kind} {name}{sig}\n```\n"
    module = getattr(obj, "__module__", "")
  else:
    head = f"### `{name}`\n\n`{name} = {obj!r}`\n"
    module = ""
  doc = inspect.getdoc(obj) if callable(obj) else ""
  if doc and doc.startswith(f"{name}("):  # the signature dataclasses write as a docstring
    doc = ""
  where = f"\n*Defined in `{module}`.*\n" if module.startswith("pr2_jax") else ""
  return head + (f"\n{doc}\n" if doc else "") + field_table(obj) + method_entries(obj) + where


def render() -> str:
  return HEADER + "\n" + "\n".join(entry(n) for n in public_names())


def main(argv):
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):  # asking is not a failure
    print(__doc__.strip())
    return 0
  unknown = [a for a in argv[1:] if a != "--check"]
  if unknown:  # a typo must not rewrite the file
    print(f"error: unknown argument(s) {' '.join(unknown)}; usage:\n{__doc__.strip()}",
          file=sys.stderr)
    return 2
  text = render()
  if "--check" in argv:
    current = open(OUT).read() if os.path.exists(OUT) else ""
    if current != text:
      print(f"{OUT} is stale: run python -m experiments.make_api_docs", file=sys.stderr)
      return 1
    return 0
  with open(OUT, "w") as f:
    f.write(text)
  print(f"wrote {OUT} ({len(public_names())} names)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
