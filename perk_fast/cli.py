"""``perk-fast``: the reference's command line, working -- ``train``, ``eval``, ``encode``, ``export``.

    perk-fast train --config-dir configs experiment=meta_train model_name_or_path=... data_dir=... output_dir=...
    perk-fast eval experiment=meta_test checkpoint=RUN/checkpoints/last
    perk-fast encode checkpoint=... +contexts=docs.jsonl +answer=true
    perk-fast export +memory=RUN/memory +index=0 +out=adapter/
    python -m perk_fast train ...                    (the same)

The configuration is composed exactly as the reference composes it, by Hydra: ``--config-dir DIR``
(default ``./configs`` when it exists, else perk_fast's built-in tree with the same layout),
``--config-name NAME`` (default ``run``), then overrides (``experiment=meta_train``, ``key=value``,
``+new_key=value``). ``--cfg`` prints the composed config and exits. A bad value is an error that
names the key and the value; an unknown key is a warning. Every recipe is a function of
:mod:`perk_fast.runs` over the Python API.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from . import runs

USAGE = """usage: perk-fast {train,eval,encode,export} [--config-dir DIR] [--config-name NAME] [--cfg] [override ...]

  train    meta-train on <data_dir>/<dataset_name>/<dataset_subset>/train.jsonl, evaluating on validation
  eval     score the validation and test splits with checkpoint=...
  encode   write the memories of +contexts=FILE (and answer their questions with +answer=true)
  export   a memory (+memory=DIR +index=i) or the meta-learned init (+init=true) as a PEFT LoRA adapter

options:
  --config-dir DIR    Hydra config directory (default: ./configs if present, else perk_fast's built-in configs)
  --config-name NAME  primary config (default: run)
  --cfg               print the composed config and exit
  -h, --help          this help, with every key the configuration accepts
"""

BUILTIN_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _fail(message: str) -> int:
    print(f"perk-fast: error: {message}", file=sys.stderr)
    return 2


def _parse(argv: Sequence[str]) -> tuple[str | None, dict, list[str]]:
    argv = list(argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else None
    opts = {"config_dir": None, "config_name": "run", "cfg": False, "help": False}
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            opts["help"] = True
        elif arg == "--cfg":
            opts["cfg"] = True
        elif arg in ("--config-dir", "--config-name") or arg.startswith(("--config-dir=", "--config-name=")):
            key = arg.split("=", 1)[0][2:].replace("-", "_")
            if "=" in arg:
                value = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg} needs a value")
                i += 1
                value = argv[i]
            opts[key] = value
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r} (overrides are key=value, +key=value)")
        else:
            overrides.append(arg)
        i += 1
    return command, opts, overrides


def compose(config_dir: str | None, config_name: str, overrides: Sequence[str]) -> dict:
    """The config Hydra composes from ``config_dir`` / ``config_name`` and ``overrides`` (resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    if config_dir is None:
        config_dir = "configs" if os.path.isdir("configs") else BUILTIN_CONFIGS
    config_dir = os.path.abspath(config_dir)
    if not os.path.isdir(config_dir):
        raise runs.ConfigError(f"--config-dir {config_dir!r} is not a directory")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name="perk_fast"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def _torchrun(n: int, argv: Sequence[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m", "perk_fast", *argv]
    print("perk-fast: n_gpu=%d: running under torchrun:\n  %s" % (n, " ".join(cmd)), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``perk-fast`` / ``python -m perk_fast``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, opts, overrides = _parse(argv)
    except ValueError as err:
        return _fail(f"{err}\n{USAGE}")
    if opts["help"] or command is None:
        print(USAGE + "\nconfiguration keys:\n" + runs.key_table())
        return 0 if opts["help"] else 2
    if command not in runs.RECIPES:
        return _fail(f"unknown command {command!r}; allowed: {', '.join(runs.RECIPES)}\n{USAGE}")
    try:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        return _fail("the command line needs hydra-core: pip install hydra-core")
    runs.setup_console_logging()
    try:
        config = compose(opts["config_dir"], opts["config_name"], overrides)
        if opts["cfg"]:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(config))
            return 0
        run, perk = runs.parse_config(config)
        if run.n_gpu > 1 and "WORLD_SIZE" not in os.environ and command == "train":
            return _torchrun(run.n_gpu, argv)
        runs.RECIPES[command](run, perk, config)
    except (HydraException, OmegaConfBaseException) as err:
        return _fail(str(err).strip())
    except runs.ConfigError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted (the last checkpoint is in the run folder's checkpoints/last)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
