"""Build the shipped WordNet supersense dataset (train/data/wordnet/) from Debian's `wordnet-base`.

Each example is a WordNet 3.0 noun synset's human-written definition (the gloss before its quoted examples); its
label is the synset's lexicographer file (supersense). Eight frequent, semantically distinct supersenses are kept and
sampled to equal size per class, so the task is balanced and accuracy is the natural metric.

Usage (needs `apt-get install wordnet-base`):
    python scripts/make_wordnet_dataset.py [/usr/share/wordnet] [train/data/wordnet]
"""

import json
import pathlib
import random
import sys

# Lexicographer file numbers of WordNet 3.0 (see lexnames(5WN)).
SUPERSENSES = {
  4: "noun.act",
  5: "noun.animal",
  6: "noun.artifact",
  10: "noun.communication",
  13: "noun.food",
  15: "noun.location",
  18: "noun.person",
  20: "noun.plant",
}
SPLITS = {"train": 500, "validation": 125, "test": 125}  # examples per class
SEED = 42


def _definition(gloss: str) -> str:
  """The definition part of a gloss: text before the first quoted example."""
  text = gloss.split('; "')[0].split(' "')[0]
  return text.strip().rstrip(";").strip()


def read_glosses(wordnet_dir: pathlib.Path) -> dict[int, list[str]]:
  by_class: dict[int, list[str]] = {k: [] for k in SUPERSENSES}
  for line in (wordnet_dir / "data.noun").read_text(encoding="utf-8").splitlines():
    if line.startswith("  ") or "|" not in line:
      continue  # licence header
    fields, gloss = line.split("|", 1)
    lex_file = int(fields.split()[1])
    definition = _definition(gloss)
    if lex_file in by_class and len(definition.split()) >= 3:
      by_class[lex_file].append(definition)
  return by_class


def main(wordnet_dir: str = "/usr/share/wordnet", out_dir: str = "train/data/wordnet") -> None:
  by_class = read_glosses(pathlib.Path(wordnet_dir))
  rng = random.Random(SEED)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
  for label, lex_file in enumerate(sorted(SUPERSENSES)):
    glosses = sorted(set(by_class[lex_file]))
    rng.shuffle(glosses)
    start = 0
    for split, size in SPLITS.items():
      rows[split] += [{"sentence": g, "label": label} for g in glosses[start : start + size]]
      start += size
  for split, examples in rows.items():
    rng.shuffle(examples)
    with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
      for example in examples:
        f.write(json.dumps(example) + "\n")
  (out / "labels.json").write_text(json.dumps([SUPERSENSES[k] for k in sorted(SUPERSENSES)], indent=1) + "\n")


if __name__ == "__main__":
  main(*sys.argv[1:])
