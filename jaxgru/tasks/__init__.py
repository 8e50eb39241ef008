"""The tasks, each in a folder of its own laid out like the Flax examples.

* :mod:`jaxgru.tasks.addition`: binary addition of integers of any length.
* :mod:`jaxgru.tasks.classify`: sequence classification, synthetic sequences or IMDB reviews.

Each holds ``models.py`` (the model), ``input_pipeline.py`` (the data), ``train.py`` (the config,
training and evaluation with :mod:`jaxgru.training`) and ``predict.py`` (using a trained run).
A task reads no flags: ``run.py`` builds its config. Shapes carry their names as a suffix of one
capital letter per axis: T time, B batch, I input features, H hidden, F output features, N models,
C chunk, K classes or vocabulary rows, L layers times directions (``x_BTI``, ``ids_BT``,
``lengths_B``). Needs the ``train`` extra.
"""

from __future__ import annotations
