"""The IMDB input pipeline on tiny datasets in the official layout, built here, never downloaded."""

import gzip
import os
import re
import tarfile

import numpy as np
import pytest

from jaxgru.tasks.classify import imdb

POSITIVE = ["A great film.<br /><br />I loved it!", "Wonderful, GREAT acting; loved the score.",
            "great great fun", "Loved it. Wonderful!"]
NEGATIVE = ["An awful film.<br />Boring plot?", "Boring, awful acting; hated the score.",
            "awful awful mess", "Hated it. Boring!"]


def make_layout(root, test_extra=("unseenword is great",), unsup=True):
  """Writes ``root/aclImdb/{train,test}/{pos,neg}/<id>_<stars>.txt`` plus files to be skipped."""
  base = os.path.join(root, "aclImdb")
  for split in ("train", "test"):
    for label, texts in (("pos", POSITIVE), ("neg", NEGATIVE)):
      folder = os.path.join(base, split, label)
      os.makedirs(folder)
      extra = list(test_extra) if split == "test" and label == "pos" else []
      for i, text in enumerate(texts + extra):
        stars = 9 if label == "pos" else 2
        with open(os.path.join(folder, f"{i}_{stars}.txt"), "w", encoding="utf-8") as f:
          f.write(text)
  if unsup:  # the official archive has these; they are not labeled reviews
    os.makedirs(os.path.join(base, "train", "unsup"))
    with open(os.path.join(base, "train", "unsup", "0_0.txt"), "w") as f:
      f.write("unlabeled")
    with open(os.path.join(base, "train", "urls_pos.txt"), "w") as f:
      f.write("http://example.com\n")
  return base


def make_archive(root, out, mode="w:gz"):
  with tarfile.open(out, mode) as t:
    t.add(os.path.join(root, "aclImdb"), arcname="aclImdb")
  return out


@pytest.fixture
def layout(tmp_path):
  return make_layout(str(tmp_path / "data"))


@pytest.fixture
def archive(tmp_path, layout):
  return make_archive(str(tmp_path / "data"), str(tmp_path / "aclImdb_v1.tar.gz"))


# -- text ------------------------------------------------------------------------------------------


def test_tokenize_cleans_case_tags_and_punctuation():
  assert imdb.tokenize("A <br /><br />GREAT film... isn't it?! (10/10)") == [
      "a", "great", "film", "isn't", "it", "?", "!", "10", "10"]
  assert imdb.tokenize("Line<br/>break<i>italic</i>") == ["line", "break", "italic"]
  assert imdb.tokenize("Café, naïve: ok_then") == ["café", "naïve", "ok", "then"]
  assert imdb.tokenize("... --- ") == []


def test_vocab_is_reserved_then_most_frequent_with_alphabetical_ties():
  tokens = [["b", "a", "c", "a"], ["c", "a", "d"]]
  assert imdb.build_vocab(tokens, 10) == ("<pad>", "<oov>", "a", "c", "b", "d")
  assert imdb.build_vocab(tokens, 4) == ("<pad>", "<oov>", "a", "c")
  with pytest.raises(ValueError, match="at least 3"):
    imdb.build_vocab(tokens, 2)


