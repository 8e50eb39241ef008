"""A griffe extension used only by the documentation build (mkdocs.yml).

jaxgru's docstrings are plain prose with "Args:" / "Returns:" sections, written to read well in
``help()``. Three habits of that prose do not survive Markdown, so this extension rewrites each
docstring before mkdocstrings renders it:

* Sphinx roles such as ``:meth:`GRUConfig.step``` become inline code;
* doctest examples (``>>>`` lines and their output) become fenced ``pycon`` blocks, which
  Markdown would otherwise read as nested block quotes;
* reStructuredText literal blocks (a paragraph ending in ``::``, then an indented block),
  simple tables (rows of ``=====``) and indented lists right under an unindented line that ends
  in ``:`` (other than a section title) become fenced text blocks, which keep their alignment.

The docstrings in the source are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:meth|class|func|mod|attr|data|obj|exc|const):`~?([^`]+)`")
_TABLE_RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")
# Section titles the Google-style parser reads; an indented block under one of them is its items.
_SECTION = re.compile(
    r"^(Args|Arguments|Params|Parameters|Other Parameters|Returns|Yields|Receives|Raises|"
    r"Warns|Warnings|Attributes|Examples?|Notes?|See Also|References|Todo|Functions|Classes|"
    r"Modules|Methods|Type Aliases)\s*:\s*$")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(" "))


def _next_text(lines: list[str], i: int) -> str:
  """The first non-blank line from ``i`` on ("" when there is none)."""
  while i < len(lines) and not lines[i].strip():
    i += 1
  return lines[i] if i < len(lines) else ""


def _fence(lines: list[str], lang: str, indent: int) -> list[str]:
  pad = " " * indent
  body = [line[indent:] if line.strip() else "" for line in lines]
  if lang == "text":
    # Inline-code marks mean nothing in a literal block; drop them, keeping columns aligned.
    body = [re.sub(r"``([^`]+)``( *)", lambda m: m.group(1) + (m.group(2) + "    " if m.group(2)
                                                              else ""), b) for b in body]
  while body and not body[-1]:
    body.pop()
  return [pad + "```" + lang] + [pad + b if b else "" for b in body] + [pad + "```"]


def rewrite(text: str) -> str:
  """The Markdown form of one docstring (see the module docstring)."""
  text = _ROLE.sub(lambda m: "`" + m.group(1) + "`", text)
  lines = text.split("\n")
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    if stripped.startswith(">>>"):
      # A doctest example: runs until the first blank line.
      j = i
      while j < len(lines) and lines[j].strip():
        j += 1
      out += _fence(lines[i:j], "pycon", _indent(line))
      i = j
    elif _TABLE_RULE.match(line):
      # A simple table: three rule lines (top, under the header, bottom).
      j, rules = i, 0
      while j < len(lines) and rules < 3:
        rules += bool(_TABLE_RULE.match(lines[j]))
        j += 1
      out += _fence(lines[i:j], "text", _indent(line))
      i = j
    elif stripped.endswith("::") and not stripped.startswith("..") and i + 1 < len(lines) \
        and not lines[i + 1].strip():
      # A literal block: the indented lines after the blank one.
      out.append(line[: line.rstrip().rfind("::")] + ":")
      base = _indent(line)
      j = i + 1
      while j < len(lines) and not lines[j].strip():
        j += 1
      k = j
      while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
        k += 1
      if k > j:
        out.append("")
        out += _fence(lines[j:k], "text", min(_indent(l) for l in lines[j:k] if l.strip()))
        out.append("")
      i = k
    elif line.endswith(":") and _indent(line) == 0 and not _SECTION.match(line) \
        and _indent(_next_text(lines, i + 1)) > 0:
      # An aligned list under a top-level line: the indented lines that follow it.
      out.append(line)
      j = i + 1
      while j < len(lines) and not lines[j].strip():
        j += 1
      k = j
      while k < len(lines) and lines[k].strip() and _indent(lines[k]) > 0:
        k += 1
      out.append("")
      out += _fence(lines[j:k], "text", min(_indent(l) for l in lines[j:k]))
      i = k
    else:
      out.append(line)
      i += 1
  return "\n".join(out)


class PlainDocstrings(griffe.Extension):
  """Rewrites every loaded docstring with :func:`rewrite`."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      obj.docstring.value = rewrite(obj.docstring.value)
