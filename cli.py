"""The command line of every script: the flags the stages share, the two recipes, and how an
expected user error is reported.

    parser = cli.ArgumentParser(__doc__); add_common_args(parser, out="out/sft")
    show_recipes(parser, TINY, AUTHORS)          --help shows each recipe flag's two values
    args = parser.parse_args(argv); apply_recipe(args, {"tiny": TINY, "authors": AUTHORS}, args.data is not None)
    check_out_dir(args.out)                      a file, or a folder we cannot write: said before any loading
    if __name__ == "__main__": cli.run(main)     a user error prints one message, no traceback; Ctrl-C says
                                                 where the run stopped and how to resume it
"""

from __future__ import annotations

import argparse
import errno
import linecache
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fileio
from data.tokenizer import TEMPLATES
from trackers import REPORT_TO

RECIPES = ("tiny", "authors")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default at the end of its help line ("(default: 0.2)"),
    except where there is none to show (None: the recipe's value, or the help's words, say what happens;
    False: a switch; an empty string or list) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default in ("", []) \
                or default == argparse.SUPPRESS or "default" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a one-line error: its usage block (15 lines for a stage script) buries the
    one line that names the flag; --help shows the defaults (HelpFormatter)."""

    def __init__(self, description: str | None = None, **kwargs):
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def positive(kind):
    """argparse type: a number of `kind` above 0 (a 0 step count or batch size is never meant)."""
    def parse(text):
        value = kind(text)
        if not value > 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def fraction(text):
    """argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        percent = f" ({text}% is {value / 100:g})" if 1 <= value <= 100 else ""  # a percentage given for a share
        raise argparse.ArgumentTypeError(f"must be a share in [0, 1), got {text}{percent}")
    return value


