"""IMDB input pipeline: the Large Movie Review Dataset, read, cleaned, tokenized and encoded.

Reads the official layout (Maas et al., 2011), either extracted or straight from the ``.tar.gz``
as distributed (streamed member by member, never extracted to disk)::

  aclImdb/{train,test}/{pos,neg}/<id>_<stars>.txt

Anything else in the archive (``train/unsup``, ``*.feat``, ``urls_*.txt``) is skipped. Reviews
are sorted by (split, label, file name), so an archive and its extracted folder give identical
data. Labels are 0 for ``neg`` and 1 for ``pos``.

A review becomes word ids in four steps: :func:`clean_text` (lower case, ``<br />`` and other
tags to spaces), :func:`tokenize` (words, with inner apostrophes kept, plus ``!`` and ``?``; other
punctuation dropped), :func:`build_vocab` (the most frequent words of the TRAINING split only,
after the reserved ids 0 = padding and 1 = out of vocabulary), and :func:`encode` (truncation to
``max_length`` words, zero padding, true lengths kept).

Every problem with the input raises :class:`DataError` with a message naming the path and what
is wrong; a corrupt or truncated archive is reported, never half-read.
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import gzip
import lzma
import os
import re
import tarfile
import zlib
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

SPLITS = ("train", "test")
LABELS = ("neg", "pos")  # the label id is the index
PAD, OOV = "<pad>", "<oov>"
PAD_ID, OOV_ID = 0, 1
RESERVED = (PAD, OOV)
TRUNCATIONS = ("head", "tail", "head_tail")

LAYOUT = "aclImdb/{train,test}/{pos,neg}/*.txt"
_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/([^/]+\.txt)$")


class DataError(ValueError):
  """Unusable input data: a missing path, a wrong layout, an unreadable review or archive."""


@dataclasses.dataclass(frozen=True)
class Reviews:
  """The reviews of one split, in (label, file name) order.

  Attributes:
    texts: the raw review texts.
    labels: (N,) int32, 0 = negative, 1 = positive.
    names: the file names, ``<label>/<id>_<stars>.txt``.
  """
  texts: tuple[str, ...]
  labels: np.ndarray
  names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, index: Sequence[int]) -> "Reviews":
    """The reviews at ``index``, in that order."""
    index = np.asarray(index, np.int64)
    return Reviews(tuple(self.texts[i] for i in index), self.labels[index],
                   tuple(self.names[i] for i in index))


# -- reading ---------------------------------------------------------------------------------------


def _decode(data: bytes, where: str) -> str:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
                    f"{e.start})") from None
  if not text.strip():
    raise DataError(f"{where}: empty review file")
  return text


def _find_root(path: str) -> str:
  """The folder holding ``train/`` and ``test/``: ``path`` itself or ``path/aclImdb``."""
  for root in (path, os.path.join(path, "aclImdb")):
    if all(os.path.isdir(os.path.join(root, s, l)) for s in SPLITS for l in LABELS):
      return root
  missing = [f"{s}/{l}" for s in SPLITS for l in LABELS
             if not os.path.isdir(os.path.join(path, s, l))
             and not os.path.isdir(os.path.join(path, "aclImdb", s, l))]
  raise DataError(f"{path}: not the IMDB layout {LAYOUT} (missing {', '.join(missing)})")


def _read_folder(path: str, splits: Sequence[str]) -> Iterator[tuple[str, str, str, str]]:
  root = _find_root(path)
  for split in splits:
    for label in LABELS:
      folder = os.path.join(root, split, label)
      for name in sorted(os.listdir(folder)):
        if not name.endswith(".txt"):
          continue
        file = os.path.join(folder, name)
        with open(file, "rb") as f:
          yield split, label, name, _decode(f.read(), file)


class _StrictTarInfo(tarfile.TarInfo):
  """Fails on a missing, short or garbled header where ``tarfile`` would quietly stop.

  ``TarFile.next`` treats such a header after the first as the end of the archive, so a
  truncated or damaged archive would otherwise read as a shorter, valid one. Only a zero block
  (``EOFHeaderError``), the end-of-archive marker, ends the archive now.
  """

  @classmethod
  def fromtarfile(cls, tar):
    try:
      return super().fromtarfile(tar)
    except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError,
            tarfile.InvalidHeaderError) as e:
      raise tarfile.ReadError(f"bad or missing header at byte {tar.offset}: {e}") from None


_MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def _read_archive(path: str, splits: Sequence[str]) -> Iterator[tuple[str, str, str, str]]:
  # The archive is read front to back once, as a stream. Decompression goes through gzip / bz2 /
  # lzma, which check the stream's CRC and its end-of-stream marker once everything has been
  # read, hence the draining at the end: a damaged archive fails loudly instead of yielding a
  # prefix of the data or altered text.
  try:
    with open(path, "rb") as raw:
      head = raw.read(6)
    opener = next((o for magic, o in _MAGIC if head.startswith(magic)), None)
    with (opener or open)(path, "rb") as stream:
      with tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo) as archive:
        for member in archive:
          match = _MEMBER.search(member.name)
          if not member.isfile() or match is None or match.group(1) not in splits:
            continue
          f = archive.extractfile(member)
          data = f.read() if f is not None else b""
          if len(data) != member.size:
            raise EOFError(f"{member.name} ends after {len(data)} of {member.size} bytes")
          yield (match.group(1), match.group(2), match.group(3),
                 _decode(data, f"{path}:{member.name}"))
      while stream.read(1 << 20):
        pass
  except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
    raise DataError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e})") from None


def load_reviews(path: str, splits: Sequence[str] = SPLITS) -> dict[str, Reviews]:
  """Reads the labeled reviews of ``splits`` from a folder or a tar archive.

  Args:
    path: the ``aclImdb`` folder, a folder containing it, or a (``.tar``, ``.tar.gz``, ...)
      archive of it as distributed.
    splits: which of ``"train"`` and ``"test"`` to read.

  Returns:
    ``{split: Reviews}``, each sorted by (label, file name).

  Raises:
    DataError: the path is missing, is not the IMDB layout (a split or label folder is missing
      or has no reviews), a review is empty or not UTF-8, or the archive is corrupt or truncated.
  """
  if not path:
    raise DataError("no IMDB path given")
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file or directory")
  if os.path.isdir(path):
    records = _read_folder(path, splits)
  elif os.path.isfile(path):
    records = _read_archive(path, splits)
  else:
    raise DataError(f"{path}: neither a folder nor a tar archive")
  grouped: dict[tuple[str, str], list[tuple[str, str]]] = collections.defaultdict(list)
  for split, label, name, text in records:
    grouped[split, label].append((name, text))
  missing = [f"{s}/{l}" for s in splits for l in LABELS if not grouped[s, l]]
  if missing:
    raise DataError(f"{path}: not the IMDB layout {LAYOUT} (no reviews in "
                    f"{', '.join(missing)})")
  out = {}
  for split in splits:
    texts, labels, names = [], [], []
    for label_id, label in enumerate(LABELS):
      for name, text in sorted(grouped[split, label]):
        texts.append(text)
        labels.append(label_id)
        names.append(f"{label}/{name}")
    out[split] = Reviews(tuple(texts), np.asarray(labels, np.int32), tuple(names))
  return out


def subsample(reviews: Reviews, size: int, seed: int) -> Reviews:
  """A class-balanced random subset of ``size`` reviews (all of them when ``size`` >= N)."""
  if size >= len(reviews):
    return reviews
  rng = np.random.default_rng(seed)
  picked = []
  for label_id in range(len(LABELS)):
    index = np.flatnonzero(reviews.labels == label_id)
    want = size // len(LABELS) + (label_id < size % len(LABELS))
    picked.append(rng.choice(index, min(want, index.size), replace=False))
  return reviews.take(np.sort(np.concatenate(picked)))


# -- text to ids -----------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]*>")
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[!?]")


def clean_text(text: str) -> str:
  """Lower case, with ``<br />`` (and any other HTML tag) replaced by a space."""
  return _TAG.sub(" ", text.lower())


def tokenize(text: str) -> list[str]:
  """Cleaned words of ``text``: letters and digits with inner apostrophes (``don't``), plus
  ``!`` and ``?`` as tokens of their own; other punctuation is dropped.

  >>> tokenize("A <br /><br />GREAT film... isn't it?!")
  ['a', 'great', 'film', "isn't", 'it', '?', '!']
  """
  return _TOKEN.findall(clean_text(text))


def build_vocab(token_lists: Iterable[Sequence[str]], size: int) -> tuple[str, ...]:
  """The reserved tokens then the ``size - 2`` most frequent words (ties in alphabetical order).

  Build it on the training split only, so that test words never leak into the model.
  """
  if size < len(RESERVED) + 1:
    raise ValueError(f"vocab size must be at least {len(RESERVED) + 1}, got {size}")
  counts = collections.Counter()
  for tokens in token_lists:
    counts.update(tokens)
  for t in RESERVED:
    counts.pop(t, None)
  words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - len(RESERVED)]
  return RESERVED + tuple(w for w, _ in words)


def encode(token_lists: Sequence[Sequence[str]], vocab: Sequence[str], max_length: int,
           truncate: str = "head") -> tuple[np.ndarray, np.ndarray]:
  """Word ids, zero-padded, and true lengths.

  Args:
    token_lists: N tokenized reviews.
    vocab: from :func:`build_vocab`; words not in it get ``OOV_ID``.
    max_length: T; longer reviews are cut to T words.
    truncate: ``"head"`` keeps the first T words, ``"tail"`` the last T, ``"head_tail"`` the
      first T // 4 and the last T - T // 4 (a review's verdict tends to come at its end, its
      subject at its start).

  Returns:
    ``ids`` (N, T) int32 with ``PAD_ID`` after each review's end, and ``lengths`` (N,) int32.
  """
  if truncate not in TRUNCATIONS:
    raise ValueError(f"truncate must be one of {TRUNCATIONS}, got {truncate!r}")
  index = {w: i for i, w in enumerate(vocab)}
  ids = np.full((len(token_lists), max_length), PAD_ID, np.int32)
  lengths = np.zeros((len(token_lists),), np.int32)
  for n, tokens in enumerate(token_lists):
    if len(tokens) <= max_length:
      kept = tokens
    elif truncate == "head":
      kept = tokens[:max_length]
    elif truncate == "tail":
      kept = tokens[len(tokens) - max_length:]
    else:
      kept = tokens[: max_length // 4] + tokens[len(tokens) - (max_length - max_length // 4):]
    ids[n, : len(kept)] = [index.get(w, OOV_ID) for w in kept]
    lengths[n] = len(kept)
  return ids, lengths


def encode_texts(texts: Sequence[str], vocab: Sequence[str], max_length: int,
                 truncate: str = "head") -> tuple[np.ndarray, np.ndarray]:
  """:func:`tokenize` then :func:`encode`."""
  return encode([tokenize(t) for t in texts], vocab, max_length, truncate)


def length_stats(token_lists: Sequence[Sequence[str]], max_length: Optional[int] = None) -> dict:
  """Word counts per review (median, 90th percentile, max) and the fraction cut by truncation."""
  n = np.asarray([len(t) for t in token_lists])
  out = {"median": float(np.median(n)), "p90": float(np.percentile(n, 90)), "max": int(n.max())}
  if max_length is not None:
    out["truncated_fraction"] = float(np.mean(n > max_length))
  return out