def test_encode_truncates_pads_and_keeps_lengths():
  vocab = ("<pad>", "<oov>", "a", "b")
  ids, lengths = imdb.encode([["a", "b", "x", "a"], ["b"], []], vocab, 3)
  np.testing.assert_array_equal(ids, [[2, 3, 1], [3, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(lengths, [3, 1, 0])
  assert ids.dtype == np.int32 and lengths.dtype == np.int32
  ids, lengths = imdb.encode([["a", "b", "x", "a"]], vocab, 3, truncate="tail")
  np.testing.assert_array_equal(ids, [[3, 1, 2]])
  words = [f"w{i}" for i in range(10)]
  vocab = ("<pad>", "<oov>") + tuple(words)
  ids, lengths = imdb.encode([words, words[:5]], vocab, 8, truncate="head_tail")
  np.testing.assert_array_equal(ids, [[2, 3, 6, 7, 8, 9, 10, 11], [2, 3, 4, 5, 6, 0, 0, 0]])
  np.testing.assert_array_equal(lengths, [8, 5])
  with pytest.raises(ValueError, match="truncate"):
    imdb.encode([["a"]], vocab, 3, truncate="middle")


# -- reading ---------------------------------------------------------------------------------------


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].texts == b[k].texts and a[k].names == b[k].names
    np.testing.assert_array_equal(a[k].labels, b[k].labels)


def test_folder_parent_and_archives_read_the_same(tmp_path, layout, archive):
  data = imdb.load_reviews(layout)
  assert len(data["train"]) == 8 and len(data["test"]) == 9  # unsup and urls skipped
  np.testing.assert_array_equal(data["train"].labels, [0] * 4 + [1] * 4)
  assert data["train"].names[0] == "neg/0_2.txt" and data["train"].texts[0] == NEGATIVE[0]
  _assert_same(data, imdb.load_reviews(os.path.dirname(layout)))
  _assert_same(data, imdb.load_reviews(archive))
  plain = make_archive(str(tmp_path / "data"), str(tmp_path / "plain.tar"), "w")
  _assert_same(data, imdb.load_reviews(plain))
  only_test = imdb.load_reviews(archive, splits=("test",))
  assert list(only_test) == ["test"] and len(only_test["test"]) == 9


def test_subsample_is_balanced_and_deterministic(layout):
  train = imdb.load_reviews(layout)["train"]
  sub = imdb.subsample(train, 4, seed=1)
  assert len(sub) == 4 and sub.labels.tolist() == [0, 0, 1, 1]
  assert sub.names == imdb.subsample(train, 4, seed=1).names
  assert imdb.subsample(train, 100, seed=1) is train


def _raises(*parts):
  return pytest.raises(imdb.DataError, match=".*".join(re.escape(p) for p in parts))


def test_missing_path(tmp_path):
  with _raises(str(tmp_path / "nope"), "no such file or directory"):
    imdb.load_reviews(str(tmp_path / "nope"))
  with _raises("no IMDB path given"):
    imdb.load_reviews("")


def test_folder_without_layout(tmp_path, layout):
  with _raises(str(tmp_path), "not the IMDB layout", "missing train/neg, train/pos, test/neg, test/pos"):
    imdb.load_reviews(str(tmp_path))
  for name in os.listdir(os.path.join(layout, "test", "neg")):
    os.remove(os.path.join(layout, "test", "neg", name))
  with _raises("not the IMDB layout", "no reviews in test/neg"):
    imdb.load_reviews(layout)


def test_archive_without_layout(tmp_path):
  os.makedirs(tmp_path / "other" / "train" / "pos")
  (tmp_path / "other" / "train" / "pos" / "0_9.txt").write_text("fine")
  path = str(tmp_path / "other.tar.gz")
  with tarfile.open(path, "w:gz") as t:
    t.add(str(tmp_path / "other"), arcname="aclImdb")
  with _raises("not the IMDB layout", "no reviews in train/neg, test/neg, test/pos"):
    imdb.load_reviews(path)


def test_empty_review(layout, tmp_path):
  bad = os.path.join(layout, "train", "pos", "99_9.txt")
  open(bad, "w").write("  \n")
  with _raises(bad, "empty review file"):
    imdb.load_reviews(layout)
  archive = make_archive(os.path.dirname(layout), str(tmp_path / "a.tar.gz"))
  with _raises("aclImdb/train/pos/99_9.txt", "empty review file"):
    imdb.load_reviews(archive)


def test_non_utf8_review(layout, tmp_path):
  bad = os.path.join(layout, "test", "neg", "98_1.txt")
  open(bad, "wb").write(b"caf\xe9 au lait")  # Latin-1, not UTF-8
  with _raises(bad, "not valid UTF-8", "0xe9 at offset 3"):
    imdb.load_reviews(layout)
  archive = make_archive(os.path.dirname(layout), str(tmp_path / "a.tar.gz"))
  with _raises("aclImdb/test/neg/98_1.txt", "not valid UTF-8"):
    imdb.load_reviews(archive)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_archive_is_reported(tmp_path, archive, keep):
  data = open(archive, "rb").read()
  cut = str(tmp_path / "cut.tar.gz")
  open(cut, "wb").write(data[: int(len(data) * keep)])
  with _raises(cut, "corrupt or truncated archive"):
    imdb.load_reviews(cut)


def test_truncated_uncompressed_archive_is_reported(tmp_path, layout):
  plain = make_archive(os.path.dirname(layout), str(tmp_path / "plain.tar"), "w")
  data = open(plain, "rb").read()
  # Cut inside the last review's data block: the member's header promises more bytes.
  cut = str(tmp_path / "cut.tar")
  open(cut, "wb").write(data[: len(data) // 2 + 100])
  with _raises(cut, "corrupt or truncated archive"):
    imdb.load_reviews(cut)


def test_corrupt_archive_is_reported(tmp_path, archive):
  data = bytearray(open(archive, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(16)  # zeroed bytes in the deflate stream
  bad = str(tmp_path / "bad.tar.gz")
  open(bad, "wb").write(bytes(data))
  with _raises(bad, "corrupt or truncated archive"):
    imdb.load_reviews(bad)


def test_not_an_archive(tmp_path):
  path = str(tmp_path / "reviews.txt")
  open(path, "w").write("just text\n")
  with _raises(path, "corrupt or truncated archive"):
    imdb.load_reviews(path)
  gz = str(tmp_path / "x.gz")
  with gzip.open(gz, "wb") as f:
    f.write(b"not a tar")
  with _raises(gz, "corrupt or truncated archive"):
    imdb.load_reviews(gz)