def probability(text):
    """argparse type: a number in (0, 1] (a nucleus mass: 0 would keep no token)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def unit_interval(text):
    """argparse type: a number in [0, 1] (a discount, GAE's lambda)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def non_negative(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def finite(text):
    """argparse type: any number but nan and inf (a nan threshold or penalty would turn every loss to nan)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_common_args(parser, out: str, **helps: str):
    """Flags shared by the stage scripts. Those defaulting to None take the script's recipe. helps: the
    help of a flag (by its dest, e.g. max_length=...) where it means something else in that script."""

    def a(flag, **kwargs):
        parser.add_argument(flag, **{**kwargs, "help": helps.get(flag[2:].replace("-", "_"), kwargs["help"])})
    a("--out", default=out, help="output dir: log.jsonl, checkpoints/, the final model")
    a("--recipe", choices=RECIPES, default=None,
      help="the values of the flags left unset: tiny (the embedded task's CPU recipe) or authors (the Safe RLHF "
           "authors' LLaMA-7B scripts; ../shared/SAFE_RLHF.md); default: tiny without data files, authors with them")
    a("--tokenizer", default=None, help="tokenizer.json / tokenizer.model or a directory (default: the one beside the "
                                        "model, else the synthetic task's)")
    a("--template", choices=TEMPLATES, default=None,
      help="conversation template: safe_rlhf (the authors': BEGINNING OF CONVERSATION: USER: ... ASSISTANT:) or chat "
           "(the checkpoint's own chat template, rendered with jinja2; a response ends at its end of turn). A folder "
           "this project wrote takes the template it was trained with (its config.json records it); a release "
           "takes either (default: the recorded one, else safe_rlhf)")
    a("--synthetic-dir", default="out/synthetic", help="where the embedded synthetic task is generated (if missing)")
    a("--data-seed", type=int, default=0, help="seed of the synthetic task (the same task for every training seed)")
    a("--epochs", type=positive(float), default=None, help="passes over the training data")
    a("--max-steps", type=positive(int), default=None, help="stop after this many optimiser steps (overrides --epochs)")
    a("--batch-size", type=positive(int), default=None, help="examples per optimiser step, over all ranks")
    a("--micro-batch-size", type=positive(int), default=None, help="examples per forward pass per rank (accumulation fills the rest)")
    a("--lr", type=positive(float), default=None, help="peak learning rate")
    a("--weight-decay", type=non_negative, default=None, help="AdamW weight decay (never on norms and biases)")
    a("--warmup-ratio", type=fraction, default=None, help="share of steps with linear warmup before the cosine decay")
    a("--max-length", type=positive(int), default=None, help="tokens per sequence (longer ones are truncated or dropped, and counted)")
    a("--grad-clip", type=non_negative, default=1.0, help="max global gradient norm (0: no clipping)")
    a("--eval-every", type=positive(int), default=50, help="evaluate every N steps (and at the end)")
    a("--save-every", type=positive(int), default=None,
      help="checkpoint every N steps (and at the end); a rerun resumes from the latest (default: the recipe's, else 100)")
    a("--report-to", nargs="+", choices=REPORT_TO, default=["none"],
      help="experiment trackers that mirror <out>/log.jsonl: tensorboard (<out>/tensorboard), wandb (project "
           "$WANDB_PROJECT, default safe-rlhf-minimal); several allowed")
    a("--seed", type=int, default=0, help="data order, synthetic task, fresh weights")
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--precision", choices=["auto", "bf16", "fp32"], default="auto",
      help="bf16: bf16 compute, fp32 master weights and gradient reduction; auto: bf16 on GPUs, fp32 on CPU")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="recompute each block in backward to save memory (default: the recipe's; on for the authors' 7B one)")
    a("--cpu-offload", action="store_true", help="keep sharded parameters and optimiser state in CPU memory")
    a("--save-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
      help="dtype of the final model (auto: the dtype of the checkpoint the run started from; fp32 from a preset)")


def show_recipes(parser, tiny: dict, authors: dict, notes: dict | None = None):
    """Append each recipe flag's two values to its --help line, so a user sees what runs without
    reading the code: "[tiny: 3e-3 | authors': 2e-5]" (notes: extra words per flag)."""
    parser.epilog = ("[tiny | authors'] after a flag: the value it takes when left unset, from --recipe tiny (the CPU "
                     "recipe of the embedded task; the default without data files) or --recipe authors (the "
                     "authors' LLaMA-7B recipe, ../shared/SAFE_RLHF.md; the default with data files).")
    for action in parser._actions:
        key = action.dest
        if key in tiny or key in authors:
            extra = f"; {notes[key]}" if notes and key in notes else ""
            values = f"[tiny: {tiny.get(key, action.default)} | authors': {authors.get(key, action.default)}{extra}]"
            action.help = f"{action.help or ''} {values.replace('%', '%%')}"


def apply_recipe(args, recipes: dict[str, dict], data_given: bool):
    """Fill the flags left at None from --recipe (by default tiny on the embedded task, authors on data
    files), then check the batch flags against the number of ranks: before any data or model is loaded."""
    check_report_to(args.report_to)
    args.recipe = args.recipe or ("authors" if data_given else "tiny")
    for key, value in recipes[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "save_every", 0) is None:
        args.save_every = 100
    world = launch_env()[1]
    per_step = args.micro_batch_size * world
    if args.batch_size % per_step:
        fix = f"e.g. --batch-size {-(-args.batch_size // per_step) * per_step}"
        fix += ", or another number of ranks (torchrun --nproc_per_node)" if world > 1 else ""
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} rank(s) = {per_step}: {fix}")
    return args


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process. A half-set or
    non-numeric environment (RANK exported by hand in a job script, say) is said here, naming the variable,
    rather than met as a KeyError inside the process-group setup. WORLD_SIZE alone counts as the world
    size for the batch check, as it always has."""
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name)
        if text is not None:
            try:
                values[name] = int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a number: launch with torchrun, which sets it, or unset "
                                 f"it") from None
    if "RANK" in values and "WORLD_SIZE" not in values:
        raise ValueError(f"RANK={values['RANK']} is set but WORLD_SIZE is not: launch with torchrun (which sets "
                         f"both), or unset RANK for a single process")
    rank, world = values.get("RANK", 0), values.get("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not make a process group (0 <= RANK < WORLD_SIZE): "
                         "launch with torchrun, or unset both")
    return rank, world, values.get("LOCAL_RANK", 0)


