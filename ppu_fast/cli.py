"""The ``ppu-fast`` command: ``demo`` (the main job), ``run`` (an experiment over seeds) and ``refine``
(the solver alone, on files)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

DEMO_METHODS = ("original", "retrain", "finetune", "ppu", "ppu-bias", "ppu-random")
# Class unlearning: Retrain never saw a 5, so it misreads every one (100 % forget error) and the
# methods spread from 0 % (no forgetting) to 100 %. On digits5's 25 zeros Retrain itself got them
# all right, so nothing showed; on flipped labels PPU's privacy mode picks its epoch by the
# validation error, the wrong yardstick there. docs/unlearning.md ("Why this demo") has the numbers.
DEMO_SETTING = {"dataset": "digits", "model": "smallcnn", "scenario": "class", "forget_class": 5}
# Training of original and retrain (default_train_config when empty) and options per method: the
# API defaults, since on this scenario PPU's 10 epochs at lr 0.01 reach Retrain's forget error and
# the earlier demo's 30 at lr 0.05 added test error and time for at most 0.7 points of forget
# error. Tests shrink these.
DEMO_TRAIN: dict = {}
DEMO_OPTIONS: dict[str, dict] = {}
DEMO_WIDTH = 1.0


def _entries(text: str, what: str) -> list[str]:
    # An empty entry ("1,,2", "1,2,") is more likely a value lost in typing than a separator to
    # skip, so it is refused rather than dropped.
    entries = [t.strip() for t in text.split(",")]
    if text.strip() and not all(entries):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what} without empty entries, "
                                         f"got {text!r}")
    return [t for t in entries if t]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _entries(text, "integers")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in _entries(text, "numbers")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


SEED_MAX = 2 ** 32 - 1  # what torch.manual_seed and numpy's generators accept


def _seed_list(text: str) -> list[int]:
    seeds = _int_list(text)
    if not seeds or any(not 0 <= v <= SEED_MAX for v in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integers in [0, 2**32 - 1] (each seed "
                                         f"is one independent run), got {text!r}")
    return seeds


def _seed(text: str) -> int:
    v = _nonneg_int(text)
    if v > SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1], got {text!r}")
    return v


def _int_at_least(low: int, what: str, high: Optional[int] = None):
    """An argparse type: an integer >= ``low`` (and <= ``high``), the message saying ``what`` is
    expected."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_nonneg_int = _int_at_least(0, "a non-negative integer")
_positive_int = _int_at_least(1, "a positive integer")
# torch accepts any count, but 100,000 threads crashed the process (segmentation fault) and
# 1,000 on 2 cores took 6x as long as 2.
THREADS_MAX = 1024
_threads = _int_at_least(1, f"a thread count from 1 to {THREADS_MAX}", THREADS_MAX)


