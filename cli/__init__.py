"""run.py's tasks: each module defines its task's flags beside the config built from them.

Entry-point code, not part of the jaxgru package (only entry points read flags):

* :mod:`cli.common`: the flags every task shares (model, optimizer, steps, platform, dtype,
  multi-host, ...), :class:`~cli.common.UsageError` and the helpers that turn flags into configs
  and check work directories.
* :mod:`cli.addition` (``--task=addition``), :mod:`cli.classify` (``--task=classify|imdb``):
  each has ``run(mode: str, workdir: str) -> int``, the exit status; a user mistake raises
  ``UsageError``. ``run.py`` picks the module by ``--task`` from its table.
"""