def check_out_dir(path, flag: str = "--out"):
    """An output directory must be a directory, or be creatable, and writable: said before anything is
    loaded, not as a traceback after the first training step (every script that writes calls this)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:  # where the first new folder would be made
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise NotADirectoryError(f"{flag} {path} {what}, not a directory: pass a directory (new or from an "
                                 f"earlier run of this command)")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"{flag} {path}: cannot write in {existing} ({error.strerror}): pass a {flag} you "
                              f"can write, or change its permissions") from None


@dataclass
class Progress:
    """Where the training run of this process stands, for the line that a Ctrl-C or a full disk prints:
    training.Logger sets the run and its steps, checkpoint.Checkpointer the step of its latest checkpoint."""
    name: str | None = None
    step: int = 0  # optimiser steps done
    total: int = 0
    saved: int | None = None  # the step the latest checkpoint holds; None before the first one

    def where(self) -> str:
        if self.name is None:
            return ""
        if self.step >= self.total:
            return f" after step {self.step} of {self.total} ({self.name}), while writing its final model"
        return f" at step {self.step + 1} of {self.total} ({self.name})"

    def resume_line(self) -> str:
        if self.name is None:
            return "run the same command again: what was finished is kept (outputs are written whole or not at all)"
        if self.saved is None:
            return f"no checkpoint yet: the same command starts {self.name} over from step 1"
        if self.saved >= self.total:
            return f"training is complete (checkpoint of step {self.saved}): the same command writes the final model"
        return (f"run the same command to resume from step {self.saved + 1} (the checkpoint of step {self.saved}; "
                f"the resumed run computes exactly what an uninterrupted one would)")


PROGRESS = Progress()

# Failures of the machine rather than of our code or the user's input: said in one line with the file,
# whatever raised them (a library writing a checkpoint shard, say).
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
                      errno.EROFS: "the file system is read-only: pick another --out",
                      errno.EACCES: "check the path's permissions"}


def check_report_to(report_to):
    """A tracker asked for must be installed: said now, not after the models have loaded."""
    import importlib.util

    for kind, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if kind in (report_to or []) and importlib.util.find_spec(package) is None:
            raise ImportError(f"--report-to {kind} needs the {package} package: pip install {package}")


def run(main):
    """Run a script's main(). An expected user error (a bad flag, file, data line, checkpoint:
    ValueError, KeyError, FileNotFoundError, ... raised by this project's own code, whose message
    names the culprit and the fix) prints that message once (rank 0) and exits with status 2; so do
    a Ctrl-C (where the run stopped, and where the same command resumes it) and a full disk or a
    denied write, whoever raised it (the file, and the same way back). An error raised inside a
    library (a bug, ours or theirs) keeps its traceback, as does every error with SAFE_RLHF_DEBUG=1."""
    debug = os.environ.get("SAFE_RLHF_DEBUG", "0") not in ("", "0")
    PROGRESS.__init__()  # nothing from an earlier run in this process (the tests run many)
    try:
        main()
    except KeyboardInterrupt:
        if debug:
            raise
        _say(f"interrupted{PROGRESS.where()}; {PROGRESS.resume_line()}")
    except (ValueError, KeyError, OSError, ImportError, FloatingPointError, RuntimeError) as error:
        if debug:
            raise
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
            where = f": {error.filename}" if error.filename else ""
            _say(f"{error.strerror}{where}; {ENVIRONMENT_ERRNOS[error.errno]}, then {PROGRESS.resume_line()}")
        if not _raised_here(error):
            raise
        _say(error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error))
    finally:
        fileio.release_out_dirs()  # the --out folder's lock (checkpoint.Checkpointer.check)
    leave_torchrun_rank()


def leave_torchrun_rank():
    """End a rank of a finished torchrun job (its outputs written, its process group destroyed) at
    once. gloo's worker threads can still abort the interpreter's shutdown ("terminate called
    without an active exception", SIGABRT: a failed run) after the barrier and destroy_process_group,
    so a rank leaves without that shutdown. Outside torchrun, nothing happens."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _say(message: str):
    """The one message of a failed run (from rank 0 only: every rank fails alike), and exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}\n(SAFE_RLHF_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
    sys.exit(2)


def _raised_here(error: BaseException) -> bool:
    """Whether `error` comes from a `raise` statement of this project's code (a message written
    for the user), not from a library or from an operation that failed in our code (a bug)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    file = Path(tb.tb_frame.f_code.co_filename).resolve()
    ours = file.is_relative_to(Path(__file__).resolve().parent) and "site-packages" not in file.parts
    return ours and linecache.getline(str(file), tb.tb_lineno).lstrip().startswith("raise ")