def _float_in(low: float, high: float, what: str, low_open: bool = False):
    """An argparse type: a finite float in [low, high] ((low, high] with ``low_open``)."""
    def parse(text: str) -> float:
        v = _finite_float(text)
        if v < low or v > high or (low_open and v == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_float = _float_in(0.0, float("inf"), "a positive number", low_open=True)
# PPU's retain weight, as refine accepts it (problem.check_lam).
_lam = _float_in(1e-30, 1e30, "a number in [1e-30, 1e30]")


def _lam_list(text: str) -> list[float]:
    values = _float_list(text)
    for v in values:
        _lam(repr(v))
    return values


# refine's marginals by name (problem.MARGINAL_NAMES; not imported: the parser loads no torch).
_MARGINAL_NAMES = ("retain", "original", "pseudo")


def _marginals(text: str) -> str:
    """refine's --marginals: a name, or a path to class totals (.npy / .pt, read later)."""
    if text in _MARGINAL_NAMES or Path(text).suffix in (".npy", ".pt"):
        return text
    raise argparse.ArgumentTypeError(f"expected retain, original, pseudo or a .npy / .pt file of "
                                     f"class totals, got {text!r}")


def _marginals_arg(text: str):
    """The refine's ``marginals``: the name, or the totals read from the file."""
    return text if text in _MARGINAL_NAMES else _load_array(text, "--marginals")


def _finite_float(text: str) -> float:
    import math
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _check_out_folder(out: str) -> None:
    # Before any training: a results folder that cannot be written should not cost a run first.
    if not str(out).strip():
        raise ValueError("--out: empty; expected a folder (created if missing)")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out: '{p}' is a file; expected a folder (created if missing)")
    why = _unwritable(p)
    if why:
        raise ValueError(f"--out: cannot write a folder at '{p}' ({why}); expected a writable "
                         f"folder (created if missing)")
    from .tables import TABLE_FILES

    for name in ("results.json", "results.md", "results.png", *TABLE_FILES.values()):
        if (p / name).exists() and not (p / name).is_file():
            # Found only when the run's results were written, and they were lost.
            raise ValueError(f"--out: '{p / name}' exists and is not a file, so the run could not "
                             f"write its {name}; expected a folder where it can (move it away)")


def _unwritable(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (made if missing), or None. Tried for real
    (permissions, read-only and special file systems), then undone: a refused command leaves no
    folder behind."""
    try:
        with _made_folders(folder, keep=False), tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


def _check_run_device(device: str) -> None:
    import torch

    from .stream import check_device
    try:
        if torch.device(device).type == "mps" and torch.backends.mps.is_available():
            return
    except (RuntimeError, TypeError, ValueError):
        pass
    try:
        check_device(device)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None


def _check_backend_environment(device: str) -> None:
    from .backends import check_environment
    check_environment(device)


def _name_list(text: str) -> list[str]:
    return _entries(text, "names")


def _progress_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="show progress bars even when stderr is not a terminal")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="hide progress bars (default: shown only when stderr is a terminal)")


def _show_progress(args: argparse.Namespace) -> bool:
    # A bar redraws itself with carriage returns: in a log file each redraw stays, ~20,000
    # characters per fine-tuning, burying the table. Logs get run_experiment's line per method.
    return sys.stderr.isatty() if args.progress is None else args.progress


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS, SCENARIOS
    from .models import MODELS
    from .unlearn.experiment import registered

    from . import __version__
    from .backends import BACKEND_NAMES

    p = argparse.ArgumentParser(prog="ppu-fast", description="Pseudo-Probability Unlearning (PPU).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="forget every 5 of scikit-learn's digits (small CNN): Original, Retrain, "
                                    "Finetune, PPU; prints the table and a verdict, writes "
                                    "results.json/.md/.png")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--seed", type=_seed, default=0,
                   help="seed of the split, the training and the unlearning (default 0)")
    d.add_argument("--no-cache", action="store_true", help="retrain even if a cached model exists")
    _progress_flags(d)

    r = sub.add_parser("run", help="an unlearning experiment, mean and standard error over seeds")
    r.add_argument("--dataset", required=True, choices=DATASETS,
                   help="digits5 / cifar5: the paper's small scale (fixed split); digits, cifar10, "
                        "cifar100, imagefolder: large scale (class numbers follow the sorted class "
                        "folder names, as torchvision's ImageFolder)")
    r.add_argument("--data-root", default=None, help="folder of CIFAR python batches or an ImageFolder "
                                                     "tree with train/ and test/")
    r.add_argument("--model", required=True, choices=MODELS)
    r.add_argument("--width", type=_finite_float, default=1.0, help="channel width factor (default 1)")
    r.add_argument("--scenario", default="selective", choices=SCENARIOS,
                   help="selective: forget --num-forget examples of one class (default); class: forget "
                        "all of it (large scale only)")
    r.add_argument("--forget-class", type=int, default=None,
                   help="the class to forget (default: 0 at small scale, 5 at large scale)")
    r.add_argument("--num-forget", type=int, default=None,
                   help="selective: how many of its examples (default: 25 at small scale, 100 at "
                        "large scale)")
    r.add_argument("--methods", type=_name_list, default=None,
                   help="comma-separated (default original,retrain,finetune,ppu,ppu-bias), or all: every "
                        "baseline, PPU variant and PPU-after-method of the paper's comparison (NTK at "
                        f"small scale only); names: {', '.join(registered())}")
    # Five seeds by default, as the paper reports: one seed has no standard error and no significance
    # test. Cheap where the default comparison is cheap: digits5 with the default methods took 17 s a
    # seed on one thread (models trained, not cached); pass --seeds for a quick look or a large set.
    r.add_argument("--seeds", type=_seed_list, default=[0, 1, 2, 3, 4],
                   help="comma-separated, e.g. 1,2,3 (default 0,1,2,3,4: mean ± standard error over 5 runs, "
                        "as the paper reports)")
    r.add_argument("--device", default="cpu", help="where models train (cpu, cuda, cuda:N; default cpu)")
    r.add_argument("--epochs", type=_nonneg_int, default=None,
                   help="training epochs of original and retrain (0: both are the starting weights, "
                        "e.g. --init-checkpoint's; Retrain is then no reference, and a warning says so)")
    r.add_argument("--lr", type=_positive_float, default=None, help="learning rate of original and retrain")
    r.add_argument("--batch-size", type=_positive_int, default=None, help="batch size of original and retrain")
    r.add_argument("--unlearn-epochs", type=_positive_int, default=None,
                   help="PPU fine-tuning epochs (default 10)")
    r.add_argument("--unlearn-lr", type=_positive_float, default=None, help="PPU fine-tuning lr (default 0.01)")
    r.add_argument("--lam", type=_lam, default=None, help="PPU (privacy) retain weight (default 1)")
    r.add_argument("--lam-sweep", type=_lam_list, default=None, metavar="L1,L2,...",
                   help="the paper's Table 5: run PPU (privacy) once per λ, e.g. 0.1,0.5,1,2,5,10, on the "
                        "same original model, beside Original and Retrain (not together with --methods or --lam)")
    r.add_argument("--pseudo", default=None, choices=("uniform", "random", "prior"),
                   help="what replaces the forget rows in PPU (privacy) (default uniform)")
    r.add_argument("--marginals", default=None, choices=("retain", "original"),
                   help="PPU (privacy) class totals: the retain rows' mix scaled to N, or the "
                        "original totals (default retain)")
    r.add_argument("--select", default=None, choices=("last", "val"), help="PPU (privacy) epoch choice")
    r.add_argument("--retain-per-epoch", type=_positive_int, default=None,
                   help="retain rows each PPU epoch visits (not together with --retain-fraction)")
    r.add_argument("--ppu-schedule", default=None, choices=("fast", "paper"),
                   help="PPU's fine-tuning schedule (default fast: early stop at the settled 'val' rule, "
                        "and in bias mode a quarter of the retain rows and each forget row 4 times per "
                        "epoch; paper: every row, every epoch, ppu_fast's plain reading of a paper that "
                        "gives no schedule); also the +ppu methods' PPU step")
    r.add_argument("--retain-fraction", type=_float_in(0.0, 1.0, "a share in (0, 1]", low_open=True),
                   default=None,
                   help="share of the retain rows each PPU epoch visits, in (0, 1] (default: the schedule's)")
    r.add_argument("--trainable", default=None, choices=("all", "last-block", "head"),
                   help="which layers PPU fine-tunes (default all)")
    r.add_argument("--threads", type=_threads, default=None,
                   help=f"torch CPU threads, 1 to {THREADS_MAX}")
    init = r.add_mutually_exclusive_group()
    init.add_argument("--init-checkpoint", default=None, metavar="PATH",
                      help="start Original and Retrain from this state dict of the chosen --model/--width "
                           "(a head for another number of classes is re-initialised); it must not have "
                           "been trained on the forget set, or Retrain is no reference")
    init.add_argument("--pretrain", default=None, choices=("cifar10-other",),
                      help="start from a model pre-trained on the CIFAR-10 classes the dataset does not use "
                           "(cifar5: classes 5-9), a stand-in for the paper's CIFAR-100 pre-training")
    r.add_argument("--pretrain-epochs", type=_positive_int, default=None,
                   help="pre-training epochs (default 30)")
    r.add_argument("--pretrain-per-class", type=_positive_int, default=None,
                   help="pre-training images per class (default all: 5,000 for CIFAR-10)")
    r.add_argument("--train-per-class", type=_positive_int, default=None, metavar="N",
                   help="large scale only: keep N training images per class (before the 5%% validation "
                        "hold-out), a reduced run that fits a CPU (default all)")
    r.add_argument("--test-per-class", type=_positive_int, default=None, metavar="N",
                   help="large scale only: keep N test images per class (default all)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--no-cache", action="store_true",
                   help="train Original and Retrain even if the model cache (PPU_FAST_CACHE, else "
                        "$XDG_CACHE_HOME/ppu_fast, else ~/.cache/ppu_fast) holds them, and write "
                        "nothing there")
    _progress_flags(r)

    f = sub.add_parser("refine", help="refine probabilities from a file (the solver alone)",
                       epilog="exit status: 0 when Q was written and the solver converged; 1 when "
                              "Q was written but the solver did not converge (see stderr); 2 "
                              "for bad input (nothing written); 3 when the machine ran out of "
                              "memory (nothing written); 130 on Ctrl-C")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--probs", help="N x k probabilities, .pt or .npy")
    src.add_argument("--logits", help="N x k logits (log-softmax is taken inside), .pt or .npy")
    f.add_argument("--forget", required=True, help="forget mask (N,) bool or row indices, .pt or .npy")
    f.add_argument("--lam", type=_lam, default=1.0, help="retain rows' weight, in [1e-30, 1e30] (default 1)")
    f.add_argument("--weights", default=None,
                   help="(N,) each row's KL weight c_i, .pt or .npy (not together with --lam)")
    f.add_argument("--pseudo", default="uniform",
                   choices=("uniform", "random", "random-simplex", "prior", "none"),
                   help="what replaces the forget rows; 'none': the input's forget rows already "
                        "hold their pseudo-probabilities (default uniform)")
    f.add_argument("--marginals", default="retain", type=_marginals,
                   help="class totals of Q: retain (the retain rows' mix scaled to N), original "
                        "(the input's totals), pseudo (P^'s own), or a .npy / .pt file of k "
                        "totals summing to N (default retain)")
    f.add_argument("--method", default="newton", choices=("newton", "sinkhorn", "gradient"),
                   help="the solver (default newton)")
    f.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES),
                   help="the kernels (default auto: the fastest that runs on the input's device)")
    f.add_argument("--tol", type=_positive_float, default=1e-6,
                   help="stop when ||colsum(Q) - M||_1 / N is at most this (default 1e-6)")
    f.add_argument("--max-iter", type=_positive_int, default=None,
                   help="most passes over the matrix (default: the method's)")
    f.add_argument("--seed", type=_seed, default=0,
                   help="seed for --pseudo random / random-simplex, in [0, 2**32 - 1] (default 0)")
    f.add_argument("--out", required=True, help="output Q, .pt or .npy")
    stream = f.add_mutually_exclusive_group()
    stream.add_argument("--chunk-rows", type=_positive_int, default=None,
                        help="stream a .npy input this many rows at a time (ppu_fast.refine_file)")
    stream.add_argument("--memory-budget", default="1GiB",
                        help="a .npy input larger than this is streamed in chunks that fit it "
                             "(bytes or e.g. 512MiB, 2GB; default 1GiB)")
    f.add_argument("--device", default="cpu",
                   help="where the refine runs (cpu, cuda, cuda:N); Q is saved from the host")
    _progress_flags(f)
    return p


def _finish(result: dict, out: str, started: float, tables: bool = False, story: bool = False) -> None:
    from .report import attack_size, format_table, judge, summarize, write_results

    methods = summarize(result["per_seed"])
    chance, n = attack_size(result["per_seed"])
    verdict = judge(methods, chance=chance, n=n)
    config = {**result["config"], "wall_seconds": round(time.perf_counter() - started, 2)}
    replaced = (Path(out) / "results.json").is_file()
    from .tables import TABLE_FILES

    # A former run's files go first, all of them (the demo writes no tables): a write that is
    # interrupted or fails then leaves part of this run's files, never some of another run's
    # beside them, which would pass for this one's.
    for name in ("results.json", "results.md", "results.png", *TABLE_FILES.values()):
        (Path(out) / name).unlink(missing_ok=True)
    _writing[0] = out
    paths = write_results(out, config, methods, per_seed=result["per_seed"], history=result["history"],
                          verdict=verdict, story=story, histories=result.get("histories"))
    print()
    print(format_table(methods, with_std=len(result["per_seed"]) > 1))
    print()
    print("Verdict (computed from the table):")
    for line in verdict.lines:
        print(f"- {line}")
    print()
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}  ({config['wall_seconds']:.1f} s)"
          + ("; they replace the earlier run's in that folder" if replaced else ""))
    if tables:
        # The paper's tables (its numbers beside ours) and Figure 3, beside results.json.
        from .tables import write_tables

        extra = write_tables(out, config, methods, seeds=len(result["per_seed"]), history=result["history"],
                             histories=result.get("histories"), per_seed=result["per_seed"])
        print("wrote " + ", ".join(str(p) for p in extra.values()))
    _writing[0] = None


# The results folder while _finish writes into it (for the message of an interrupt then).
_writing: list = [None]


def _partial_results(lead: str) -> str:
    """What the message of a command stopped while ``_finish`` wrote adds: that the folder holds
    part of this run's files; "" at any other time."""
    where = _writing[0]
    if not where:
        return ""
    return (f"{lead} the results: '{where}' holds only the files of this run written so far "
            f"(the earlier ones there were removed first); run it again for the whole set")


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .unlearn.experiment import run_experiment

    started = time.perf_counter()
    _check_out_folder(args.out)
    _check_backend_environment("cpu")
    # The small CNN's tensors are tiny: one thread avoids the synchronisation that makes several
    # threads slower here, by up to 10x on a busy 2-core machine.
    torch.set_num_threads(1)
    print(f"ppu-fast demo: scikit-learn's digits (10 classes), small CNN; forget every training "
          f"{DEMO_SETTING['forget_class']} (class unlearning: a model that never saw one misreads them all)",
          flush=True)
    result = run_experiment(**DEMO_SETTING, methods=DEMO_METHODS, seeds=[args.seed], width=DEMO_WIDTH,
                            train=dict(DEMO_TRAIN),
                            method_kwargs={m: dict(kw) for m, kw in DEMO_OPTIONS.items()},
                            cache=not args.no_cache, progress=_show_progress(args), log=_log)
    _finish(result, args.out, started, story=True)
    return 0


def _log(line: str) -> None:
    # flush: in a pipe, each method's line appears when the method ends, not with the table.
    print(line, flush=True)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .unlearn.experiment import PPU_METHODS, lam_variants, run_experiment

    started = time.perf_counter()
    _check_out_folder(args.out)
    _check_run_device(args.device)
    if args.methods == []:
        raise ValueError("--methods: no method named; expected comma-separated method names")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size))
             if v is not None}
    common = {k: v for k, v in (("epochs", args.unlearn_epochs), ("lr", args.unlearn_lr),
                                ("retain_per_epoch", args.retain_per_epoch),
                                ("schedule", args.ppu_schedule), ("retain_fraction", args.retain_fraction),
                                ("trainable", args.trainable)) if v is not None}
    privacy = {k: v for k, v in (("lam", args.lam), ("pseudo", args.pseudo), ("marginals", args.marginals),
                                 ("select", args.select)) if v is not None}
    from .unlearn._loop import baseline_kwargs, expand_methods

    for flag, value in (("--pretrain-epochs", args.pretrain_epochs), ("--pretrain-per-class", args.pretrain_per_class)):
        if value is not None and args.pretrain is None:
            raise ValueError(f"{flag}: only with --pretrain (it sets how the pre-training runs)")

    variants = None
    if args.lam_sweep is not None:
        for flag, value in (("--methods", args.methods), ("--lam", args.lam)):
            if value is not None:
                raise ValueError(f"--lam-sweep, {flag}: pass one of them (the sweep runs Original, Retrain "
                                 f"and PPU once per λ)")
        variants = lam_variants(args.lam_sweep, dict(common, **privacy))
        args.methods = ["original", "retrain", *variants]
    else:
        args.methods = expand_methods(args.methods or list(DEMO_METHODS[:5]), args.dataset)
        # Before the checks of options against the methods: a misspelt PPU method made them
        # blame --unlearn-epochs or --lam instead of the name.
        from .unlearn.experiment import registered
        unknown = [m for m in args.methods if m not in registered()]
        if unknown:
            raise ValueError(f"--methods: unknown method(s) {', '.join(map(repr, unknown))}; "
                             f"expected some of {', '.join(registered())} or all")
    runs_ppu = variants is not None or any("+ppu" in m or m in PPU_METHODS for m in args.methods)
    if runs_ppu:
        _check_backend_environment(args.device)  # only PPU's refine reads it
    if common and not runs_ppu:
        flags = {"epochs": "--unlearn-epochs", "lr": "--unlearn-lr", "schedule": "--ppu-schedule"}
        raise ValueError(f"{', '.join(flags.get(k, '--' + k.replace('_', '-')) for k in common)}: "
                         f"only the PPU methods ({', '.join(PPU_METHODS)}) and the +ppu methods "
                         f"use them, and --methods has none")
    if args.epochs == 0 and "retrain" in args.methods:
        # A smoke run may want exactly that; a comparison may not: say so before any work.
        print("ppu-fast run: warning: --epochs 0 with retrain in --methods: Retrain is the starting "
              "weights themselves (an --init-checkpoint's, or untrained), not a model that never saw "
              "the forget set, and the verdict ranks every method against it", file=sys.stderr)
    if privacy and variants is None and "ppu" not in args.methods:
        raise ValueError(f"{', '.join('--' + k for k in privacy)}: only PPU's privacy mode (the method "
                         f"'ppu') uses them, and --methods has no 'ppu'")
    kwargs = {m: dict(common, **(privacy if m == "ppu" else {})) for m in args.methods if m in PPU_METHODS}
    # The baselines take SCRUB's hyper-parameters for the run's setting; the "+ppu" methods' PPU step
    # takes the same --unlearn-* options as PPU itself.
    registered = [m for m in args.methods if m not in (variants or {})]
    for m, extra in baseline_kwargs(args.dataset, args.scenario, registered, common or None).items():
        kwargs.setdefault(m, {}).update(extra)
    result = run_experiment(dataset=args.dataset, model=args.model, scenario=args.scenario,
                            forget_class=args.forget_class, num_forget=args.num_forget, methods=args.methods,
                            seeds=args.seeds, data_root=args.data_root, device=args.device, width=args.width,
                            train=train, method_kwargs=kwargs, cache=not args.no_cache,
                            progress=_show_progress(args), log=_log, init_checkpoint=args.init_checkpoint,
                            pretrain=args.pretrain, pretrain_per_class=args.pretrain_per_class,
                            train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                            pretrain_train=None if args.pretrain_epochs is None else {"epochs": args.pretrain_epochs},
                            variants=variants)
    _finish(result, args.out, started, tables=True)
    return 0


def _load_array(path: str, arg: str):
    import torch

    from .stream import load_npy

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{arg}: no file at '{p}'")
    if p.suffix == ".npy":
        return load_npy(p, arg)
    if p.suffix == ".pt":
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure says the file is not a tensor file
            # (pickle, zip and torch errors alike; a short text file raised a bare KeyError)
            raise ValueError(f"{arg}: '{p}' cannot be read as a tensor saved with torch.save "
                             f"({type(exc).__name__} from torch.load with weights_only=True)"
                             ) from None
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"{arg}: '{p}' holds a {type(obj).__name__}, expected a tensor")
        return obj
    raise ValueError(f"{arg}: '{p}' must end in .pt or .npy")


def _refine(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import refine

    out = Path(args.out)
    if not str(args.out).strip():
        raise ValueError("--out: empty; expected a file path ending in .pt or .npy")
    if out.suffix not in (".pt", ".npy"):
        raise ValueError(f"--out: '{out}' must end in .pt or .npy")
    from .stream import check_name_length
    check_name_length(out, "--out")  # before a stat of it fails (ENAMETOOLONG)
    if out.is_dir():
        raise ValueError(f"--out: '{out}' is a directory; expected a file path ending in .pt or "
                         f".npy")
    # Before the solve: exit status 1 says Q was written (but did not converge), so a folder
    # that cannot take the file must be refused up front, as bad input.
    why = _unwritable(out.parent)
    if why:
        raise ValueError(f"--out: cannot write a file in '{out.parent}' ({why}); expected a path "
                         f"in a writable folder (created if missing)")
    flag = "--probs" if args.probs is not None else "--logits"
    if _streams(args):
        return _refine_streamed(args)
    from .stream import check_device

    dev = check_device(args.device)
    x = _load_array(args.probs if args.probs is not None else args.logits, flag)
    if out.suffix == ".npy" and isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
        raise ValueError(f"--out: Q has the input's dtype, bfloat16, which numpy (.npy) cannot "
                         f"hold; expected a .pt path for a bfloat16 {flag}")
    if dev.type != "cpu":  # refine runs where its input lives
        x = (torch.from_numpy(x) if isinstance(x, np.ndarray) else x).to(dev)
    mask = _load_array(args.forget, "--forget")
    weights = None if args.weights is None else _load_array(args.weights, "--weights")
    if args.weights is not None and args.lam != 1.0:
        raise ValueError("--weights, --lam: pass one of them")
    if isinstance(mask, torch.Tensor) and isinstance(x, np.ndarray):
        mask = mask.numpy()  # refine reads a numpy mask for any input; a .npy one stays numpy
    inputs = {"probs": x} if args.probs is not None else {"logits": x}
    with _convergence_said_here():
        q, info = refine(forget_mask=mask, lam=args.lam, weights=weights,
                         pseudo=None if args.pseudo == "none" else args.pseudo,
                         marginals=_marginals_arg(args.marginals), method=args.method, backend=args.backend,
                         tol=args.tol, max_iter=args.max_iter,
                         generator=torch.Generator().manual_seed(args.seed), return_info=True,
                         **inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed: a write that fails (a full disk) leaves no truncated Q under
    # --out for status 2's "nothing written" to contradict.
    from .stream import written_beside
    with written_beside(out, out.suffix) as part:
        if out.suffix == ".npy":
            np.save(part, q.cpu().numpy() if isinstance(q, torch.Tensor) else q)
        else:
            torch.save(torch.as_tensor(q).cpu(), part)
    print(f"refined {tuple(q.shape)} with {info.method} on {info.backend}: {info.iterations} iterations, "
          f"residual {info.residual:.2e}, converged {info.converged}, {info.seconds:.3f} s -> {out}")
    return _converged_status(info)


@contextmanager
def _convergence_said_here() -> Iterator[None]:
    """The solver's ConvergenceWarning silenced: ``_converged_status`` says it (stderr, status
    1). Left on, it was said twice, and under ``-W error`` / ``PYTHONWARNINGS=error`` it became an
    exception before Q was written (status 1, which promises Q, with no Q)."""
    from .solver import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _converged_status(info) -> int:
    """The exit status of a refine that wrote its Q: 0, or 1 when the solver did not converge
    (said on stderr too, so that a script can tell without parsing the summary line)."""
    if info.converged:
        return 0
    print(f"ppu-fast refine: warning: the solver did not converge ({info.message}); Q was "
          f"written from its best iterate (residual {info.residual:.3g}); exit status 1",
          file=sys.stderr)
    return 1


def _streams(args: argparse.Namespace) -> bool:
    """Whether ``refine`` streams: a .npy input, and --chunk-rows given or the file larger than
    --memory-budget."""
    from .stream import parse_bytes

    src = Path(args.probs if args.probs is not None else args.logits)
    budget = parse_bytes(args.memory_budget, "--memory-budget")  # checked for every input
    if src.suffix != ".npy":
        if args.chunk_rows is not None:
            raise ValueError(f"--chunk-rows: streaming reads .npy files; '{src}' is not one")
        return False
    return args.chunk_rows is not None or (src.is_file() and src.stat().st_size > budget)


@contextmanager
def _made_folders(folder: Path, keep: bool = True) -> Iterator[None]:
    """Create ``folder`` and its missing parents for the block, and remove the ones made here
    again if the block raises (bad input writes nothing, as exit status 2 promises), or in any
    case with ``keep=False``."""
    missing = [d for d in [folder, *folder.parents] if not d.exists()]
    ok = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
        ok = keep
    finally:
        if not ok:
            for d in missing:  # deepest first
                try:
                    d.rmdir()
                except OSError:
                    break


def _refine_streamed(args: argparse.Namespace) -> int:
    import torch

    from .stream import refine_file

    out = Path(args.out)
    if out.suffix != ".npy":
        why, fix = (("--chunk-rows was given", "leave out --chunk-rows")
                    if args.chunk_rows is not None else
                    (f"the input file is larger than --memory-budget {args.memory_budget}",
                     "raise --memory-budget"))
        raise ValueError(f"--out: a streamed refine writes .npy, and this one streams ({why}); "
                         f"got '{out}' ({fix} to refine in memory and write .pt)")
    src = args.probs if args.probs is not None else args.logits
    # A bool mask or integer row indices, read whole (1 byte per row, or 8 per index).
    forget = _load_array(args.forget, "--forget")
    if isinstance(forget, torch.Tensor):
        forget = forget.numpy()
    weights = None if args.weights is None else _load_array(args.weights, "--weights")
    if args.weights is not None and args.lam != 1.0:
        raise ValueError("--weights, --lam: pass one of them")
    if isinstance(weights, torch.Tensor):
        weights = weights.numpy()
    with _made_folders(out.parent), _convergence_said_here():
        info = refine_file(src, forget, out, logits=args.logits is not None,
                           chunk_rows=args.chunk_rows, memory_budget=args.memory_budget,
                           device=args.device, progress=_show_progress(args),
                           weights=weights, lam=args.lam,
                           pseudo=None if args.pseudo == "none" else args.pseudo,
                           marginals=_marginals_arg(args.marginals), method=args.method, backend=args.backend,
                           tol=args.tol, max_iter=args.max_iter,
                           generator=torch.Generator().manual_seed(args.seed))
    print(f"refined {src} in chunks of {info.chunk_rows} rows with {info.method} "
          f"on {info.backend}: {info.iterations} iterations, residual {info.residual:.2e}, "
          f"converged {info.converged}, {info.seconds:.3f} s -> {out}")
    return _converged_status(info)


# The Python API's argument names in messages that reach the command line, where the flag differs
# by more than '--' and dashes.
_API_NAMES = {"probs_path": "--probs", "forget_mask": "--forget", "out_path": "--out"}


def _as_flags(message: str, args: argparse.Namespace) -> str | None:
    """``message`` with the Python argument names it starts with ("lam: ...", "forget_class must
    ...", "retain_fraction, retain_per_epoch: ...") as the command's flags, when every one of
    them is a flag of the command; None when there is nothing to rename."""
    import re

    # Only a name the message is about: followed by ':', '=' or ' must', not by the flag already
    # ("init_checkpoint (--init-checkpoint): ...") and not the first word of a phrase ("lam
    # sweep: ...", which is --lam-sweep's).
    m = re.match(r"([a-z][a-z0-9_]*(?:, [a-z][a-z0-9_]*)*)(?=[:=]| must)", message)
    if m is None:
        return None
    flags = []
    for name in m.group(1).split(", "):
        flag = _API_NAMES.get(name, "--" + name.replace("_", "-"))
        if flag == "--probs" and getattr(args, "logits", None) is not None:
            flag = "--logits"
        if not hasattr(args, flag[2:].replace("-", "_")):
            return None
        flags.append(flag)
    return ", ".join(flags) + message[m.end():]


def allocation_failed(exc: RuntimeError) -> bool:
    """Whether ``exc`` is torch's allocator refusing a size (CPU or CUDA), not another error."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ppu-fast`` console script. Returns the exit status: 0, 2 for bad
    input (or a file it cannot read or write), 1 when ``refine`` wrote Q but its solver did not converge or when an unlearning run
    diverged (NaN weights), 3 when the machine ran out of memory, 130 on Ctrl-C."""
    args = _parser().parse_args(argv)
    _writing[0] = None
    if getattr(args, "out", None):
        # A quoted '~/x' reached us unexpanded and became a folder named '~' (--data-root and
        # PPU_FAST_CACHE expand it already).
        args.out = str(Path(args.out).expanduser())
    handler = {"demo": _demo, "run": _run, "refine": _refine}[args.command]
    try:
        try:
            return handler(args)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            renamed = _as_flags(str(exc), args)
            if renamed is None:
                raise
            raise type(exc)(renamed) from None
    except KeyboardInterrupt:
        # What a shell reports for SIGINT; the handlers' own cleanup (temporary files, folders
        # they made) has run by now.
        print(f"ppu-fast {args.command}: interrupted" + _partial_results(" while writing"),
              file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"ppu-fast {args.command}: error: out of memory ({exc or 'MemoryError'}); expected "
              f"sizes that fit this machine (--width, --batch-size, --train-per-class, "
              f"--memory-budget)", file=sys.stderr)
        return 3
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"ppu-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file or folder the command could not write or read (permissions, a full disk): not
        # a crash to debug, and not status 1, which says Q was written.
        print(f"ppu-fast {args.command}: error: {exc}" + _partial_results("; while writing"),
              file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        # A diverged training (unlearn refuses to hand back its NaN weights): the run failed.
        print(f"ppu-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        # torch's allocators raise RuntimeError (CUDA's OutOfMemoryError is one): a size the
        # machine cannot hold, not a crash to debug.
        text = str(exc)
        if allocation_failed(exc):
            print(f"ppu-fast {args.command}: error: out of memory ({text.splitlines()[0]}); "
                  f"expected sizes that fit this machine (--width, --batch-size, "
                  f"--train-per-class, --memory-budget)", file=sys.stderr)
            return 3
        # A backend that cannot run here (no GPU, no Triton) is the caller's choice of --backend,
        # not a crash: the same exit status as other bad input. Other RuntimeErrors propagate.
        if not text.startswith("backend:"):
            raise
        print(f"ppu-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
